"""Echo server for the Autobahn|Testsuite fuzzingclient (tests/autobahn/run.sh).

Runs the real server stack: gevent's pywsgi WSGIServer, wse_sync's WseHandler
(gevent-websocket's handler with wse_sync's upgrade), and wse_sync's own
Transport / framing, which takes the socket over from gevent-websocket exactly
as WseServer.__call__ does. Every text / binary message is echoed back with
the same type.

    python tests/autobahn/echo_app.py [PORT]      # default 9001, on 127.0.0.1
"""
from gevent import monkey

monkey.patch_all()

import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

# the installed package when there is one (tox: the build under test, its hot
# path compiled), else the checkout this file is in
try:
    import wse_sync  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))))

from gevent.pywsgi import WSGIServer  # noqa: E402

from wse_sync.socket.transport import Transport, TransportLimits  # noqa: E402

try:
    from wse_sync.wsgi import WseHandler as Handler  # noqa: E402
except ImportError:  # pragma: no cover - older trees
    from geventwebsocket.handler import WebSocketHandler as Handler  # noqa: E402

HOST = "127.0.0.1"
MAX_MESSAGE_SIZE = 16 * 1024 * 1024   # Autobahn's largest messages (9.x) are 16 MiB
MAX_SEND_QUEUE = 64 * 1024 * 1024     # echoing 16 MiB messages must not overflow it
CLOSE_TIMEOUT = 2.0

log = logging.getLogger("autobahn.echo")


def app(environ, start_response):
    ws = environ.get("wsgi.websocket")
    if ws is None:
        start_response("426 Upgrade Required", [
            ("Content-Type", "text/plain"), ("Upgrade", "websocket"),
            ("Sec-WebSocket-Version", "13")])
        return [b"echo WebSocket endpoint\n"]
    handler = ws.handler
    # From here on the socket is ours: keep gevent-websocket from writing to it.
    ws.closed = True
    transport = Transport(handler.socket, handler.rfile,
                          TransportLimits(MAX_MESSAGE_SIZE, MAX_SEND_QUEUE, CLOSE_TIMEOUT))
    remote = environ.get("REMOTE_ADDR")
    # the server's way: read from the loop's callbacks, this greenlet ends now
    transport.start(transport.write_message,
                    lambda code, reason: log.debug("closed %s: %s %r", remote, code, reason))
    return []


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    port = int(argv[0]) if argv else 9001
    logging.basicConfig(level=os.environ.get("ECHO_LOG", "WARNING"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server = WSGIServer((HOST, port), app, handler_class=Handler,
                        log=None, error_log=logging.getLogger("autobahn.http"))
    from wse_sync.core import frames
    build = "compiled" if not frames.__file__.endswith(".py") else "pure"
    print("echo_app: %s on ws://%s:%d (pid %d; wse_sync %s, hot path %s)" % (
        Handler.__name__, HOST, port, os.getpid(), os.path.dirname(frames.__file__), build),
        flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
