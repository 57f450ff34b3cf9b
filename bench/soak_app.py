"""App for bench/soak.py: logs joined/left to a file that survives worker deaths."""
import json
import os

from wse_sync import WseServer

LOG = os.environ["WSE_SOAK_LOG"]


def identify(identity, accept, **kwargs):
    accept(identity, {"pid": os.getpid()})


server = WseServer(identify=identify, conn_per_user=2)


def _log(*event):
    with open(LOG, "a") as f:
        f.write(json.dumps(event) + "\n")


server.when.joined(lambda client, meta: _log("joined", client.cid, os.getpid()))
server.when.left(lambda client, code, reason: _log("left", client.cid, os.getpid(), code))


@server.register("echo")
def echo(conn, payload):
    return payload


@server.register("table")
def table(conn, payload):
    """This worker's own connections, and its pid."""
    return {"pid": os.getpid(), "conns": sorted(c.conn_id for c in server.hub.connections())}


@server.register("bcast")
def bcast(conn, payload):
    server.broadcast("tick", payload)
    return True


@server.register("send")
def send(conn, payload):
    server.send(payload, "direct", conn.cid)
    return True


@server.channel.on("msg")
def msg(conn, payload):
    conn.send("msg", payload)
