"""The network's private PKI: one CA, a certificate for every party of mTLS.

    privedge-pki DIR [--topology lab/topology.yaml] [--operator NAME=ROLE ...]
                     [--zone NAME ...] [--rotate] [--dry-run]
    privedge-pki DIR --show                  (or: python -m control.pki ...)

Writes DIR/ca.crt and DIR/ca.key (made once, then reused: everything that
trusts ca.crt keeps trusting reissued certificates), and, for the parties
the network config names:

  agents/<dc>.crt|key     each DC's agent: server (metrics, its API) and
                          client (to core); SANs <dc>.dc.privedge.internal
                          and its backbone and public addresses
  core/core.crt|key       the core (log store): server and client; SANs
                          core.privedge.internal and its backbone address
  prometheus.crt|key      the core's Prometheus: client (it scrapes agents)
  operators/<name>.crt|key  operators: client; the role (viewer, operator,
                          admin) is the certificate's organizationalUnitName
  zones/<zone>.crt|key    a zone's log reader: client, organizationalUnitName
                          "zone", CN <zone>.zone.privedge.internal; the core's
                          log store serves a zone's logs to it alone (every
                          zone of the topology, and each --zone)

Keys are ECDSA P-256, written 0600 and atomically (a reader never sees half
a key); certificates 0644, valid 90 days. A run issues what is missing or
within 30 days of expiry; `--rotate` reissues every certificate (new keys,
same CA). Rotation needs no downtime: files are replaced atomically and a
service reloads its certificate on SIGHUP.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import secrets
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_NAME = "privedge CA"
ORGANIZATION = "privedge"
CA_DAYS = 3650
LEAF_DAYS = 90
RENEW_BEFORE = dt.timedelta(days=30)
BACKDATE = dt.timedelta(hours=1)  # tolerate clocks of other namespaces/VMs a little behind
DOMAIN = "privedge.internal"      # names of the network's own parties (never a customer's)
ROLES = ("viewer", "operator", "admin")
ZONE_UNIT = "zone"                # organizationalUnitName of a zone's log reader
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")

LeafKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class PkiError(ValueError):
    """A request the PKI refuses; the message names what and why."""


# --------------------------------------------------------------------------- files


def write_all(fd: int, data: bytes) -> None:
    """os.write until all of `data` is out (a write may take only part)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes, mode: int, sync_dir: bool = True) -> None:
    """Write atomically with `mode` from the first byte (no window at 0644):
    a temporary file of its own, fsynced, renamed over `path`, and the rename
    fsynced (`sync_dir`). A reader sees the old file or the whole new one; a
    failure leaves no temporary file. Also core/'s one way to write a file."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; set it exactly
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(path.parent)


def pem_key(key: LeafKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_pair(stem: Path, cert: x509.Certificate, key: LeafKey) -> None:
    """stem.key (0600), then stem.crt (0644): a reader that sees the new
    certificate finds its key already there."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_file(stem.with_name(stem.name + ".key"), pem_key(key), 0o600)
    write_file(stem.with_name(stem.name + ".crt"), pem_cert(cert), 0o644)


# --------------------------------------------------------------------------- issuing


def x509_name(common_name: str, organization: str = ORGANIZATION,
              unit: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization)]
    if unit is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def load_or_make_ca(dir: Path, name: str = CA_NAME, organization: str = ORGANIZATION
                    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA in `dir` (ca.crt, ca.key), made and written if absent."""
    crt, key = dir / "ca.crt", dir / "ca.key"
    if crt.is_file() and key.is_file():
        ca_key = serialization.load_pem_private_key(key.read_bytes(), password=None)
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{key}: not an EC key; remove {dir}/ca.* to make a new CA")
        return x509.load_pem_x509_certificate(crt.read_bytes()), ca_key
    if crt.exists() or key.exists():
        raise PkiError(f"{dir}: one of ca.crt and ca.key is missing; restore it or remove both")
    dir.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509_name(name, organization)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    write_file(key, pem_key(ca_key), 0o600)
    write_file(crt, pem_cert(cert), 0o644)
    return cert, ca_key


def issue(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, common_name: str, *,
          dns: Sequence[str] = (), ips: Sequence[IPAddress] = (), server: bool = True,
          client: bool = False, unit: str | None = None, kind: str = "ecdsa",
          organization: str = ORGANIZATION, days: int = LEAF_DAYS
          ) -> tuple[x509.Certificate, LeafKey]:
    """A leaf certificate and its new key, signed by the CA."""
    if not (server or client):
        raise PkiError(f"{common_name}: a certificate for neither server nor client use")
    key: LeafKey = (ec.generate_private_key(ec.SECP256R1()) if kind == "ecdsa"
                    else rsa.generate_private_key(public_exponent=65537, key_size=2048))
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + \
        ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ip) for ip in ips]
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509_name(common_name, organization, unit))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=kind == "rsa", data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Party:
    """One certificate the network needs."""

    path: str                       # under the PKI directory, without .crt/.key
    common_name: str
    dns: tuple[str, ...] = ()
    ips: tuple[IPAddress, ...] = ()
    server: bool = False
    client: bool = False
    role: str | None = None         # operators, zone readers: the organizationalUnitName


def operator_roles(specs: Iterable[str]) -> dict[str, str]:
    """'alice=admin' ... → {name: role}; PkiError names a bad one."""
    out: dict[str, str] = {}
    for spec in specs:
        name, eq, role = spec.partition("=")
        if not eq or not _NAME.match(name):
            raise PkiError(f"--operator {spec!r}: expected NAME=ROLE, NAME of a-z, 0-9 and '-'")
        if role not in ROLES:
            raise PkiError(f"--operator {spec!r}: role {role!r} is not one of {', '.join(ROLES)}")
        if name in out:
            raise PkiError(f"--operator {spec!r}: {name} is named twice")
        out[name] = role
    return out


def zone_names(names: Iterable[str]) -> list[str]:
    """Zone names for reader certificates, sorted, once each; PkiError names a bad one."""
    out: set[str] = set()
    for name in names:
        if not _NAME.match(name):
            raise PkiError(f"zone {name!r}: a zone name is 1-63 of a-z, 0-9 and '-'")
        out.add(name)
    return sorted(out)


def zone_reader_cn(zone: str) -> str:
    """The CN of a zone's log reader certificate (core/ checks it)."""
    return f"{zone}.{ZONE_UNIT}.{DOMAIN}"


def plan(dcs: dict[str, Sequence[IPAddress]], core_ips: Sequence[IPAddress],
         operators: dict[str, str], zones: Iterable[str] = ()) -> list[Party]:
    """Every certificate for these DCs (name → addresses), core, operators
    and zone log readers."""
    parties = [Party(f"agents/{dc}", f"{dc}.dc.{DOMAIN}", (f"{dc}.dc.{DOMAIN}",), tuple(ips),
                     server=True, client=True) for dc, ips in sorted(dcs.items())]
    parties.append(Party("core/core", f"core.{DOMAIN}", (f"core.{DOMAIN}",), tuple(core_ips),
                         server=True, client=True))
    parties.append(Party("prometheus", f"prometheus.core.{DOMAIN}", client=True))
    parties += [Party(f"operators/{name}", name, client=True, role=role)
                for name, role in sorted(operators.items())]
    parties += [Party(f"zones/{zone}", zone_reader_cn(zone), client=True, role=ZONE_UNIT)
                for zone in zone_names(zones)]
    return parties


def plan_from_topology(path: Path, operators: dict[str, str],
                       zones: Iterable[str] = ()) -> list[Party]:
    """The parties of a lab topology file (lab/topology.yaml's schema): a
    reader for each of its zones, and for each of `zones` besides."""
    from lab.topology import TopologyError, load_topology  # the network config's loader
    try:
        topo = load_topology(path)
    except (OSError, TopologyError) as e:
        raise PkiError(f"{path}: {e}") from None
    def addresses(name: str) -> list[IPAddress]:
        return [a for link in topo.node(name).links for a in (link.v4, link.v6) if a]

    if "core" not in {n.name for n in topo.nodes}:
        raise PkiError(f"{path}: no host named core")
    return plan({dc: addresses(dc) for dc in topo.dc_names()}, addresses("core"), operators,
                [z.name for z in topo.zones] + list(zones))


# --------------------------------------------------------------------------- running


def _due(stem: Path, now: dt.datetime) -> str | None:
    """Why this certificate is to be issued now, or None if it is fine."""
    crt, key = stem.with_name(stem.name + ".crt"), stem.with_name(stem.name + ".key")
    if not crt.is_file() or not key.is_file():
        return "missing"
    try:
        cert = x509.load_pem_x509_certificate(crt.read_bytes())
    except ValueError:
        return "unreadable"
    if cert.not_valid_after_utc - now < RENEW_BEFORE:
        return "expires soon"
    return None


def run(dir: Path, parties: Sequence[Party], rotate: bool = False, dry_run: bool = False
        ) -> list[tuple[Party, str]]:
    """Issue what is due (everything with `rotate`); returns (party, why)."""
    now = dt.datetime.now(dt.UTC)
    due = [(p, "rotate" if rotate else why) for p in parties
           if (why := _due(dir / p.path, now)) is not None or rotate]
    if dry_run or not due:
        return due
    ca, ca_key = load_or_make_ca(dir)
    for party, _ in due:
        cert, key = issue(ca, ca_key, party.common_name, dns=party.dns, ips=party.ips,
                          server=party.server, client=party.client, unit=party.role)
        write_pair(dir / party.path, cert, key)
    return due


def describe(crt: Path) -> str:
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(v) for v in san.get_values_for_type(x509.DNSName)] + \
            [str(v) for v in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = []
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        uses = ["server" if u == ExtendedKeyUsageOID.SERVER_AUTH else "client" for u in eku]
    except x509.ExtensionNotFound:
        uses = ["ca"]
    unit = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    role = f" role={unit[0].value}" if unit else ""
    return (f"{crt}: {cert.subject.rfc4514_string()} [{'+'.join(uses)}]{role} until "
            f"{cert.not_valid_after_utc:%Y-%m-%d}" + (f" SAN {', '.join(names)}" if names else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="privedge-pki", description=__doc__.split("\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", type=Path, help="the PKI directory")
    p.add_argument("--topology", type=Path,
                   default=Path(__file__).resolve().parent.parent / "lab" / "topology.yaml",
                   help="the network config (default: the lab's)")
    p.add_argument("--operator", action="append", default=[], metavar="NAME=ROLE",
                   help=f"an operator certificate; ROLE one of {', '.join(ROLES)}")
    p.add_argument("--zone", action="append", default=[], metavar="NAME",
                   help="a zone log reader certificate besides the topology's zones")
    p.add_argument("--rotate", action="store_true", help="reissue every certificate (same CA)")
    p.add_argument("--dry-run", action="store_true", help="say what would be issued; write nothing")
    p.add_argument("--show", action="store_true", help="list the certificates in DIR")
    a = p.parse_args(argv)
    if a.show:
        for crt in sorted(a.dir.rglob("*.crt")):
            print(describe(crt))
        return 0
    try:
        parties = plan_from_topology(a.topology, operator_roles(a.operator), a.zone)
        done = run(a.dir, parties, rotate=a.rotate, dry_run=a.dry_run)
    except PkiError as e:
        print(f"privedge-pki: {e}", file=sys.stderr)
        return 1
    verb = "would issue" if a.dry_run else "issued"
    for party, why in done:
        print(f"{verb} {party.path} ({why})")
    if not done:
        print(f"{a.dir}: every certificate is present and valid for {RENEW_BEFORE.days}+ days")
    return 0


if __name__ == "__main__":
    sys.exit(main())
