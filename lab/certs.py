"""A throwaway PKI for the lab and the tests: one CA, one certificate per zone.

    python -m lab.certs DIR shop-eu=shop.example.eu www=www.example.com,*.example.com

writes DIR/ca.crt, DIR/ca.key, DIR/<zone>.crt + DIR/<zone>.key (ECDSA P-256)
and DIR/<zone>.rsa.crt + DIR/<zone>.rsa.key (RSA 2048), the layout the L7
front end reads (agent/l7/server.py): it offers both, each client gets the
kind it asks for. SHA-256 signatures by an ECDSA CA. Keys are
written 0600, each file atomically (temp file, then rename). An existing CA
in DIR is reused, so clients that trust ca.crt keep trusting new zones.
Lab only: the keys sit unencrypted on disk, which production must not do.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_NAME = "privedge lab CA"
CA_DAYS = 3650
LEAF_DAYS = 90
BACKDATE = dt.timedelta(hours=1)  # tolerate clocks of other namespaces/VMs a little behind


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically with `mode` from the first byte (no window at 0644)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; set it exactly
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "privedge lab"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca(dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Load the CA in `dir`, or make and write one."""
    crt, key = dir / "ca.crt", dir / "ca.key"
    if crt.is_file() and key.is_file():
        ca_key = serialization.load_pem_private_key(key.read_bytes(), password=None)
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key}: not an EC key; remove {dir}/ca.* to make a new CA")
        return x509.load_pem_x509_certificate(crt.read_bytes()), ca_key
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(CA_NAME))
        .issuer_name(_name(CA_NAME))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(key, _pem_key(ca_key), 0o600)
    _write(crt, _pem_cert(cert), 0o644)
    return cert, ca_key


LeafKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _leaf(zone: str, hostnames: list[str], ca: x509.Certificate,
          ca_key: ec.EllipticCurvePrivateKey, kind: str = "ecdsa"
          ) -> tuple[x509.Certificate, LeafKey]:
    key: LeafKey = (ec.generate_private_key(ec.SECP256R1()) if kind == "ecdsa"
                    else rsa.generate_private_key(public_exponent=65537, key_size=2048))
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hostnames[0] if hostnames else zone))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hostnames]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=kind == "rsa", data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def make_lab_pki(dir: Path, zones: dict[str, list[str]]) -> Path:
    """Write ca.crt, and <zone>.crt/.key (ECDSA) and <zone>.rsa.crt/.key (RSA)
    for each zone (its hostnames as SANs).

    Returns the path of ca.crt, the trust anchor for clients. The zone's
    .crt is its chain without the root (here: the leaf alone).
    """
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _ca(dir)
    for zone, hostnames in zones.items():
        if not hostnames:
            raise ValueError(f"zone {zone}: at least one hostname is needed")
        for kind, stem in (("ecdsa", zone), ("rsa", f"{zone}.rsa")):
            cert, key = _leaf(zone, hostnames, ca, ca_key, kind)
            _write(dir / f"{stem}.key", _pem_key(key), 0o600)
            _write(dir / f"{stem}.crt", _pem_cert(cert), 0o644)
    return dir / "ca.crt"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or not all("=" in a for a in args[1:]):
        print("usage: python -m lab.certs DIR ZONE=HOST[,HOST...] ...", file=sys.stderr)
        return 2
    zones = {z: [h for h in hosts.split(",") if h]
             for z, _, hosts in (a.partition("=") for a in args[1:])}
    ca = make_lab_pki(Path(args[0]), zones)
    print(f"{ca}: CA; certificates for {', '.join(zones)} in {ca.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
