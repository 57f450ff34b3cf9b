"""A multi-user chat: a browser page speaking the wse protocol from plain JavaScript.

One command (one process, embedded broker), then open http://127.0.0.1:8000/ in
two browser tabs:

    python examples/chat/app.py --port 8000

Several workers sharing one broker, under gunicorn:

    gunicorn -c python:wse_sync.gunicorn_conf -w 2 -b 127.0.0.1:8000 --chdir examples/chat app:application

The page (static/index.html + static/chat.js, an ES module) imports /wse.js:
the JavaScript client shipped inside the wse_sync package
(wse_sync/static/wse.js, dependency-free, the API of the wse 4.x WseClient),
served here from the installed package. The server is a WseServer mounted on
/ws beside a tiny static-file WSGI app, on one port.
"""
if __name__ == "__main__":
    # first thing: handlers may block, only their greenlet must wait
    from gevent import monkey

    monkey.patch_all()

import importlib.resources  # noqa: E402
import mimetypes  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

from wse_sync import WseServer, mount  # noqa: E402

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
# the client the page imports: the one shipped in the package, not a copy
CLIENT_JS = importlib.resources.files("wse_sync") / "static" / "wse.js"


def identify(identity, accept, refuse, **_):
    name = str(identity or "").strip()
    if not name or len(name) > 32:
        refuse()
        return
    accept(name, {"name": name, "pid": os.getpid()})


server = WseServer(identify=identify, conn_per_user=5)


@server.channel.on("say")
def say(conn, text):
    text = str(text or "")[:1000]
    if text.strip():
        server.broadcast("said", {"from": conn.cid, "text": text, "at": time.time()})


@server.register("who")
def who(conn, payload):
    """Who is online, cluster-wide."""
    return sorted(server.clients, key=str)


@server.when.joined
def joined(client, meta):
    server.broadcast("joined", client.cid)


@server.when.left
def left(client, code, reason):
    server.broadcast("left", client.cid)


def static_app(environ, start_response):
    """Files of static/ (GET and HEAD); ``/`` is index.html, ``/wse.js`` the
    package's client."""
    path = environ.get("PATH_INFO", "/")
    if path == "/":
        path = "/index.html"
    name = os.path.normpath(path.lstrip("/"))
    full = os.path.join(STATIC, name)
    if environ.get("REQUEST_METHOD") in ("GET", "HEAD") and name == "wse.js":
        body = CLIENT_JS.read_bytes()
    elif (environ.get("REQUEST_METHOD") not in ("GET", "HEAD") or name.startswith("..")
            or os.path.isabs(name) or not os.path.isfile(full)):
        body = b"not found\n"
        start_response("404 Not Found", [("Content-Type", "text/plain"),
                                         ("Content-Length", str(len(body)))])
        return [body]
    else:
        with open(full, "rb") as f:
            body = f.read()
    ctype = mimetypes.guess_type(full)[0] or "application/octet-stream"
    if ctype.startswith("text/") or ctype.endswith("javascript"):
        ctype += "; charset=utf-8"
    start_response("200 OK", [("Content-Type", ctype), ("Content-Length", str(len(body))),
                              ("Cache-Control", "no-cache")])
    return [] if environ["REQUEST_METHOD"] == "HEAD" else [body]


application = mount(static_app, server, "/ws")


def main(argv=None):
    import argparse
    import logging
    import signal

    import gevent

    from wse_sync.wsgi import make_wsgi_server

    p = argparse.ArgumentParser(description="wse_sync chat example")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [%(name)s] %(message)s")
    http = make_wsgi_server(application, (args.host, args.port))
    http.start()
    logging.getLogger("chat").info("chat serving on http://%s:%d/", args.host, http.server_port)
    stop = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    gevent.signal_handler(signal.SIGINT, stop.set)
    stop.wait()
    http.stop_accepting()
    server.shutdown(1012, "", timeout=5)  # clients with re: true come back
    http.stop(timeout=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
