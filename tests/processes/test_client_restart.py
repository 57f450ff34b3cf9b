"""The Python WseClient against a real ``wse-sync serve`` process: it reconnects
to the process started again on the same port (the in-process client tests are
tests/inproc/test_client.py)."""
import os

from helpers import UNIT, ServerProcess, serve_process, wait_for
from wse_sync import WSE_STATUS, WseClient


def test_client_comes_back_after_a_server_process_restart():
    app = os.path.join("tests", "apps", "cluster_app.py") + ":server"
    with serve_process(app) as sp:
        c = WseClient(sp.url, reconnect=True)
        ready = []
        c.when.ready(ready.append)
        first_pid = c.connect("survivor")["pid"]
        assert c.call("pid") == first_pid
        sp.proc.send_signal(15)  # SIGTERM: a graceful stop closes with 1012
        wait_for(lambda: c.close_status is not None, timeout=20 * UNIT)
        assert c.close_status == (1012, "")
        assert c.status == WSE_STATUS.RE_CONNECTING
        assert sp.stop() == 0
        again = ServerProcess(["serve", app, "--host", "127.0.0.1", "--port", str(sp.port),
                               "--workers", "1"])
        try:
            again.wait_line(r"worker \d+ serving")
            wait_for(lambda: len(ready) == 2, timeout=20 * UNIT)
            assert ready[1]["pid"] != first_pid
            assert c.call("pid") == ready[1]["pid"]
            c.close()
        finally:
            assert again.stop() == 0
