"""An existing WSGI app with a WseServer mounted on /ws, for tests/processes/test_embedding.py
and tests/processes/test_deploy.py (pywsgi and gunicorn).

Plain paths: /hello (headers), /stream (a chunked streaming body), /boom (the
app raises), /echo (POST body back), /ws (a plain GET: the app's own page).
The WseServer: identity = cid; welcome {"pid", "cid"}; RPCs ``send_to``,
``broadcast``, ``clients``, ``conn_count``, ``drop``; joined/left are
broadcast as ``event`` messages so tests can count them cluster-wide.
"""
import os

import gevent

from wse_sync import WseServer, mount


def plain_app(environ, start_response):
    path = environ.get("PATH_INFO", "")
    if path == "/stream":
        start_response("200 OK", [("Content-Type", "text/plain"), ("X-Streamed", "yes")])

        def body():
            for i in range(5):
                yield f"chunk{i}\n".encode()
        return body()
    if path == "/boom":
        raise RuntimeError("the app failed on purpose")
    if path == "/echo":
        length = int(environ.get("CONTENT_LENGTH") or 0)
        data = environ["wsgi.input"].read(length) if length else b""
        start_response("201 Created", [("Content-Type", "application/octet-stream"),
                                       ("Content-Length", str(len(data)))])
        return [data]
    if path == "/pid":
        body = str(os.getpid()).encode()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [body]
    text = (f"app {environ['REQUEST_METHOD']} {path} q={environ.get('QUERY_STRING', '')}"
            f" x={environ.get('HTTP_X_TEST', '')}").encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-App", "plain"),
                              ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"),
                              ("Content-Length", str(len(text)))])
    return [text]


def identify(identity, accept, refuse, **_):
    if identity:
        accept(identity, {"pid": os.getpid(), "cid": identity})
    else:
        refuse()


def make_server(**options):
    """A fresh WseServer with the test RPCs and events."""
    server = WseServer(identify=identify, conn_per_user=2, **options)

    @server.register("send_to")
    def send_to(conn, payload):
        server.send(payload["cid"], payload["type"], payload.get("payload"))
        return True

    @server.register("broadcast")
    def broadcast(conn, payload):
        server.broadcast(payload["type"], payload.get("payload"))
        return True

    @server.register("clients")
    def clients(conn, payload):
        return sorted(server.clients)

    @server.register("conn_count")
    def conn_count(conn, payload):
        ident = server.clients.get(payload)
        return len(ident.conns) if ident is not None else 0

    @server.register("drop")
    def drop(conn, payload):
        server.drop_client(payload, "dropped-by-test")
        return True

    @server.when.joined
    def on_joined(client, meta):
        server.broadcast("event", ["joined", client.cid, os.getpid()])

    @server.when.left
    def on_left(client, code, reason):
        server.broadcast("event", ["left", client.cid, os.getpid()])
        # a slow handler (test_deploy: does the worker wait for it on SIGTERM?)
        slow = float(os.environ.get("WSE_TEST_SLOW_LEFT", "0"))
        if slow:
            gevent.sleep(slow)
            with open(os.environ["WSE_TEST_LEFT_LOG"], "a") as f:
                f.write(f"{client.cid} {code}\n")

    return server


server = make_server()
application = mount(plain_app, server, "/ws")
