"""privedge core services: the log store (core/store.py) behind its HTTPS API
(core/server.py), fed by the edges (core/PROTOCOL.md), with retention and
Logpush. Entry point: core/cli.py (`privedge-core`, `python -m core`)."""
