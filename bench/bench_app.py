"""The wse_sync app the benchmarks run (``wse-sync serve bench/bench_app.py:server``).

- identify accepts any identity as the user id (welcome: ``{}``);
- RPC ``echo``: returns its payload;
- channel ``ping``: answered with ``conn.send("pong", payload)``;
- RPC ``fanout`` {count}: ``server.broadcast("tick", i)`` for i < count;
- RPC ``send_to`` {cids, count}: ``server.send(cid, "tick", i)`` for i < count, each cid;
- RPC ``pid``: this worker's pid (the cross-worker scenario places its sockets with it).
"""
import os

from wse_sync import WseServer


def identify(identity, accept, **kwargs):
    accept(identity if identity not in (None, "") else "anonymous", {})


server = WseServer(
    identify=identify,
    conn_per_user=100_000,
    rpc_timeout=120,
    handshake_timeout=120.0,
    auth_timeout=120.0,
    ping_interval=600.0,
    ping_timeout=600.0,
    max_send_queue=64 * 1024 * 1024,
    broker_timeout=30.0,
)


@server.register("echo")
def echo(conn, payload):
    return payload


@server.channel.on("ping")
def ping(conn, payload):
    conn.send("pong", payload)


@server.register("fanout")
def fanout(conn, payload):
    count = int(payload["count"])
    for i in range(count):
        server.broadcast("tick", i)
    return count


@server.register("send_to")
def send_to(conn, payload):
    cids = payload["cids"]
    count = int(payload["count"])
    for i in range(count):
        for cid in cids:
            server.send(cid, "tick", i)
    return count * len(cids)


@server.register("pid")
def pid(conn, payload):
    return os.getpid()
