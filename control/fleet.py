"""Every DC's agent API at once (agent/api.py), for the network CLI.

    fleet = Fleet.from_network(net, Credentials(pki_dir, "alice"))
    results = fleet.call("POST", "/v1/deny", {"prefixes": [...]})   # DC -> Result

Calls go to each DC's backbone address in parallel over mTLS, the
operator's certificate presented and each agent's checked against the
network CA under its name (`<dc>.dc.privedge.internal`). A DC that does not
answer, or refuses, is reported by name with the reason; the others are not
held back by it.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from agent.metrics.tls import TlsFiles, client_context
from control.network import NetworkConfig
from control.pki import DOMAIN
from control.roles import API_PORT

TIMEOUT = 10.0


@dataclass(frozen=True)
class Result:
    ok: bool
    status: int               # HTTP status; 0: no answer
    answer: dict
    seconds: float

    @property
    def error(self) -> str:
        return str(self.answer.get("error", "")) if not self.ok else ""


def credentials(pki: Path, operator: str) -> TlsFiles:
    """An operator's certificate from a privedge-pki directory."""
    return TlsFiles(pki / "operators" / f"{operator}.crt", pki / "operators" / f"{operator}.key",
                    pki / "ca.crt")


class Fleet:
    def __init__(self, dcs: Mapping[str, str], tls: TlsFiles, port: int = API_PORT,
                 timeout: float = TIMEOUT) -> None:
        self.dcs, self.port, self.timeout = dict(dcs), port, timeout
        self._context: ssl.SSLContext = client_context(tls)   # a bad file fails here

    @classmethod
    def from_network(cls, net: NetworkConfig, tls: TlsFiles, port: int = API_PORT,
                     timeout: float = TIMEOUT) -> Fleet:
        return cls({name: dc.backbone for name, dc in net.dcs.items()}, tls, port, timeout)

    def only(self, names: set[str]) -> Fleet:
        """The same fleet, reduced to the DCs named."""
        fleet = object.__new__(Fleet)
        fleet.dcs = {dc: a for dc, a in self.dcs.items() if dc in names}
        fleet.port, fleet.timeout, fleet._context = self.port, self.timeout, self._context
        return fleet

    def call(self, method: str, path: str, body: dict | None = None) -> dict[str, Result]:
        """The same request to every DC, in parallel; DC -> its result."""
        data = json.dumps(body).encode() if body is not None else None   # once, for all
        with ThreadPoolExecutor(max_workers=max(1, min(32, len(self.dcs)))) as pool:
            futures = {dc: pool.submit(self._one, dc, address, method, path, data)
                       for dc, address in self.dcs.items()}
            return {dc: f.result() for dc, f in futures.items()}

    def _one(self, dc: str, address: str, method: str, path: str,
             data: bytes | None) -> Result:
        start = time.monotonic()
        name = f"{dc}.dc.{DOMAIN}"
        conn = http.client.HTTPSConnection(name, self.port, timeout=self.timeout,
                                           context=self._context)
        try:
            raw = socket.create_connection((address, self.port), self.timeout)
            conn.sock = self._context.wrap_socket(raw, server_hostname=name)
            conn.request(method, path, body=data,
                         headers={"Content-Type": "application/json"} if data else {})
            r = conn.getresponse()
            text = r.read()
            try:
                answer = json.loads(text)
            except ValueError:
                answer = {"error": f"not JSON: {text[:200]!r}"}
            return Result(r.status == 200, r.status, answer, time.monotonic() - start)
        except (OSError, ssl.SSLError, http.client.HTTPException) as e:
            why = (e.strerror if isinstance(e, OSError) and e.strerror
                   else str(e) or type(e).__name__)
            return Result(False, 0, {"error": f"no answer from {address}:{self.port}: {why}"},
                          time.monotonic() - start)
        finally:
            conn.close()
