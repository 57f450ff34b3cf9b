"""Baseline echo server for the Autobahn|Testsuite fuzzingclient (tests/autobahn/run.sh).

Stock gevent-websocket only: gevent's pywsgi WSGIServer with
geventwebsocket.handler.WebSocketHandler, and a plain ws.receive() / ws.send()
loop -- no wse_sync code at all. It is the reference to compare echo_app.py
(wse_sync's stack) against, e.g.

    ECHO_APP=tests/autobahn/echo_geventwebsocket.py bash tests/autobahn/run.sh --perf

Every text / binary message is echoed back with the same type.

    python tests/autobahn/echo_geventwebsocket.py [PORT]      # default 9001, on 127.0.0.1
"""
from gevent import monkey

monkey.patch_all()

import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from gevent.pywsgi import WSGIServer  # noqa: E402
from geventwebsocket.handler import WebSocketHandler as Handler  # noqa: E402

HOST = "127.0.0.1"

log = logging.getLogger("autobahn.echo")


def app(environ, start_response):
    ws = environ.get("wsgi.websocket")
    if ws is None:
        start_response("426 Upgrade Required", [
            ("Content-Type", "text/plain"), ("Upgrade", "websocket"),
            ("Sec-WebSocket-Version", "13")])
        return [b"echo WebSocket endpoint\n"]
    while True:
        msg = ws.receive()
        if msg is None:  # closed (by the peer, or by a protocol / UTF-8 error)
            break
        # gevent-websocket returns str for text and bytearray (not bytes) for binary
        ws.send(msg, binary=isinstance(msg, (bytes, bytearray)))
    log.debug("closed %s", environ.get("REMOTE_ADDR"))
    return []


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    port = int(argv[0]) if argv else 9001
    logging.basicConfig(level=os.environ.get("ECHO_LOG", "WARNING"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server = WSGIServer((HOST, port), app, handler_class=Handler,
                        log=None, error_log=logging.getLogger("autobahn.http"))
    print("echo_geventwebsocket: %s on ws://%s:%d (pid %d)" % (
        Handler.__name__, HOST, port, os.getpid()), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
