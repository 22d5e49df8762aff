"""`sudo make demo`: the Regional Services story on the whole lab, for real.

The demo's main() runs with a namespace prefix of this run's own (hidden
option --prefix) and must pass every step, print the evidence a network
engineer would look for, and leave nothing behind: no namespace, no pin
directory, no state directory, no process.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import netns

from lab import demo
from lab.cluster import Lab
from lab.topology import load_topology

PID = os.getpid() % 100000


def leftovers(prefix: str) -> list[str]:
    spaces = [n for n in netns.listnetns() if n.startswith(prefix)]
    pins = [p.name for p in Path("/sys/fs/bpf").iterdir()
            if p.name.startswith(f"privedge-{prefix}")]
    state = [str(d) for d in [Lab(load_topology(), prefix=prefix).state_dir] if d.exists()]
    procs = subprocess.run(["pgrep", "-f", f"/run/privedge-lab/{prefix.rstrip('-')}/"],
                           capture_output=True, text=True).stdout.split()
    return spaces + pins + state + [f"process {p}" for p in procs]


@pytest.fixture()
def prefix(request) -> Iterator[str]:
    """A prefix of this test's own; whatever the demo leaves is removed."""
    p = f"{request.param}{PID}-"
    try:
        yield p
    finally:
        if leftovers(p):
            Lab(load_topology(), prefix=p).down()


@pytest.mark.parametrize("prefix", ["d"], indirect=True)
def test_the_story_passes_and_leaves_nothing(prefix: str, capsys):
    rc = demo.main(["--prefix", prefix])
    out = capsys.readouterr().out
    assert rc == 0, out
    steps = re.findall(r"^\[(\d)\] .*$", out, re.M)
    assert steps == ["1", "2", "3", "4", "5", "6", "7", "8"], out
    assert len(re.findall(r"^    PASS  ", out, re.M)) == 8, out
    assert "FAIL" not in out, out
    # 1: the topology, compactly
    assert re.search(r"^    dus   eu      Düsseldorf ", out, re.M), out
    assert re.search(r"^    attacker .* iad   \(denylisted\)$", out, re.M), out
    # 2 and 3: who answered Katerina, before and after her drive
    step2, step3, step4, step5, step6, step7, step8 = (
        out.split(f"[{n}] ")[1].split("\n[")[0] for n in (2, 3, 4, 5, 6, 7, 8))
    assert step2.count("200  dus (eu), zone") == 2, step2
    assert re.search(r"dus inet0 in_region +\+[1-9]", step2), step2
    assert "shop-eu +1, www +1" in step2, step2
    assert step3.count("200  fra (eu), zone shop-eu") == 2, step3
    assert "2001:db8:100::65" in step3, step3
    # 4: the US user, served in the EU through a tunnel, nothing readable on bb
    assert re.search(r"iad inet0 steer +\+[1-9][\d,]* packets, tunnelled to dus [\d,]+, "
                     r"fra [\d,]+", step4), step4
    assert "iad front end connections     +0 accepted" in step4, step4
    assert re.search(r"backbone capture +[\d,]+ frames: IPIP [1-9][\d,]*, 6in4 [1-9]", step4), \
        step4
    assert "marker found in capture: no" in step4, step4
    assert "200  iad" not in step4, step4
    # 5: the attacker's burst, every frame counted as denylisted at iad
    assert "sent 2,000 frames" in step5, step5
    assert re.search(r"iad inet0 denylist +\+2,000 packets", step5), step5
    assert re.search(r"dus bb0 decap +\+0 packets", step5), step5
    assert re.search(r"fra bb0 decap +\+0 packets", step5), step5
    assert "backbone capture              0 frames from the attacker" in step5, step5
    # 6: the L7 pipeline, request by request
    for line in ("the same again                              200  HIT",
                 "SQL injection in a query                    403",
                 "members page, following with a cookie jar   200"):
        assert line in step6, step6
    # 7: the core: every DC scraped, www's logs for www's certificate only
    assert re.search(r"^    iad   1 +\d+ +[1-9][\d]*$", step7, re.M), step7
    assert re.search(r"e\.g\. GET /static/demo-\w+\.css 200 (hit|miss) from 203\.0\.113\.10 "
                     r"via dus", step7), step7
    assert "the same read with shop-eu's certificate: HTTP 403" in step7, step7
    # 8: one apply reaches every DC; a mistake reaches none; the lab's own file undoes it
    assert "[200, 200, 200] before, [403, 403, 403] after" in step8, step8
    assert re.search(r"^    iad +generation 1 in \d+ ms$", step8, re.M), step8
    assert "is not an IPv4 or IPv6 prefix" in step8, step8
    assert "every DC at generation 2; the mistake changed nothing anywhere" in step8, step8
    # the summary and the verdict
    assert re.search(r"^RESULT: PASS, all 8 steps", out, re.M), out
    assert f"removed lab {prefix}: 3 agents stopped, 10 namespaces" in out, out
    assert leftovers(prefix) == []


@pytest.mark.parametrize("prefix", ["k"], indirect=True)
def test_keep_then_clean(prefix: str, capsys):
    assert demo.main(["--prefix", prefix, "--keep"]) == 0
    out = capsys.readouterr().out
    assert f"lab {prefix} kept up" in out and f"-m lab --prefix {prefix} status" in out, out
    assert len([n for n in netns.listnetns() if n.startswith(prefix)]) == 10

    # The single-link demo would take el-client and el-dus from under the lab.
    assert demo.main(["--prefix", prefix, "--filter-only"]) == 1
    assert "is up and uses" in capsys.readouterr().err

    assert demo.main(["--prefix", prefix, "--clean"]) == 0
    assert f"removed lab {prefix}: 10 namespaces" in capsys.readouterr().out
    assert leftovers(prefix) == []
    assert demo.main(["--prefix", prefix, "--clean"]) == 0
    assert "nothing left to remove" in capsys.readouterr().out
