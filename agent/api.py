"""The agent's API for operators and the control plane: HTTPS, a client
certificate from the network's CA required, the role in its OU (control/pki.py).

    GET    /v1/status           viewer   dc, region, each link's generation and
                                         counters, the front end's counters
    POST   /v1/deny             operator {"prefixes": [...], "expires": SECONDS}
    DELETE /v1/deny             operator {"prefixes": [...]}
    POST   /v1/allow            operator {"prefixes": [...]}: the allowlist wins over
    DELETE /v1/allow            operator   every filter drop (bpf/README.md)
    POST   /v1/purge            operator {"zone": Z} and "url" or "prefix", or neither
    GET    /v1/generation       viewer   the network generation applied here
    POST   /v1/generation       admin    apply one (control/genpack.py's payload):
                                         checked whole, then every link's BPF
                                         generation and the front end's zones swap,
                                         rolled back if a step fails (agent/daemon.py)

A certificate from another CA, or expired, fails the handshake; one without
an operator role (an agent's, a zone reader's) gets 403. Every request,
reads and dry runs and refusals included, is appended to the agent's audit
log (control/audit.py): who (the certificate's CN), its SHA-256
fingerprint, the action, what was asked, and the result. A change is
checked whole before it is made: a bad prefix changes no link
(control/ops.py). Request bodies are bounded.
"""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Callable, Mapping
from ipaddress import ip_address
from pathlib import Path
from typing import Protocol

from pydantic import Field, field_validator

from agent.config import ConfigError, Frozen, parse_checked, read_yaml_mapping
from agent.l7.status import purge, read_status
from agent.metrics.server import TlsFiles, server_context
from agent.node import Node
from agent.prefixes import PrefixError
from control import ops
from control.audit import AuditError, AuditLog
from control.roles import API_PORT, RANK, Caller, caller_of
from control.status import gather
from control.tlshttp import JsonHandler, TlsHttpServer, TlsService

MAX_BODY = 1 << 20              # a deny request of ~20,000 prefixes; lists go as generations
MAX_GENERATION_BODY = 256 << 20   # an admin's generation: lists of millions of prefixes


class ControlPlane(Frozen):
    """Where the control plane serves its current generation (control/genserver.py)."""

    address: str
    port: int = Field(default=9445, ge=1, le=65535)
    name: str = Field(default="core.privedge.internal", min_length=1)  # its certificate's

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        return str(ip_address(value))


class ApiConfig(Frozen):
    """api.yaml:

        listen: 198.18.0.1          # the backbone address: the control plane calls it
        port: 9444
        cert: /etc/privedge/pki/agents/dus.crt
        key: /etc/privedge/pki/agents/dus.key
        ca: /etc/privedge/pki/ca.crt
        audit: /var/lib/privedge/audit.jsonl
        generations: /var/lib/privedge/generations   # default: beside the audit log
        control: {address: 198.18.0.254, port: 9445, name: core.privedge.internal}
                                    # where to pull the current generation at start
    """

    listen: str
    port: int = Field(default=API_PORT, ge=0, le=65535)   # 0: a free port (tests)
    cert: Path
    key: Path
    ca: Path
    audit: Path
    generations: Path | None = None     # the network generations applied here (agent/netgen.py)
    control: ControlPlane | None = None     # None: no pull at start

    @property
    def generations_dir(self) -> Path:
        return self.generations or self.audit.parent / "generations"

    @field_validator("listen")
    @classmethod
    def _address(cls, value: str) -> str:
        return str(ip_address(value))

    @property
    def tls(self) -> TlsFiles:
        return TlsFiles(self.cert, self.key, self.ca)


def load_api_config(path: str | Path) -> ApiConfig:
    return parse_checked(ApiConfig, read_yaml_mapping(path), str(path), lambda _c: [])


class ApiError(Exception):
    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


class Generations(Protocol):
    """Who applies network generations (agent/daemon.py's Agent)."""

    def apply_network(self, payload: object, dry: bool = False) -> dict: ...

    def network_info(self) -> dict: ...


class AgentApi:
    """`links`: interface -> its node; `status_socket`: the front end's;
    `generations`: None when this agent takes no network generations."""

    def __init__(self, dc: str, region: str, links: Mapping[str, Node],
                 status_socket: str | None, audit: AuditLog,
                 generations: Generations | None = None) -> None:
        self.dc, self.region = dc, region
        self.links, self.status_socket, self.audit = links, status_socket, audit
        self.generations = generations
        self._lock = threading.Lock()       # one change at a time

    # -- the routes: (method, path) -> (least role, action, handler)

    def route(self, method: str, path: str
              ) -> tuple[str, str, Callable[[dict, bool], dict]]:
        routes = {
            ("GET", "/v1/status"): ("viewer", "read status", self.status),
            ("POST", "/v1/deny"): ("operator", "deny add", self.deny_add),
            ("DELETE", "/v1/deny"): ("operator", "deny remove", self.deny_remove),
            ("POST", "/v1/allow"): ("operator", "allow add", self.allow_add),
            ("DELETE", "/v1/allow"): ("operator", "allow remove", self.allow_remove),
            ("POST", "/v1/purge"): ("operator", "purge", self.purge),
            ("GET", "/v1/generation"): ("viewer", "read generation", self.generation),
            ("POST", "/v1/generation"): ("admin", "apply generation", self.apply_generation),
        }
        if (method, path) not in routes:
            raise ApiError(404, f"no {method} {path} (see agent/api.py)")
        return routes[method, path]

    def status(self, _body: dict, _dry: bool = False) -> dict:
        """What `privedge status` shows of each link (control/status.py), and
        the front end's counters."""
        links = {ifname: gather(node, interval=0) for ifname, node in self.links.items()}
        front = read_status(self.status_socket) if self.status_socket else None
        return {"dc": self.dc, "region": self.region, "links": links, "front": front,
                "network": self.generations.network_info() if self.generations else None}

    def generation(self, _body: dict, _dry: bool = False) -> dict:
        if self.generations is None:
            raise ApiError(409, "this agent takes no network generations")
        return {"dc": self.dc, **self.generations.network_info()}

    def apply_generation(self, body: dict, dry: bool = False) -> dict:
        if self.generations is None:
            raise ApiError(409, "this agent takes no network generations")
        return {"dc": self.dc, **self.generations.apply_network(body, dry)}

    def _prefixes(self, body: dict) -> list[str]:
        prefixes = body.get("prefixes")
        if not isinstance(prefixes, list) or not prefixes \
                or not all(isinstance(p, str) for p in prefixes):
            raise ApiError(400, "prefixes: a non-empty list of prefix strings")
        if not self.links:
            raise ApiError(409, "this agent protects no link")
        return prefixes

    def deny_add(self, body: dict, dry: bool = False) -> dict:
        prefixes = self._prefixes(body)
        expires = body.get("expires", 0)
        if not isinstance(expires, int | float) or expires < 0:
            raise ApiError(400, "expires: seconds from now, a number >= 0 (0: never)")
        return self._each_link(lambda node, d: ops.deny_add(node, prefixes, expires, d), dry)

    def deny_remove(self, body: dict, dry: bool = False) -> dict:
        prefixes = self._prefixes(body)
        return self._each_link(lambda node, d: ops.deny_remove(node, prefixes, d), dry)

    def allow_add(self, body: dict, dry: bool = False) -> dict:
        prefixes = self._prefixes(body)
        return self._each_link(lambda node, d: ops.allow_change(node, prefixes, [], d), dry)

    def allow_remove(self, body: dict, dry: bool = False) -> dict:
        prefixes = self._prefixes(body)
        return self._each_link(lambda node, d: ops.allow_change(node, [], prefixes, d), dry)

    def _each_link(self, change: Callable[[Node, bool], dict], dry: bool) -> dict:
        """Check the change on every link first (dry run), then make it
        unless `dry`: a prefix one link refuses changes no link."""
        with self._lock:
            try:
                checked = {ifname: change(node, True) for ifname, node in self.links.items()}
                if dry:
                    return checked
                return {ifname: change(node, False) for ifname, node in self.links.items()}
            except (PrefixError, ops.OpError, ValueError) as e:
                raise ApiError(400, str(e)) from None

    def purge(self, body: dict, dry: bool = False) -> dict:
        zone = body.get("zone")
        if not isinstance(zone, str) or not zone:
            raise ApiError(400, "zone: the zone whose cache to purge")
        if self.status_socket is None:
            raise ApiError(409, "this agent runs no front end")
        if dry:
            served = read_status(self.status_socket).get("requests", {})
            if zone not in served:  # type: ignore[operator]
                raise ApiError(400, f"zone {zone!r} is not served here")
            return {"would_purge": zone}
        try:
            n = purge(self.status_socket, zone, body.get("url"), body.get("prefix"))
        except ValueError as e:
            raise ApiError(400, str(e).split(": ", 1)[-1]) from None
        return {"purged": n}

    # -- one request

    def handle(self, method: str, path: str, caller: Caller, body: dict,
               dry: bool = False) -> tuple[int, dict]:
        """One request, authorized by role and audited, whatever its outcome:
        reads, dry runs (?dry_run=1: checked, nothing changed) and refusals
        too. An answer that cannot be audited is a 500 saying whether
        anything was changed."""
        status, action, answer = 500, f"{method} {path}", {}
        try:
            least, action, handler = self.route(method, path)
            if caller.role is None or RANK[caller.role] < RANK[least]:
                raise ApiError(403, f"{action} needs the role {least} or higher; this "
                                    f"certificate's is {caller.role or 'none'}")
            answer, status = handler(body, dry), 200
        except ApiError as e:
            status, answer = e.status, {"error": str(e)}
        except Exception as e:   # a bug: still answered, and the change still audited
            status, answer = 500, {"error": f"internal error ({type(e).__name__})"}
        result = {"ok": status == 200, "status": status}
        if status != 200:
            result["error"] = answer["error"]
        # A generation is audited by number and hash (its diff is in the
        # control plane's audit log), not by its lists.
        asked = ({k: body.get(k) for k in ("number", "sha256")}
                 if action == "apply generation" else body)
        if dry:
            asked = {**asked, "dry_run": True}
        try:
            self.audit.append(caller.name, caller.certificate, action, asked, {self.dc: result})
        except AuditError as e:   # say so: what nobody can see later is worse
            made = status == 200 and method != "GET" and not dry
            return 500, {"error": f"not audited ({e}); "
                                  + ("the change was made" if made else "nothing was changed"),
                         "result": answer}
        return status, answer


class _Handler(JsonHandler):
    server: _Server

    def _serve(self) -> None:
        try:
            caller = caller_of(self.peer_certificate())
            path, _, query = self.path.partition("?")
            # Only an admin's generation may be large; the rest is small.
            limit = (MAX_GENERATION_BODY if path == "/v1/generation" and caller.role == "admin"
                     else MAX_BODY)
            length = int(self.headers.get("Content-Length") or 0)
            if length > limit:
                raise ApiError(413, f"body over {limit} bytes")
            if length < 0:
                raise ApiError(400, "Content-Length must not be negative")
            raw = self.rfile.read(length) if length else b"{}"
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("not an object")
            status, answer = self.server.api.handle(self.command, path, caller, body,
                                                    dry="dry_run=1" in query.split("&"))
        except ApiError as e:
            status, answer = e.status, {"error": str(e)}
        except ValueError:
            status, answer = 400, {"error": "the body is not a JSON object"}
        self.send_json(status, answer)

    do_GET = do_POST = do_DELETE = _serve


class _Server(TlsHttpServer):
    api: AgentApi


class ApiServer(TlsService):
    def __init__(self, api: AgentApi, address: str, port: int, tls: TlsFiles) -> None:
        self.tls = tls
        httpd = _Server((address, port), _Handler, bind_and_activate=False)
        httpd.api = api
        try:   # a client certificate from the network's CA required
            super().__init__(httpd, lambda: server_context(self.tls), "privedge-api")
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"api: certificates do not load: {e}") from None
