"""An app for the admission limits' test: its code sets
max_unauthenticated_per_ip=2 and max_identify=1; identify takes a while and
counts how many run at once (RPC ``peak``)."""
import gevent

from wse_sync import WseServer

_identify = {"running": 0, "peak": 0}


def identify(identity, accept, **_):
    _identify["running"] += 1
    _identify["peak"] = max(_identify["peak"], _identify["running"])
    try:
        gevent.sleep(0.3)
    finally:
        _identify["running"] -= 1
    accept(identity)


server = WseServer(identify=identify, max_unauthenticated_per_ip=2, max_identify=1)


@server.register("peak")
def _peak(conn, payload):
    return _identify["peak"]
