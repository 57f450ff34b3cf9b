"""Several workers, one user map: message a user whose socket is on another worker.

    wse-sync serve examples/cluster/app.py:server --workers 3 --port 4400
    python examples/cluster/client.py ws://127.0.0.1:4400/

Every worker imports this module; `server.send` reaches the user's sockets
wherever they are (through the broker), `server.clients` lists everyone in
the cluster, and `joined`/`left` fire once per user for the whole cluster.
"""
import os

from wse_sync import WseError, WseServer


def identify(identity, accept, refuse, **_):
    if isinstance(identity, str) and identity:
        accept(identity, {"pid": os.getpid()})
    else:
        refuse()


server = WseServer(identify=identify, conn_per_user=5, port=4400)


@server.register("dm")
def dm(conn, payload):
    """A direct message: {"to": cid, "text": ...}."""
    to = payload.get("to")
    if to not in server.clients:
        raise WseError("chat.no-such-user", {"to": to})
    server.send(to, "dm", {"from": conn.cid, "text": payload.get("text"), "sender_pid": os.getpid()})
    return {"sent_by_pid": os.getpid(), "connections": len(server.clients[to].conns)}


@server.register("online")
def online(conn, payload):
    return sorted(server.clients)


@server.when.joined
def joined(client, meta):
    server.broadcast("online", client.cid)


@server.when.left
def left(client, code, reason):
    server.broadcast("offline", client.cid)
