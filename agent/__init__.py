"""The privedge edge agent.

TLS settings Python cannot make itself (the key exchange groups of
Mozilla's "intermediate" profile) come from agent/l7/openssl.cnf. OpenSSL
reads OPENSSL_CONF once, when it is first used in a process, so it is set
here, before any agent module imports ssl or hashlib; an operator's own
OPENSSL_CONF wins. tests/unit/test_tls_profile.py checks the outcome.
"""

import os
from pathlib import Path

os.environ.setdefault("OPENSSL_CONF", str(Path(__file__).resolve().parent / "l7" / "openssl.cnf"))
