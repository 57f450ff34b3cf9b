"""An app for tests/processes/test_nginx.py: tells a client where the server thinks it
comes from (``conn.remote_addr``: X-Forwarded-For when the peer is a
trusted proxy, else the socket's peer)."""
import os

from wse_sync import WseServer


def identify(identity, accept, refuse, **_):
    if identity:
        accept(identity, {"pid": os.getpid()})
    else:
        refuse()


server = WseServer(identify=identify, conn_per_user=10)


@server.register("whoami")
def whoami(conn, payload):
    return conn.remote_addr


@server.register("echo")
def echo(conn, payload):
    return payload


@server.channel.on("push")
def push(conn, payload):
    # a message the server sends on its own (after the RPC answers)
    conn.send("pushed", payload)
