"""The "bare gevent" baseline: gevent's pywsgi + stock gevent-websocket, speaking
just enough of the wse protocol for the benchmarks (no broker, no sessions):

    ["~wse:hi", {identity, meta}, null]  -> ["~wse:welcome", {}, null]
    ["echo", payload, stamp]             -> ["~wse:response", payload, stamp]
    ["ping", payload, null]              -> ["pong", payload, null]
    ["fanout", {count}, stamp]           -> ["tick", i, null] to every socket (i < count),
                                            then ["~wse:response", count, stamp]
    ["pid", null, stamp]                 -> ["~wse:response", pid, stamp]

It uses the stock ``WebSocket.receive()`` / ``send()`` (which frame, mask and
validate in gevent-websocket's own code) and the stock handler's subprotocol
selection (``app_protocol``). JSON is ujson, the codec wse_sync uses, so the
comparison isolates the WebSocket/runtime layers.

gevent-websocket silently switches to wsaccel's C UTF-8 validator when wsaccel
is importable (it is, in wse_sync's venv). By default this baseline hides
wsaccel so that gevent-websocket runs as it comes from PyPI (pure-Python
validation, as in the issue's reference figures); ``--wsaccel`` lets it in.

    python bench/bare_gevent.py --port P [--host 127.0.0.1] [--wsaccel] [--max-seconds S]
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

PROTOCOL = "wse-default-json"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--wsaccel", action="store_true", help="let gevent-websocket use wsaccel")
    ap.add_argument("--max-seconds", type=float, default=1800,
                    help="exit by itself after this long (default 1800)")
    args = ap.parse_args()
    if not args.wsaccel:
        sys.modules["wsaccel"] = None  # type: ignore[assignment]  # ImportError on import
        sys.modules["wsaccel.utf8validator"] = None  # type: ignore[assignment]

    import gevent
    import ujson
    from gevent.pywsgi import WSGIServer
    from geventwebsocket.exceptions import WebSocketError
    from geventwebsocket.handler import WebSocketHandler

    sockets = set()
    dumps, loads = ujson.dumps, ujson.loads
    pid = os.getpid()

    def pack(t, p, s):
        return dumps([t, p, s], ensure_ascii=False, escape_forward_slashes=False)

    class App:
        def app_protocol(self, path):
            return PROTOCOL

        def __call__(self, environ, start_response):
            ws = environ.get("wsgi.websocket")
            if ws is None:
                start_response("426 Upgrade Required", [("Content-Type", "text/plain")])
                return [b"websocket only\n"]
            requested = [p.strip() for p in environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL", "").split(",")]
            if PROTOCOL not in requested:
                ws.close(1000, b"wse.protocol-error")
                return []
            try:
                self.serve(ws)
            except WebSocketError:
                pass
            finally:
                sockets.discard(ws)
            return []

        def serve(self, ws):
            msg = ws.receive()
            if msg is None:
                return
            if loads(msg)[0] != "~wse:hi":
                ws.close(1000, b"wse.protocol-error")
                return
            sockets.add(ws)
            ws.send(pack("~wse:welcome", {}, None))
            while True:
                msg = ws.receive()
                if msg is None:
                    return
                m = loads(msg)
                t = m[0]
                p = m[1] if len(m) > 1 else None
                s = m[2] if len(m) > 2 else None
                if s is None:
                    if t == "ping":
                        ws.send(pack("pong", p, None))
                elif t == "echo":
                    ws.send(pack("~wse:response", p, s))
                elif t == "fanout":
                    count = p["count"]
                    for i in range(count):
                        data = pack("tick", i, None)
                        for peer in list(sockets):
                            try:
                                peer.send(data)
                            except WebSocketError:
                                sockets.discard(peer)
                    ws.send(pack("~wse:response", count, s))
                elif t == "pid":
                    ws.send(pack("~wse:response", pid, s))
                else:
                    ws.send(pack("~wse:response-err", {"code": "wse.server.rp.not-registered"}, s))

    server = WSGIServer((args.host, args.port), App(), handler_class=WebSocketHandler,
                        log=None, backlog=2048)
    gevent.signal_handler(signal.SIGTERM, server.stop, 0)
    gevent.signal_handler(signal.SIGINT, server.stop, 0)
    gevent.spawn_later(args.max_seconds, server.stop, 0)
    sys.stderr.write(f"bare gevent-websocket server on {args.host}:{args.port}\n")
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
