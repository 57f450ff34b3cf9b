"""The "bare picows" baseline: picows (Cython WebSocket protocol) on uvloop, speaking
the same subset of the wse protocol as bare_gevent.py and node/bare_server.js (no
broker, no sessions):

    ["~wse:hi", {identity, meta}, null]  -> ["~wse:welcome", {}, null]
    ["echo", payload, stamp]             -> ["~wse:response", payload, stamp]
    ["ping", payload, null]              -> ["pong", payload, null]
    ["fanout", {count}, stamp]           -> ["tick", i, null] to every socket (i < count),
                                            then ["~wse:response", count, stamp]
    ["pid", null, stamp]                 -> ["~wse:response", pid, stamp]

picows hands the listener whole frames in a callback (no per-connection task, no
message queue). Text payloads are decoded with ``get_payload_as_utf8_text()``
(CPython's strict UTF-8 decoder: the validation a text frame needs), then parsed by
ujson, as in the other baselines. picows does not reassemble fragmented messages; the
load generator never fragments, and a fragment is refused here. picows uses its
aiofastnet transport when that package is installed (it is a picows dependency), as
a user gets it by default. No auto-ping (picows' default); pings are answered.

    python bench/bare_picows.py --port P [--host 127.0.0.1] [--max-seconds S]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

PROTOCOL = "wse-default-json"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--max-seconds", type=float, default=1800,
                    help="exit by itself after this long (default 1800)")
    args = ap.parse_args()

    import ujson
    import uvloop
    from picows import (WSCloseCode, WSListener, WSMsgType, WSUpgradeResponse,
                        WSUpgradeResponseWithListener, ws_create_server)

    dumps, loads = ujson.dumps, ujson.loads
    pid = os.getpid()
    TEXT, BINARY, CLOSE = WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CLOSE
    sockets = set()  # the authenticated listeners

    def pack(t, p, s):
        return dumps([t, p, s], ensure_ascii=False, escape_forward_slashes=False)

    class Conn(WSListener):
        def __init__(self):
            super().__init__()
            self.transport = None
            self.valid = False

        def on_ws_connected(self, transport):
            self.transport = transport

        def on_ws_disconnected(self, transport):
            sockets.discard(self)

        def protocol_error(self, transport):
            transport.send_close(WSCloseCode.OK, b"wse.protocol-error")
            transport.disconnect()

        def on_ws_frame(self, transport, frame):
            mt = frame.msg_type
            if mt == CLOSE:
                transport.send_close(frame.get_close_code(), frame.get_close_message())
                transport.disconnect()
                return
            if mt != TEXT and mt != BINARY:
                return  # PING is answered by picows (enable_auto_pong), PONG ignored
            if not frame.fin:
                self.protocol_error(transport)  # no reassembly here (see the docstring)
                return
            try:
                m = loads(frame.get_payload_as_utf8_text() if mt == TEXT
                          else frame.get_payload_as_bytes())
                t = m[0]
            except (ValueError, TypeError, IndexError, KeyError):
                self.protocol_error(transport)
                return
            if not self.valid:
                if t != "~wse:hi":
                    self.protocol_error(transport)
                    return
                self.valid = True
                sockets.add(self)
                transport.send(TEXT, pack("~wse:welcome", {}, None))
                return
            p = m[1] if len(m) > 1 else None
            s = m[2] if len(m) > 2 else None
            if s is None:
                if t == "ping":
                    transport.send(TEXT, pack("pong", p, None))
            elif t == "echo":
                transport.send(TEXT, pack("~wse:response", p, s))
            elif t == "fanout":
                count = p["count"]
                for i in range(count):
                    data = pack("tick", i, None).encode()
                    for peer in list(sockets):
                        peer.transport.send(TEXT, data)
                transport.send(TEXT, pack("~wse:response", count, s))
            elif t == "pid":
                transport.send(TEXT, pack("~wse:response", pid, s))
            else:
                transport.send(TEXT, pack("~wse:response-err",
                                          {"code": "wse.server.rp.not-registered"}, s))

    def route(request):
        offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
        if PROTOCOL not in offered:
            return WSUpgradeResponseWithListener(
                WSUpgradeResponse.create_error_response(400, b"wse.protocol-error"), None)
        return WSUpgradeResponseWithListener(
            WSUpgradeResponse.create_101_response(extra_headers={"Sec-WebSocket-Protocol": PROTOCOL}),
            Conn())

    async def serve():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.call_later(args.max_seconds, stop.set)
        _server = await ws_create_server(route, args.host, args.port, backlog=2048,
                                         websocket_handshake_timeout=120)
        sys.stderr.write(f"bare picows server on {args.host}:{args.port}"
                         f" (uvloop {uvloop.__version__})\n")
        await stop.wait()
        # like the node baseline: exit at once, the kernel closes the sockets (no
        # closing handshakes, no cancelling of thousands of tasks)
        sys.stderr.flush()
        os._exit(0)

    uvloop.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
