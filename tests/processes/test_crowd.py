"""The crowd harness (bench/crowd.py) at CI size: 2,500 real WebSocket users on
2 workers and a separate broker, from 2 client processes over 8 source
addresses, through paced cross-worker sends, a rolling restart, a worker
kill -9 and a broker kill -9, with every invariant of the harness checked
after each step.

A CI-sized crowd does not load the server the way 40,000 users do (a
reconnect storm of 1,250 users queues handshakes for a fraction of a
second), so the harness scales the server's handshake-bound timeouts
(--header-timeout, --handshake-timeout, --auth-timeout: 10 s, sized for
a large crowd) down in proportion to users / 40,000, with a floor of 1 s
(crowd.py, ``Harness.server_flags``), to keep the same pressure on them.
"""
import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT, UNIT

USERS = 2500
TIME_LIMIT = int(240 * UNIT)


@pytest.mark.slow
@pytest.mark.timeout(TIME_LIMIT + 120)
def test_crowd_ci_size(tmp_path):
    out_json = tmp_path / "crowd.json"
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "crowd.py"), "--users", str(USERS),
         "--workers", "2", "--client-procs", "2", "--addresses", "8",
         "--steps", "connect,paced,rolling,worker-kill,broker-kill",
         "--senders", "50", "--rate", "5", "--send-seconds", "5",
         "--time-limit", str(TIME_LIMIT), "--json", str(out_json)],
        capture_output=True, text=True, timeout=TIME_LIMIT + 90, cwd=ROOT)
    report = out.stdout[-12000:] + out.stderr[-4000:]
    print(report)
    assert out_json.exists(), report
    result = json.loads(out_json.read_text())
    steps = [s["step"] for s in result["steps"]]
    assert steps == ["connect", "paced", "rolling", "worker-kill", "broker-kill"], report
    for step in result["steps"]:
        assert "error" not in step and "skipped" not in step, report
    # the sends went somewhere: the paced step's notes were accepted and checked
    paced = result["steps"][1]
    assert paced["check"]["notes"].get("accepted", 0) > 0, report
    failed = {inv: [s["step"] for s in result["steps"] if not s["invariants"][inv]]
              for inv, ok in result["invariants"].items() if not ok}
    assert not failed, f"invariants failed (in steps): {failed}\n{report}"
    assert result["pass"] and out.returncode == 0, report
