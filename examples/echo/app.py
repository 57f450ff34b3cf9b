"""The smallest wse_sync server: echo messages and RPCs, greet users.

Run:  wse-sync serve examples/echo/app.py:server --port 4200 --workers 1
"""
import os

from wse_sync import WseServer


def identify(identity, meta, accept, refuse, **kwargs):
    # any non-empty identity is a user id here; a real app checks a token
    if identity:
        accept(identity, {"hello": identity, "pid": os.getpid()})
    else:
        refuse()


server = WseServer(identify=identify, conn_per_user=3, port=4200)


@server.register("echo")
def echo(conn, payload):
    return payload


@server.channel.on("say")
def say(conn, payload):
    conn.send("said", payload)


@server.when.joined
def joined(client, meta):
    server.broadcast("online", client.cid)
