"""privedge-core: the core DC's log store (customer logs, operations sample).

    privedge-core init-key /etc/privedge/core/master.key   make the master key (0600)
    privedge-core check core.yaml                          validate; changes nothing
    privedge-core serve core.yaml                          run (SIGTERM stops, SIGHUP
                                                           reloads certificates)
    privedge-core sweep core.yaml                          a retention sweep now (the
                                                           server, if running, does it
                                                           itself every sweep_interval)

Also `python -m core ...`. Config reference: core/README.md. Exit status:
0 ok, 1 failure (the message says what and what to do), 2 usage.
"""

from __future__ import annotations

import argparse
import signal
import ssl
import sys
import threading
from pathlib import Path

from core.config import CoreConfig, load_config
from core.crypto import KeyFileError, check_master, init_master_key, load_master_key

PROG = "privedge-core"


def _say(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def _check(path: Path) -> int:
    from core.logpush import client_context
    from core.server import server_context

    cfg = load_config(path)
    problems: list[str] = []
    try:
        server_context(cfg)
    except (OSError, ssl.SSLError) as e:
        problems.append(f"tls: cert {cfg.cert}, key {cfg.key}, ca {cfg.ca} do not load ({e})")
    try:
        master = load_master_key(cfg.master_key)
        check_master(master, cfg.data_dir / "master.check", create=False)
    except KeyFileError as e:
        problems.append(str(e))
    for zone, z in cfg.zones.items():
        for job in z.logpush:
            try:
                client_context(job)
            except (OSError, ssl.SSLError) as e:
                problems.append(f"zones.{zone}.logpush.{job.name}: ca_file {job.ca_file} does "
                                f"not load ({e})")
    for p in problems:
        _say(f"{path}: {p}")
    if problems:
        return 1
    jobs = sum(len(z.logpush) for z in cfg.zones.values())
    print(f"{path}: ok: {len(cfg.zones)} zone(s), {jobs} logpush job(s), region "
          f"{cfg.region or '(none)'}, data in {cfg.data_dir}")
    return 0


def _serve(path: Path) -> int:
    from core.server import CoreServer

    _say(f"config: {path}")
    cfg: CoreConfig = load_config(path)
    server = CoreServer(cfg, on_phase=_say)
    stop, hup = threading.Event(), threading.Event()
    handlers = {signal.SIGTERM: lambda *_: stop.set(), signal.SIGINT: lambda *_: stop.set(),
                signal.SIGHUP: lambda *_: hup.set()}
    in_main = threading.current_thread() is threading.main_thread()
    old = {sig: signal.signal(sig, h) for sig, h in handlers.items()} if in_main else {}
    try:
        server.start()
        while not stop.wait(0.2):
            if hup.is_set():
                hup.clear()
                try:
                    server.reload()
                    _say("reload: certificates loaded again")
                except (OSError, ssl.SSLError) as e:
                    _say(f"reload: failed, keeping the current certificates ({e})")
        _say("stopping")
        server.stop()
        _say("stopped")
        return 0
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _sweep(path: Path) -> int:
    from core.store import Store

    cfg = load_config(path)
    store = Store(cfg, load_master_key(cfg.master_key)).open()
    try:
        report = store.sweep()
    finally:
        store.close()
    for p in report.removed:
        print(f"removed {'/'.join(p.parts)} and its key")
    print(f"{cfg.data_dir}: {len(report.removed)} day(s) removed, {report.keys_destroyed} "
          f"key(s) destroyed, {report.journals_removed} journal(s) removed")
    return 0


def _init_key(path: Path) -> int:
    init_master_key(path)
    print(f"wrote {path} (0600). Keep it outside data_dir and back it up apart from the "
          "data: without it nothing stored can be read.")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, arg, text in (("serve", "config", "run the store's HTTPS API"),
                            ("check", "config", "validate the config and its files"),
                            ("sweep", "config", "delete expired days and their keys now"),
                            ("init-key", "path", "make a new master key file (0600)")):
        sp = sub.add_parser(name, help=text, description=text)
        sp.add_argument(arg, type=Path, help="the core config (YAML)" if arg == "config"
                        else "where to write the key (outside data_dir)")
    try:
        a = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    from core.store import StoreLocked, StoreUnavailable

    try:
        if a.command == "init-key":
            return _init_key(a.path)
        return {"serve": _serve, "check": _check, "sweep": _sweep}[a.command](a.config)
    except (ValueError, KeyFileError, StoreLocked, StoreUnavailable) as e:  # ConfigError is one
        _say(str(e))
    except (OSError, ssl.SSLError) as e:
        where = getattr(e, "filename", None)
        _say(f"{where + ': ' if where else ''}{getattr(e, 'strerror', None) or e}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
