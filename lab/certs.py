"""A throwaway PKI for the lab and the tests: one CA, one certificate per zone.

    python -m lab.certs DIR shop-eu=shop.example.eu www=www.example.com,*.example.com

writes DIR/ca.crt, DIR/ca.key, DIR/<zone>.crt + DIR/<zone>.key (ECDSA P-256)
and DIR/<zone>.rsa.crt + DIR/<zone>.rsa.key (RSA 2048), the layout the L7
front end reads (agent/l7/server.py): it offers both, each client gets the
kind it asks for. SHA-256 signatures by an ECDSA CA. Keys are
written 0600, each file atomically (temp file, then rename): control/pki.py
issues them. An existing CA in DIR is reused, so clients that trust ca.crt
keep trusting new zones. Lab only: the keys sit unencrypted on disk, which
production must not do.
"""

from __future__ import annotations

import sys
from pathlib import Path

from control.pki import issue, load_or_make_ca, write_pair

CA_NAME = "privedge lab CA"
ORGANIZATION = "privedge lab"


def make_lab_pki(dir: Path, zones: dict[str, list[str]]) -> Path:
    """Write ca.crt, and <zone>.crt/.key (ECDSA) and <zone>.rsa.crt/.key (RSA)
    for each zone (its hostnames as SANs).

    Returns the path of ca.crt, the trust anchor for clients. The zone's
    .crt is its chain without the root (here: the leaf alone).
    """
    dir = Path(dir)
    ca, ca_key = load_or_make_ca(dir, CA_NAME, ORGANIZATION)
    for zone, hostnames in zones.items():
        if not hostnames:
            raise ValueError(f"zone {zone}: at least one hostname is needed")
        for kind, stem in (("ecdsa", zone), ("rsa", f"{zone}.rsa")):
            cert, key = issue(ca, ca_key, hostnames[0], dns=hostnames, server=True, kind=kind,
                              organization=ORGANIZATION)
            write_pair(dir / stem, cert, key)
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
