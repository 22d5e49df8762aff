"""testssl.sh against the agent and against nginx with Mozilla's "intermediate"
config, compared finding by finding: ours must be no worse.

    python -m bench.testssl                  both modes of unknown_sni, table of differences
    python -m bench.testssl --unknown-sni refuse

Both servers on 127.0.0.1, the same zone certificates (ECDSA P-256 and RSA
2048, lab/certs.py), testssl 3.0 (Debian's) told to trust the lab CA and to
connect to 127.0.0.1 with the zone's name as SNI (`--ip`). Sections: protocols
(-p), cipher categories (-s), forward secrecy (-f), server preferences (-P),
server defaults and certificates (-S), HTTP headers (-h), vulnerabilities
(-U), ciphers per protocol (-E), client simulations (-c). About 45 s a scan.

Judging. testssl rates each finding OK/INFO < LOW < MEDIUM < HIGH < CRITICAL;
ours is worse when its rating is higher than nginx's for the same id, when
only ours reports an id at LOW or above, when a check could not complete
against ours (WARN), or when a simulated client that connects to nginx
cannot connect to us. A difference the project chose is not hidden: it is
listed in INTENTIONAL (or, for a refusing server, NO_SNI) with its reason
and shown in the table as such. The agent runs with `unknown_sni` set to a
default zone (as nginx's default server) or to `refuse` (the default), under
which testssl's checks that connect without SNI cannot complete.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.l7 import Agent, resumes
from bench.nginx import Nginx, NginxConfig, free_port, tool_env
from lab.certs import make_lab_pki

HOST = "www.example.com"
ZONE = "www"
SECTIONS = ("-p", "-s", "-f", "-P", "-S", "-h", "-U", "-E", "-c")
SCAN_TIMEOUT = 300
RANK = {"OK": 0, "INFO": 0, "LOW": 1, "MEDIUM": 2, "HIGH": 3, "CRITICAL": 4}
FAILED = 5  # WARN: testssl could not complete the check

IGNORED = {
    "scanTime": "the scan's duration",
    "engine_problem": "about the local openssl binary, not the server",
}
# Differences by design: finding id (without its <cert#N>) -> why.
INTENTIONAL = {
    "OCSP_stapling": "OCSP-free by design: the edge fetches no OCSP responses (no calls to "
                     "a CA that reveal which hosts it serves); lab certificates name no "
                     "responder, so nginx staples nothing here either",
    "HSTS": "HSTS is a zone's decision at HTTP level (it binds the hostname to HTTPS for "
            "its max-age): the edge adds none of its own; an origin's header passes",
}
# With unknown_sni: refuse, testssl's checks that connect without SNI fail:
# that is the refusal at work (testssl 3.0: "No SNI needed here").
NO_SNI = {
    "secure_renego": "testssl checks renegotiation without SNI, and unknown_sni: refuse "
                     "aborts such handshakes (with a default zone it shows 'supported')",
}
# testssl's resumption check hangs up right after the handshake (s_client,
# stdin at EOF). A server that sends its TLS 1.3 session ticket with its
# first write, not in the handshake's last flight, leaves it nothing to
# resume with ("connect problem"). Such a WARN is judged by a client that
# makes a request, as every real client does (bench/l7.py resumes()).
RESUMPTION = ("sessionresumption_ticket", "sessionresumption_ID")
RESUMPTION_CHECKED = ("testssl hangs up before the agent's TLS 1.3 session ticket arrives "
                      "(sent with the first write, not the handshake); checked directly: a "
                      "client that makes a request resumes with TLS 1.2 and 1.3")


class ScanError(Exception):
    """testssl could not scan; the message says why."""


def find_testssl() -> str | None:
    """Debian installs testssl.sh as `testssl`; upstream's name is testssl.sh."""
    return shutil.which("testssl") or shutil.which("testssl.sh")


# --------------------------------------------------------------------------- scans


def scan(port: int, ca: Path, out: Path) -> dict[str, tuple[str, str]]:
    """testssl against 127.0.0.1:port with SNI www.example.com: id -> (severity, finding)."""
    binary = find_testssl()
    if binary is None:
        raise ScanError("testssl.sh is not installed: apt-get install testssl.sh")
    cmd = [binary, "--quiet", "--color", "0", "--warnings", "batch", "--sneaky",
           "--connect-timeout", "10", "--openssl-timeout", "10", "--add-ca", str(ca),
           "--ip", "127.0.0.1", "--jsonfile", str(out), *SECTIONS, f"https://{HOST}:{port}"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=SCAN_TIMEOUT,
                           cwd=out.parent, env=tool_env())
    except subprocess.TimeoutExpired:
        raise ScanError(f"testssl took more than {SCAN_TIMEOUT}s against port {port}") from None
    if not out.is_file():
        raise ScanError(f"testssl wrote no JSON (exit {r.returncode}):\n"
                        + (r.stdout + r.stderr)[-2000:])
    return normalise(json.loads(out.read_text()))


def normalise(items: list[dict]) -> dict[str, tuple[str, str]]:
    """Findings by id. `<cert#N>` becomes the key kind (the order of the
    certificates is the server's business); an id that repeats keeps its
    worst rating and all its texts."""
    kinds = {}
    for x in items:
        m = re.match(r"cert_keySize <(cert#\d+)>$", x["id"])
        if m:
            kinds[m.group(1)] = x["finding"].split(" bits")[0]   # "EC 256", "RSA 2048"
    out: dict[str, tuple[str, str]] = {}
    for x in items:
        fid = re.sub(r"<(cert#\d+)>", lambda m: f"<{kinds.get(m.group(1), m.group(1))}>",
                     x["id"])
        sev, text = x["severity"], x["finding"]
        if fid in out:
            old_sev, old_text = out[fid]
            sev = max(old_sev, sev, key=_rank)
            text = old_text if text == old_text else f"{old_text}; {text}"
        out[fid] = (sev, text)
    return out


def _rank(severity: str) -> int:
    return RANK.get(severity, FAILED if severity == "WARN" else 0)


# --------------------------------------------------------------------------- judging


@dataclass(frozen=True)
class Row:
    id: str
    nginx: tuple[str, str] | None
    ours: tuple[str, str] | None
    verdict: str  # differs (not worse) | better | worse | intentional | explained | ignored
    why: str = ""


def judge(fid: str, nginx: tuple[str, str] | None, ours: tuple[str, str] | None,
          refusing: bool, explained: dict[str, str]) -> Row:
    base = fid.split(" <", 1)[0]
    if base in IGNORED:
        return Row(fid, nginx, ours, "ignored", IGNORED[base])
    worse, why = False, ""
    if (base.startswith("clientsimulation-") and nginx and ours
            and nginx[1] != "No connection" and ours[1] == "No connection"):
        worse, why = True, "a client that connects to nginx cannot connect to us"
    elif ours is None:
        worse = False
    elif nginx is None:
        worse, why = _rank(ours[0]) >= RANK["LOW"], "only ours reports it"
    else:
        worse = _rank(ours[0]) > _rank(nginx[0])
        why = "the check failed against ours" if ours[0] == "WARN" else "rated worse"
    if not worse:
        better = ours is not None and nginx is not None and _rank(ours[0]) < _rank(nginx[0])
        return Row(fid, nginx, ours, "better" if better else "differs")
    if base in INTENTIONAL:
        return Row(fid, nginx, ours, "intentional", INTENTIONAL[base])
    if refusing and base in NO_SNI:
        return Row(fid, nginx, ours, "intentional", NO_SNI[base])
    if base in explained:
        return Row(fid, nginx, ours, "explained", explained[base])
    return Row(fid, nginx, ours, "worse", why)


def compare(nginx: dict[str, tuple[str, str]], ours: dict[str, tuple[str, str]],
            refusing: bool, explained: dict[str, str] | None = None) -> list[Row]:
    """A row for every id whose rating or text differs (and for ignored ones).

    `explained`: finding id -> reason, for checks of ours that failed (WARN)
    where a direct check of the same property passed.
    """
    rows = []
    for fid in sorted(set(nginx) | set(ours)):
        if nginx.get(fid) != ours.get(fid):
            rows.append(judge(fid, nginx.get(fid), ours.get(fid), refusing, explained or {}))
    # What nginx shows and ours does not, by design, is listed even when equal
    # here (lab certificates make OCSP stapling look the same on both).
    for fid in sorted(set(nginx) & set(ours)):
        base = fid.split(" <", 1)[0]
        if base in INTENTIONAL and nginx[fid] == ours[fid]:
            rows.append(Row(fid, nginx[fid], ours[fid], "intentional", INTENTIONAL[base]))
    return rows


def table(rows: list[Row], width: int = 46) -> str:
    def cell(f: tuple[str, str] | None) -> str:
        if f is None:
            return "—"
        text = f"{f[0]}: {f[1]}"
        return text if len(text) <= width else text[:width - 1] + "…"

    lines = [f"{'finding':<34} {'nginx (Mozilla intermediate)':<{width}} "
             f"{'agent':<{width}} verdict"]
    order = {"worse": 0, "intentional": 1, "explained": 2, "better": 3, "differs": 4,
             "ignored": 5}
    for r in sorted(rows, key=lambda r: (order[r.verdict], r.id)):
        lines.append(f"{r.id[:34]:<34} {cell(r.nginx):<{width}} {cell(r.ours):<{width}} "
                     f"{r.verdict}{': ' + r.why if r.why else ''}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- servers


def sni_outcome(port: int, sni: str | None) -> str:
    """What a client offering `sni` (None: no SNI) gets: the certificate's
    name and the version, or the alert."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname=sni) as tls:
            der = tls.getpeercert(binary_form=True)
            from cryptography import x509

            cert = x509.load_der_x509_certificate(der)
            names = cert.extensions.get_extension_for_class(
                x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
            return f"served {', '.join(names)} ({tls.version()})"
    except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
        return "refused: connection closed, no alert"
    except ssl.SSLError as e:
        return f"refused: alert {(e.reason or str(e)).lower()}"
    except OSError as e:
        return f"refused: {e.strerror or type(e).__name__}"


@dataclass(frozen=True)
class Scan:
    findings: dict[str, tuple[str, str]]
    sni: dict[str, str]          # SNI_CASES -> what a client got
    explained: dict[str, str]    # failed checks of ours a direct check passed


class Setup:
    """The lab PKI, nginx (static, Mozilla intermediate) and the agent."""

    def __init__(self, work: Path, agent_root: Path | None = None) -> None:
        self.work = work
        self.ca = make_lab_pki(work / "pki", {ZONE: [HOST]})
        self.agent_root = agent_root

    def nginx(self) -> Nginx:
        root = self.work / "www"
        root.mkdir(exist_ok=True)
        root.chmod(0o755)
        return Nginx(NginxConfig("static", free_port(), self.ca.parent, zone=ZONE,
                                 hostname=HOST, root=root))

    def agent(self, unknown_sni: str) -> Agent:
        workdir = self.work / f"agent-{unknown_sni}"
        workdir.mkdir(exist_ok=True)
        config = {"dc": "dus", "region": "eu", "listen": ["127.0.0.1"], "port": 0,
                  "certs": str(self.ca.parent), "unknown_sni": unknown_sni,
                  "zones": [{"name": ZONE, "hostnames": [HOST]}]}
        kwargs = {"root": self.agent_root} if self.agent_root else {}
        return Agent(config, workdir, **kwargs)

    def scan_nginx(self) -> Scan:
        with self.nginx() as n:
            sni = {k: sni_outcome(n.cfg.port, s) for k, s in SNI_CASES.items()}
            return Scan(scan(n.cfg.port, self.ca, self.work / "nginx.json"), sni, {})

    def scan_agent(self, unknown_sni: str) -> Scan:
        with self.agent(unknown_sni) as a:
            sni = {k: sni_outcome(a.port, s) for k, s in SNI_CASES.items()}
            findings = scan(a.port, self.ca, self.work / f"agent-{unknown_sni}.json")
            explained = {}
            if any(findings.get(i, ("",))[0] == "WARN" for i in RESUMPTION) \
                    and all(resumes(a.port, self.ca).values()):
                explained = dict.fromkeys(RESUMPTION, RESUMPTION_CHECKED)
            return Scan(findings, sni, explained)



SNI_CASES = {"zone's name": HOST, "unknown name": "unknown.example.net", "no SNI": None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--unknown-sni", choices=("both", "refuse", ZONE), default="both",
                   help="the agent's unknown_sni: refuse, the default zone, or both (default)")
    p.add_argument("--keep", type=Path, help="keep the JSON reports in this directory")
    a = p.parse_args(argv)
    if find_testssl() is None or shutil.which("nginx") is None:
        print("bench-testssl: needs testssl.sh and nginx (make setup installs them)",
              file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="pe-testssl-"))
    work.chmod(0o755)  # nginx's worker (nobody, when we are root) reads the document root
    try:
        setup = Setup(work)
        modes = (ZONE, "refuse") if a.unknown_sni == "both" else (a.unknown_sni,)
        print("bench-testssl: scanning nginx (Mozilla intermediate)", file=sys.stderr)
        nginx = setup.scan_nginx()
        worse = 0
        for mode in modes:
            print(f"bench-testssl: scanning the agent (unknown_sni: {mode})", file=sys.stderr)
            ours = setup.scan_agent(mode)
            rows = compare(nginx.findings, ours.findings, mode == "refuse", ours.explained)
            worse += sum(r.verdict == "worse" for r in rows)
            print(f"\n== agent with unknown_sni: {mode} against nginx: findings that differ\n")
            print(table(rows))
            print(f"\n  {'SNI offered':<14} {'nginx':<40} agent")
            for k in SNI_CASES:
                print(f"  {k:<14} {nginx.sni[k]:<40} {ours.sni[k]}")
        if a.keep:
            a.keep.mkdir(parents=True, exist_ok=True)
            for f in work.glob("*.json"):
                shutil.copy(f, a.keep / f.name)
        print(f"\n{worse} finding(s) worse for the agent than for nginx")
        return 1 if worse else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
