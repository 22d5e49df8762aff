"""Who is calling: a client certificate of the network's CA, read as a
caller with a role (control/pki.py puts operators' roles in the OU).

Light on imports on purpose: the network CLI and the control plane's
generation server use it, and a CLI's start-up is part of every apply.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from control.audit import fingerprint
from control.pki import ROLES

API_PORT = 9444                 # the agents' API (agent/api.py)
CONTROL_PORT = 9445             # the control plane's generations (control/genserver.py)
RANK = {role: i for i, role in enumerate(ROLES)}   # viewer < operator < admin


@dataclass(frozen=True)
class Caller:
    name: str          # the certificate's CN
    role: str | None   # viewer, operator, admin; None: not an operator's certificate
    certificate: str   # SHA-256 fingerprint


def caller_of(der: bytes) -> Caller:
    cert = x509.load_der_x509_certificate(der)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    role = str(ou[0].value) if ou and str(ou[0].value) in RANK else None
    return Caller(str(cn[0].value) if cn else "", role, fingerprint(der))
