"""``serve``'s workers and broker run the supervisor's own wse_sync
(core/children.py), even from a directory that holds another ``wse_sync/``:
``python -m wse_sync`` in the children would import that one (a checkout
shadowing the installed build, its hot path compiled or not)."""
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from helpers import ROOT, free_port, wait_for
from wse_sync import WseClient

pytestmark = pytest.mark.timeout(60)


def test_children_ignore_a_wse_sync_in_the_working_directory():
    script = shutil.which("wse-sync") or os.path.join(os.path.dirname(sys.executable),
                                                      "wse-sync")
    tmp = tempfile.mkdtemp(prefix="wse-decoy-")
    try:
        os.mkdir(os.path.join(tmp, "wse_sync"))
        with open(os.path.join(tmp, "wse_sync", "__init__.py"), "w") as f:
            f.write("raise ImportError('the decoy wse_sync in the working directory')\n")
        port = free_port()
        proc = subprocess.Popen(
            [script, "serve", os.path.join(ROOT, "examples/echo/app.py") + ":server",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
            cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            client = WseClient(f"ws://127.0.0.1:{port}/")
            wait_for(lambda: _connects(client), timeout=20)
            assert client.call("echo", {"x": 1}) == {"x": 1}
            client.close()
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=20)
        assert "decoy" not in err, err[-3000:]
        assert proc.returncode == 0, err[-3000:]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _connects(client: WseClient) -> bool:
    try:
        client.connect("someone")
        return True
    except Exception:
        return False
