"""Round-trip time to every peer DC over the backbone, as a histogram per peer.

Every `interval` seconds a probe thread opens a TCP connection to each
peer's metrics port (its backbone address), times the connect (SYN to
SYN-ACK: one round trip, measured by the kernel's clock, without a server's
scheduling in it), then completes mutual TLS and checks that the peer's
certificate names that DC (`<dc>.dc.privedge.internal`) before counting the
sample. A probe that cannot connect, or whose peer is not who it should
be, counts as a failure instead: a DC that answers TCP but not with its
certificate is not a healthy peer.

    prober = RttProber({"fra": "198.18.0.2"}, 9443, tls_files).start()
    registry.register(RttCollector(prober))
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from bisect import bisect_left
from collections.abc import Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric

from agent.metrics.families import cumulative
from agent.metrics.server import TlsFiles
from agent.metrics.tls import client_context

DOMAIN = "dc.privedge.internal"    # control/pki.py names each DC's agent <dc>.dc.<this>
# A backbone between two namespaces is tens of microseconds, between real
# DCs milliseconds to a few hundred.
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
           0.5, 1.0)


class _Peer:
    __slots__ = ("address", "buckets", "failures", "sum")

    def __init__(self, address: str) -> None:
        self.address = address
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.failures = 0


class RttProber:
    def __init__(self, peers: Mapping[str, str], port: int, tls: TlsFiles,
                 interval: float = 5.0, timeout: float = 2.0) -> None:
        self.port, self.tls, self.interval, self.timeout = port, tls, interval, timeout
        self._context = client_context(tls)   # a bad file fails here
        self._peers = {dc: _Peer(address) for dc, address in sorted(peers.items())}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> RttProber:
        self._thread = threading.Thread(target=self._run, name="privedge-rtt", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout * max(1, len(self._peers)) + 1)
            self._thread = None

    def reload(self) -> None:
        """The reissued certificate for the next probes (SIGHUP)."""
        self._context = client_context(self.tls)

    def probe_all(self) -> None:
        for dc, peer in self._peers.items():
            rtt = self.probe(dc, peer.address)
            with self._lock:
                if rtt is None:
                    peer.failures += 1
                else:
                    peer.buckets[bisect_left(BUCKETS, rtt)] += 1
                    peer.sum += rtt

    def probe(self, dc: str, address: str) -> float | None:
        """One probe: the connect time in seconds, or None if it failed."""
        start = time.perf_counter()
        try:
            raw = socket.create_connection((address, self.port), timeout=self.timeout)
        except OSError:
            return None
        rtt = time.perf_counter() - start
        try:
            with self._context.wrap_socket(raw, server_hostname=f"{dc}.{DOMAIN}"):
                pass  # the handshake verified the peer's name and chain
        except (OSError, ssl.SSLError):
            return None
        finally:
            raw.close()
        return rtt

    def snapshot(self) -> dict[str, dict]:
        with self._lock:
            return {dc: {"buckets": list(p.buckets), "sum": p.sum, "failures": p.failures}
                    for dc, p in self._peers.items()}

    def _run(self) -> None:
        # The first round waits an interval too: DCs started together are
        # then listening, and a start-up is not counted as a peer failing.
        while not self._stop.wait(self.interval):
            self.probe_all()


class RttCollector:
    def __init__(self, prober: RttProber) -> None:
        self.prober = prober

    def collect(self) -> Iterator[Metric]:
        snap = self.prober.snapshot()
        rtt = HistogramMetricFamily("privedge_dc_rtt_seconds",
                                    "TCP round trip to a peer DC over the backbone, from "
                                    "probes that then passed mutual TLS", labels=["peer_dc"])
        failed = CounterMetricFamily("privedge_dc_rtt_probe_failures",
                                     "Probes of a peer DC that did not connect or whose "
                                     "certificate was not that DC's", labels=["peer_dc"])
        for dc, peer in snap.items():
            rtt.add_metric([dc], cumulative(BUCKETS, peer["buckets"]), peer["sum"])
            failed.add_metric([dc], peer["failures"])
        yield rtt
        yield failed
