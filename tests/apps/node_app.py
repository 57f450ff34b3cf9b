"""The app that tests/node/flows.mjs drives (see tests/processes/test_node_protocol.py).

``server`` is a plain server; ``cra_server`` has challenge-response auth on.
Both run with one worker, so the module-level records below see every
connection and the JS side reads them back through RPCs.
"""
from wse_sync import WseError, WseServer

# conn_id -> [code, reason] of its `disconnected` event
disconnects = {}
# conn_id -> [[type, payload], ...] of its `ignored` events
ignored = {}
# conn_id -> [error code, ...] of its `error` events
errors = {}
# every identity identify() was called with, in order
identified = []


def identify(identity, meta, accept, refuse, challenge, conn_id):
    identified.append(identity)
    if identity == "bad":
        refuse()
    elif identity == "falsy":
        accept("", {"never": "sent"})
    elif identity == "raise":
        raise RuntimeError("identify failed on purpose")
    elif isinstance(identity, dict):
        accept(identity["user"], {"identity": identity})
    elif identity == "no-welcome-payload":
        accept(identity)
    elif challenge is not None:
        quest, response = challenge["quest"], challenge["response"]
        if response == quest["a"] + quest["b"]:
            accept(identity, {"cra": "ok", "challenge": challenge})
        else:
            refuse()
    else:
        accept(identity or f"anon-{conn_id}", {"hello": identity, "conn_id": conn_id})


def challenge_generator(identity, meta, quest, refuse):
    if identity == "cra-refuse":
        refuse()
    else:
        quest({"a": 2, "b": 3})


def _fail_plain(conn, payload):
    raise ValueError("boom")


def _fail_wse(conn, payload):
    raise WseError("app.custom", {"field": 1})


def _fail_wse_own_rpc(conn, payload):
    raise WseError("app.custom", {"rpc": "mine"})


def _whoami(conn, payload):
    return {"identity": conn.identity, "meta": conn.meta, "cid": conn.cid,
            "conn_id": conn.conn_id}


def make_server(cra=False):
    server = WseServer(identify=identify)
    if cra:
        server.use_challenge(challenge_generator)

    server.register("whoami", _whoami)
    server.register("echo", lambda conn, payload: payload)
    server.register("nothing", lambda conn, payload: None)
    server.register("fail_plain", _fail_plain)
    server.register("fail_wse", _fail_wse)
    server.register("fail_wse_own_rpc", _fail_wse_own_rpc)
    server.register("disconnect_of", lambda conn, conn_id: disconnects.get(conn_id))
    server.register("ignored_of", lambda conn, conn_id: ignored.get(conn_id, []))
    server.register("errors_of", lambda conn, conn_id: errors.get(conn_id, []))
    server.register("identified", lambda conn, payload: list(identified))

    @server.channel.on("poke")
    def poke(conn, payload):
        conn.send("x")
        conn.send("x", None)

    @server.channel.on("echo")
    def echo(conn, payload):
        conn.send("echoed", payload)

    @server.channel.on("ask")
    def ask(conn, payload):
        # server -> client RPC; the outcome goes back to the client as a message
        rp = payload["rp"]
        try:
            result = conn.call(rp, payload.get("payload"), timeout=10)
        except WseError as exc:
            conn.send("asked", {"rp": rp, "error": {"code": exc.code, "details": exc.details}})
        else:
            conn.send("asked", {"rp": rp, "ok": result})

    @server.channel.on("drop_me")
    def drop_me(conn, reason):
        if reason is None:
            conn.drop()
        else:
            conn.drop(reason)

    @server.channel.on("drop_client")
    def drop_client(conn, payload):
        server.drop_client(conn.cid)

    @server.channel.on("restart_me")
    def restart_me(conn, payload):
        conn.close(1012, "")

    @server.when.disconnected
    def on_disconnected(conn, code, reason):
        disconnects[conn.conn_id] = [code, reason]

    @server.when.ignored
    def on_ignored(conn, type_, payload):
        ignored.setdefault(conn.conn_id, []).append([type_, payload])

    @server.when.error
    def on_error(error, conn):
        if conn is not None:
            errors.setdefault(conn.conn_id, []).append(error.code)

    return server


server = make_server()
cra_server = make_server(cra=True)
