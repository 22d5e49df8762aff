"""nginx as a peer for the L7 benches and the testssl comparison, on loopback.

    with Nginx(NginxConfig("proxy_cache", port, certs, origin="http://127.0.0.1:8080")) as peer:
        peer.pids, peer.cpu_seconds()

One nginx of our own per peer: its config is generated into a temp prefix
and run with `nginx -c <prefix>/nginx.conf -p <prefix>` in the foreground
(`daemon off`), so it is stopped by the PID we started and the system's
nginx (its config, pid file, log and temp directories) is never touched.
One worker process, like the agent's one event loop.

TLS is Mozilla's "intermediate" profile for nginx 1.22 / OpenSSL 3.0
(ssl-config.mozilla.org, v5.7): TLS 1.2 and 1.3, its cipher list,
X25519:prime256v1:secp384r1, ffdhe2048 for its DHE suites, HSTS, OCSP
stapling on (it staples nothing for lab certificates, which name no
responder), an ECDSA and an RSA certificate of the zone (lab/certs.py
layout). Session resumption is a parameter: off means the session cache
is off and tickets too, so every connection is a full handshake.

Modes:
  static       files under `root` (with `cache_control` on them, if given),
               anything else a small 200; plain HTTP if `tls` is False.
  proxy_cache  a reverse proxy with proxy_cache to `origin`, keep-alive
               connections to it; the origin's Cache-Control decides.
  modsec       proxy_cache, with ModSecurity v3 and the OWASP CRS (Debian's
               modsecurity-crs 3.3) at paranoia level 1 in blocking mode:
               anomaly thresholds 5 (inbound) and 4 (outbound), 403 on block.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

NGINX = "nginx"
MODULE_DIRS = (Path("/usr/lib/nginx/modules"), Path("/usr/share/nginx/modules"))
MODSEC_MODULE = "ngx_http_modsecurity_module.so"
CRS_RULES = Path("/usr/share/modsecurity-crs/rules")
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0

# Mozilla intermediate, v5.7 (nginx 1.22, OpenSSL 3.0).
MOZILLA_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384", "DHE-RSA-CHACHA20-POLY1305",
])
MOZILLA_CURVES = "X25519:prime256v1:secp384r1"
HSTS = "max-age=63072000"

Mode = Literal["static", "proxy_cache", "modsec"]


class NginxError(Exception):
    """nginx could not be set up or started; the message says why."""


@dataclass(frozen=True)
class NginxConfig:
    mode: Mode
    port: int
    certs: Path | None = None     # <zone>.crt/.key, <zone>.rsa.crt/.key, ca.crt
    zone: str = "www"
    hostname: str = "www.example.com"
    origin: str | None = None     # proxy modes: http://127.0.0.1:PORT
    root: Path | None = None      # static mode: document root
    cache_control: str | None = None  # static mode: on the files served
    tls: bool = True
    rsa: bool = True              # the zone's RSA twin too (<zone>.rsa.crt/.key)
    resumption: bool = True
    address: str = "127.0.0.1"
    error_log_level: str = "warn"  # "crit" keeps ModSecurity's per-block lines out
    deferred: bool = False        # `listen ... deferred` (TCP_DEFER_ACCEPT), as the agent does


def tool_env() -> dict[str, str]:
    """The environment for nginx, wrk and testssl: without the OPENSSL_CONF
    that importing `agent` sets (agent/__init__.py), which would hand them the
    agent's TLS settings instead of their own."""
    return {k: v for k, v in os.environ.items() if k != "OPENSSL_CONF"}


def free_port(address: str = "127.0.0.1") -> int:
    """A port free right now (nginx cannot be asked to pick one itself)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def modsec_module() -> Path:
    """Debian's ModSecurity connector for nginx; NginxError names the package."""
    for d in MODULE_DIRS:
        if (d / MODSEC_MODULE).is_file():
            return d / MODSEC_MODULE
    raise NginxError(f"{MODSEC_MODULE} not in {' or '.join(map(str, MODULE_DIRS))}: "
                     "apt-get install libnginx-mod-http-modsecurity")


# --------------------------------------------------------------------------- config text


def _tls(cfg: NginxConfig, prefix: Path) -> str:
    assert cfg.certs is not None
    c = cfg.certs
    if cfg.resumption:
        sessions = ("ssl_session_timeout 1d;\n        ssl_session_cache shared:MozSSL:10m;\n"
                    "        ssl_session_tickets off;")
    else:  # "off", not "none": the client is told sessions may not be reused
        sessions = "ssl_session_cache off;\n        ssl_session_tickets off;"
    rsa = (f"\n        ssl_certificate {c}/{cfg.zone}.rsa.crt;"
           f"\n        ssl_certificate_key {c}/{cfg.zone}.rsa.key;") if cfg.rsa else ""
    return f"""
        ssl_certificate {c}/{cfg.zone}.crt;
        ssl_certificate_key {c}/{cfg.zone}.key;{rsa}
        {sessions}
        ssl_dhparam {prefix}/ffdhe2048.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ecdh_curve {MOZILLA_CURVES};
        ssl_ciphers {MOZILLA_CIPHERS};
        ssl_prefer_server_ciphers off;
        ssl_stapling on;
        ssl_stapling_verify on;
        ssl_trusted_certificate {c}/ca.crt;
        add_header Strict-Transport-Security "{HSTS}" always;"""


def _locations(cfg: NginxConfig, prefix: Path) -> str:
    if cfg.mode == "static":
        if cfg.root is None:
            raise NginxError("static mode needs a root")
        header = f'add_header Cache-Control "{cfg.cache_control}";' if cfg.cache_control else ""
        # The fallback answers any method and path, so a corpus replayed
        # through a proxy in front of this origin never meets a 404 or 405.
        return f"""
        location / {{
            root {cfg.root};
            try_files $uri @any;
            {header}
        }}
        location @any {{
            default_type text/plain;
            return 200 "ok\\n";
        }}"""
    if not cfg.origin:
        raise NginxError(f"{cfg.mode} mode needs an origin URL")
    modsec = ""
    if cfg.mode == "modsec":
        modsec = f"modsecurity on;\n            modsecurity_rules_file {prefix}/modsec/main.conf;"
    return f"""
        location / {{
            {modsec}
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_cache edge;
            proxy_cache_lock on;
            add_header X-Cache $upstream_cache_status;
        }}"""


def render(cfg: NginxConfig, prefix: Path) -> str:
    """The whole nginx.conf for `cfg`, every path inside `prefix`."""
    top = f"load_module {modsec_module()};\n" if cfg.mode == "modsec" else ""
    upstream = ""
    if cfg.mode != "static":
        host = (cfg.origin or "").removeprefix("http://").rstrip("/")
        if not host or "/" in host or (cfg.origin or "").startswith("https"):
            raise NginxError(f"origin {cfg.origin!r}: expected http://HOST:PORT")
        upstream = f"""
    proxy_cache_path {prefix}/cache levels=1:2 keys_zone=edge:10m max_size=64m inactive=1h
                     use_temp_path=off;
    upstream origin {{
        server {host};
        keepalive 16;
    }}"""
    listen = f"{cfg.address}:{cfg.port}" if ":" not in cfg.address \
        else f"[{cfg.address}]:{cfg.port}"
    tls = _tls(cfg, prefix) if cfg.tls else ""
    return f"""# generated by bench/nginx.py: {cfg.mode}
{top}daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log {cfg.error_log_level};
events {{
    worker_connections 4096;
}}
http {{
    types {{
        text/html html;
        text/css css;
        text/plain txt;
        application/javascript js;
        image/png png;
    }}
    default_type application/octet-stream;
    access_log off;
    sendfile on;
    tcp_nodelay on;
    # Keep-alive runs must not be cut into new handshakes every 1000 requests.
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;{upstream}
    server {{
        listen {listen}{" ssl" if cfg.tls else ""}{" deferred" if cfg.deferred else ""};
        server_name {cfg.hostname};{tls}{_locations(cfg, prefix)}
    }}
}}
"""


def render_modsec(prefix: Path) -> str:
    """ModSecurity's main config: engine on, the CRS at paranoia level 1.

    The engine settings are those of ModSecurity's modsecurity.conf-recommended
    that bear on requests (body access and limits, the JSON and XML body
    processors, refusing a body that does not parse), except that such a
    refusal is a 403 like every other block here (nginx's own 400s stay
    apart), nothing goes to an audit log and responses are not inspected:
    the agent does neither.
    """
    return f"""# generated by bench/nginx.py
SecRuleEngine On
SecRequestBodyAccess On
SecRequestBodyLimit 13107200
SecRequestBodyNoFilesLimit 131072
SecRequestBodyLimitAction Reject
SecRule REQUEST_HEADERS:Content-Type "^(?:application(?:/soap\\+|/)|text/)xml" \\
    "id:200000,phase:1,t:none,t:lowercase,pass,nolog,ctl:requestBodyProcessor=XML"
SecRule REQUEST_HEADERS:Content-Type "^application/json" \\
    "id:200001,phase:1,t:none,t:lowercase,pass,nolog,ctl:requestBodyProcessor=JSON"
SecRule REQBODY_ERROR "!@eq 0" \\
    "id:200002,phase:2,t:none,log,deny,status:403,msg:'Failed to parse request body.'"
SecPcreMatchLimit 1000
SecPcreMatchLimitRecursion 1000
SecResponseBodyAccess Off
SecTmpDir {prefix}/modsec/tmp
SecDataDir {prefix}/modsec/tmp
SecAuditEngine Off
SecArgumentSeparator &
SecCookieFormat 0
SecStatusEngine Off

# crs-setup: Debian's defaults (anomaly scoring), paranoia level 1, thresholds 5/4.
SecDefaultAction "phase:1,log,auditlog,pass"
SecDefaultAction "phase:2,log,auditlog,pass"
SecAction "id:900000,phase:1,nolog,pass,t:none,setvar:tx.paranoia_level=1"
SecAction "id:900110,phase:1,nolog,pass,t:none,\\
    setvar:tx.inbound_anomaly_score_threshold=5,\\
    setvar:tx.outbound_anomaly_score_threshold=4"
SecAction "id:900990,phase:1,nolog,pass,t:none,setvar:tx.crs_setup_version=334"
Include {CRS_RULES}/*.conf
"""


# --------------------------------------------------------------------------- process


class Nginx:
    """One nginx started from a generated config in a temp prefix."""

    def __init__(self, cfg: NginxConfig, cpus: set[int] | None = None) -> None:
        self.cfg = cfg
        self.cpus = cpus  # pinned there, master and worker (benches keep clients off it)
        self.prefix: Path | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.cfg.tls else "http"
        return f"{scheme}://{self.cfg.address}:{self.cfg.port}"

    def start(self) -> Nginx:
        if shutil.which(NGINX) is None:
            raise NginxError("nginx is not installed: apt-get install nginx-light")
        self.prefix = Path(tempfile.mkdtemp(prefix=f"pe-nginx-{self.cfg.mode}-"))
        # Workers run as nobody when we are root: they must reach the
        # document root and create the cache under the prefix.
        self.prefix.chmod(0o755)
        pin = (lambda: os.sched_setaffinity(0, self.cpus)) if self.cpus else None
        try:
            self._write()
            # Until it opens its error log, nginx reports to stderr.
            with open(self.prefix / "stderr.log", "w") as err:
                self.proc = subprocess.Popen(
                    [NGINX, "-c", str(self.prefix / "nginx.conf"), "-p", str(self.prefix)],
                    stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=tool_env(),
                    preexec_fn=pin)
            self._wait_listening()
        except BaseException:
            self.stop()
            raise
        return self

    def _write(self) -> None:
        p = self.prefix
        assert p is not None
        (p / "tmp").mkdir()
        if self.cfg.tls:
            r = subprocess.run(["openssl", "genpkey", "-genparam", "-algorithm", "DH",
                                "-pkeyopt", "group:ffdhe2048", "-out", str(p / "ffdhe2048.pem")],
                               capture_output=True, text=True, timeout=30, env=tool_env())
            if r.returncode:
                raise NginxError(f"openssl could not write ffdhe2048 parameters: {r.stderr}")
        if self.cfg.mode == "modsec":
            (p / "modsec" / "tmp").mkdir(parents=True)
            (p / "modsec" / "tmp").chmod(0o1777)  # the worker (nobody) may write there
            (p / "modsec" / "main.conf").write_text(render_modsec(p))
        (p / "nginx.conf").write_text(render(self.cfg, p))

    def _error_tail(self) -> str:
        lines = []
        for name in ("stderr.log", "error.log"):
            log = self.prefix / name if self.prefix else None
            if log is not None and log.is_file():
                lines += log.read_text(errors="replace").splitlines()[-15:]
        return "\n".join(lines) or "(nothing in its logs)"

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NginxError(f"nginx ({self.cfg.mode}) exited with {self.proc.returncode}:\n"
                                 + self._error_tail())
            with contextlib.suppress(OSError), \
                    socket.create_connection((self.cfg.address, self.cfg.port), timeout=1):
                if self.workers():
                    return
            time.sleep(0.05)
        raise NginxError(f"nginx ({self.cfg.mode}) did not listen on port {self.cfg.port} "
                         f"within {START_TIMEOUT:g}s:\n" + self._error_tail())

    def workers(self) -> list[int]:
        """PIDs of the master's children (the worker; no cache manager
        unless a cache is configured, then the cache manager and loader)."""
        if self.proc is None:
            return []
        try:
            text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return []
        return [int(x) for x in text.split()]

    @property
    def pids(self) -> list[int]:
        """Master and children: all of nginx's CPU time is in these."""
        return ([self.proc.pid] if self.proc else []) + self.workers()

    def stop(self) -> None:
        """Fast shutdown by our PID; kill it and its children by PID if it lingers."""
        if self.proc is not None and self.proc.poll() is None:
            children = self.workers()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                for pid in [self.proc.pid, *children]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.proc.wait(STOP_TIMEOUT)
        self.proc = None
        if self.prefix is not None:
            shutil.rmtree(self.prefix, ignore_errors=True)
            self.prefix = None

    def __enter__(self) -> Nginx:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
