"""The short soak CI runs: churn across 3 workers, one worker and one broker kill;
on serve's own ipc broker, and on a CURVE tcp:// broker (kept by broker_keeper)."""
import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("link", [[], ["--curve"]], ids=["ipc", "curve"])
def test_short_soak(link):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "soak.py"),
                          "--duration", "25", "--kills", "2", *link],
                         capture_output=True, text=True, timeout=220)
    print(out.stdout[-4000:])
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "soak: OK" in out.stdout
    text = out.stdout
    counts = json.loads(text[text.index("\n{\n") + 1:text.rindex("\n}") + 2])
    assert counts["broker_kills"] >= 1 and counts["worker_kills"] >= 1
    assert counts["rpcs"] == counts["rpc_ok"] + counts["rpc_err"] > 0
    assert counts["joined"] == counts["left"] > 0
