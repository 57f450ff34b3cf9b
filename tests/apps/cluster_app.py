"""App for multi-worker tests: every welcome and RPC answer tells the worker pid."""
import os
import time

from wse_sync import WseServer


def identify(identity, meta, accept, refuse, **kwargs):
    if not identity:
        refuse()
        return
    accept(identity, {"pid": os.getpid()})


server = WseServer(identify=identify, conn_per_user=int(os.environ.get("WSE_TEST_CPU", "3")))
events = []


@server.when.joined
def _joined(client, meta):
    events.append(["joined", client.cid, os.getpid()])
    server.broadcast("ev", ["joined", client.cid, os.getpid()])


@server.when.left
def _left(client, code, reason):
    events.append(["left", client.cid, os.getpid(), code, reason])
    server.broadcast("ev", ["left", client.cid, os.getpid(), code, reason])


@server.register("pid")
def _pid(conn, payload):
    return os.getpid()


@server.register("clients")
def _clients(conn, payload):
    return {str(cid): sorted(ident.conns) for cid, ident in server.clients.items()}


@server.register("count")
def _count(conn, payload):
    return len(server.clients)


@server.register("send")
def _send(conn, payload):
    server.send(payload["cid"], payload["type"], payload.get("payload"))
    return True


@server.register("broadcast")
def _broadcast(conn, payload):
    server.broadcast(payload["type"], payload.get("payload"))
    return True


@server.register("drop_client")
def _drop_client(conn, payload):
    server.drop_client(payload["cid"], payload.get("reason", ""))
    return True


@server.register("call_conn")
def _call_conn(conn, payload):
    """Call an RPC on every connection of a user (local or remote)."""
    ident = server.clients.get(payload["cid"])
    if ident is None:
        return None
    out = {}
    for conn_id, c in ident.conns.items():
        try:
            out[conn_id] = ["ok", c.call(payload["rp"], payload.get("payload"),
                                         timeout=payload.get("timeout"))]
        except Exception as exc:  # noqa: BLE001 - reported to the test
            out[conn_id] = ["err", getattr(exc, "code", repr(exc)), getattr(exc, "details", None)]
    return out


@server.register("send_conns")
def _send_conns(conn, payload):
    ident = server.clients.get(payload["cid"])
    for c in (ident.conns.values() if ident else []):
        for i in range(payload.get("count", 1)):
            c.send(payload["type"], i)
    return True


@server.register("events")
def _events(conn, payload):
    return events


@server.register("ident_send")
def _ident_send(conn, payload):
    """WseIdentity.send, from the identity this worker sees in server.clients."""
    server.clients[payload["cid"]].send(payload["type"], payload.get("payload"))
    return True


@server.register("drop_conn")
def _drop_conn(conn, payload):
    """Drop one connection (local or remote) of a user, by conn_id."""
    server.clients[payload["cid"]].conns[payload["conn_id"]].drop(payload.get("reason", ""))
    return True


@server.register("call_stale")
def _call_stale(conn, payload):
    """Keep a connection object, tell the caller ("captured"), wait until that
    connection has left server.clients, then call it: the object is stale."""
    import gevent

    target = server.clients[payload["cid"]].conns[payload["conn_id"]]
    conn.send("captured", payload["conn_id"])
    for _ in range(500):
        ident = server.clients.get(payload["cid"])
        if ident is None or payload["conn_id"] not in ident.conns:
            break
        gevent.sleep(0.02)
    else:
        return ["still-there"]
    try:
        return ["ok", target.call(payload["rp"], None, timeout=payload.get("timeout"))]
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return ["err", getattr(exc, "code", repr(exc)), getattr(exc, "details", None)]


# freeze_when_alone: once this worker's own connections drop to ``alone``,
# the 'disconnected' handler holds the whole loop for ``seconds`` (a worker
# that has sent its last leaves and has not yet run what the broker answers)
_local = {"n": 0, "freeze": None}


@server.when.connected
def _connected(conn):
    _local["n"] += 1


@server.when.disconnected
def _disconnected(conn, code, reason):
    _local["n"] -= 1
    freeze = _local["freeze"]
    if freeze is not None and _local["n"] <= freeze[0]:
        _local["freeze"] = None
        until = time.monotonic() + freeze[1]
        while time.monotonic() < until:  # (no yield: the loop stands still)
            pass


@server.register("freeze_when_alone")
def _freeze_when_alone(conn, payload):
    _local["freeze"] = (payload["alone"], payload["seconds"])
    return True


@server.register("storm")
def _storm(conn, payload):
    """``greenlets`` greenlets each doing ~0.1 ms of work per turn of the loop
    for ``seconds``: a busy worker (every greenlet yields), not a hung one."""
    import gevent

    until = time.monotonic() + payload["seconds"]

    def work():
        while time.monotonic() < until:
            spin = time.monotonic() + 0.0001
            while time.monotonic() < spin:
                pass
            gevent.sleep(0)

    for _ in range(payload["greenlets"]):
        gevent.spawn(work)
    return True
