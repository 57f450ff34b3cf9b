"""An idle authenticated connection holds no greenlet in its worker (issue 25):
reads run in the event loop's I/O callbacks, so only application code and a
waiting send have a greenlet. Counted in a real ``wse-sync serve`` worker with
bench/churn_app.py's ``stats`` RPC (every live greenlet, and how many of them
wait parked in the bounded pool of handler greenlets)."""
import pytest

from helpers import serve_process, wait_for
from wse_sync import WseClient

APP = "bench/churn_app.py:server"
IDLE = 60
pytestmark = pytest.mark.timeout(120)


def busy_greenlets(client: WseClient) -> tuple:
    stats = client.call("stats")
    return stats["greenlets"] - stats["parked"], stats["connections"]


def test_idle_connections_hold_no_greenlet():
    with serve_process(APP) as sp:
        probe = WseClient(sp.url)
        probe.connect("probe")
        clients = []
        try:
            before, conns = busy_greenlets(probe)
            assert conns == 1
            for i in range(IDLE):
                c = WseClient(sp.url)
                c.connect(f"idle{i}")
                clients.append(c)
            after, conns = busy_greenlets(probe)
            assert conns == 1 + IDLE
            # one greenlet per connection (the old design) would add IDLE here
            assert after - before < 5, (before, after)
            # and every one of them is served: an RPC on each, then a message back
            for c in clients[::10]:
                assert c.call("stats")["connections"] == 1 + IDLE
            for c in clients:
                c.close()
            wait_for(lambda: busy_greenlets(probe)[1] == 1)
            assert busy_greenlets(probe)[0] - before < 5
        finally:
            for c in clients:
                c.close()
            probe.close()
