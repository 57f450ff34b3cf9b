"""An app whose RPC takes a while, for the graceful-stop test."""
import os
import time

from wse_sync import WseServer

server = WseServer(identify=lambda identity, accept, **kw: accept(identity or "anon"))


@server.register("slow")
def slow(conn, payload):
    with open(os.environ["WSE_TEST_MARK"], "a") as f:
        f.write("started\n")
    time.sleep(payload)  # monkey-patched in the worker: only this greenlet waits
    with open(os.environ["WSE_TEST_MARK"], "a") as f:
        f.write("finished\n")
    return "done"
