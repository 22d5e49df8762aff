"""testssl.sh shows nothing worse for the agent than for nginx with Mozilla's
"intermediate" config (bench/testssl.py does the scanning and the judging).

Real processes on 127.0.0.1 with the same lab certificates: nginx is scanned
once, the agent twice, with `unknown_sni` set to a default zone and to
`refuse`. A difference the project chose (INTENTIONAL, NO_SNI) or a failed
check that a direct check of the same property passes is shown with its
reason, never counted silently. Needs testssl.sh, nginx and openssl; fails,
naming them, when they are missing. About two and a half minutes.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.testssl import Scan, Setup, compare, find_testssl, table

TOOLS = {"testssl.sh": find_testssl, "nginx": lambda: shutil.which("nginx"),
         "openssl": lambda: shutil.which("openssl")}


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    missing = [name for name, find in TOOLS.items() if not find()]
    if missing:
        pytest.fail(f"this test needs {' and '.join(missing)}: make setup installs them "
                    "(apt-get install testssl.sh nginx-light openssl)", pytrace=False)
    # Not pytest's tmp_path: nginx's worker runs as nobody when we are root
    # and must reach the document root, which pytest's 0700 base forbids.
    work = Path(tempfile.mkdtemp(prefix="pe-test-testssl-"))
    work.chmod(0o755)
    try:
        yield Setup(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def nginx(setup: Setup) -> Scan:
    return setup.scan_nginx()


@pytest.mark.parametrize("unknown_sni", ["www", "refuse"])
def test_nothing_worse_than_nginx(setup: Setup, nginx: Scan, unknown_sni: str) -> None:
    ours = setup.scan_agent(unknown_sni)
    rows = compare(nginx.findings, ours.findings, unknown_sni == "refuse", ours.explained)
    worse = [r for r in rows if r.verdict == "worse"]
    assert not worse, (f"testssl rates the agent (unknown_sni: {unknown_sni}) worse than "
                       f"nginx:\n{table(worse)}\n\nall differences:\n{table(rows)}")
    # The scan reached the server with its zone's name either way ...
    assert ours.sni["zone's name"].startswith("served www.example.com"), ours.sni
    # ... and unknown names and SNI-less clients get what the config says.
    for case in ("unknown name", "no SNI"):
        if unknown_sni == "refuse":
            assert ours.sni[case].startswith("refused"), (case, ours.sni)
        else:
            assert ours.sni[case].startswith("served www.example.com"), (case, ours.sni)
