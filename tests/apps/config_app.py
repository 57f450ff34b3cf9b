"""An app for tests/processes/test_config.py: its code sets some options, an RPC tells
what the worker runs with; ``boom`` raises, ``nobody`` is refused."""
import os

from wse_sync import WseServer

VERSION = 1


def identify(identity, accept, refuse, **_):
    if identity == "nobody":
        refuse()
    else:
        accept(identity, {"pid": os.getpid()})


server = WseServer(identify=identify, conn_per_user=2, max_message_size=1000,
                   ping_interval=30.0)


@server.register("options")
def _options(conn, payload):
    keys = ("max_message_size", "ping_interval", "health_path", "trusted_proxies",
            "rate_limit")
    out = {k: server.options[k] for k in keys}
    out["conn_per_user"] = server.conn_per_user
    return out


@server.register("version")
def _version(conn, payload):
    return VERSION


@server.register("boom")
def _boom(conn, payload):
    raise RuntimeError("kaboom")


class _Cycle:
    def __init__(self):
        self.me = self


@server.register("gc")
def _gc(conn, payload):
    """The worker's GC settings, and whether cyclic garbage made now is freed
    without an explicit gc.collect() (by allocating past the threshold)."""
    import gc
    import weakref
    freed = []
    # no collection while they are made (one then could move a cycle still
    # referenced from this frame to an older generation), so all start in gen 0
    gc.disable()
    try:
        for _ in range(100):
            weakref.finalize(_Cycle(), freed.append, 1)
    finally:
        gc.enable()
    keep = [[] for _ in range(3 * gc.get_threshold()[0] + 1000)]  # allocations
    del keep
    return {"threshold": list(gc.get_threshold()),
            "frozen": gc.get_freeze_count() if hasattr(gc, "get_freeze_count") else None,
            "freed": len(freed)}
