"""The "bare websockets" baseline: the websockets library's asyncio server
(``websockets.asyncio.server.serve``, the API of websockets >= 13), speaking the same
subset of the wse protocol as bare_gevent.py and node/bare_server.js (no broker, no
sessions):

    ["~wse:hi", {identity, meta}, null]  -> ["~wse:welcome", {}, null]
    ["echo", payload, stamp]             -> ["~wse:response", payload, stamp]
    ["ping", payload, null]              -> ["pong", payload, null]
    ["fanout", {count}, stamp]           -> ["tick", i, null] to every socket (i < count),
                                            then ["~wse:response", count, stamp]
    ["pid", null, stamp]                 -> ["~wse:response", pid, stamp]

One handler coroutine per connection, ``async for message in ws`` (text frames come
as ``str``: websockets decodes and so validates their UTF-8 with CPython's codec),
``await ws.send(str)`` for answers and the library's ``broadcast()`` for the fanout
(it writes to every connection without waiting, as the other baselines do). JSON is
ujson. Defaults are kept except: keepalive pings off (``ping_interval=None``; the
other baselines send none) and the backlog (2048, as the others). permessage-deflate
stays enabled (the default) but is not negotiated: the load generator does not offer it.

It runs on the default asyncio event loop, as a user gets it; ``--uvloop`` runs it on
uvloop instead.

    python bench/bare_websockets.py --port P [--host 127.0.0.1] [--uvloop] [--max-seconds S]
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
    ap.add_argument("--uvloop", action="store_true", help="run on uvloop (default: asyncio's loop)")
    ap.add_argument("--max-seconds", type=float, default=1800,
                    help="exit by itself after this long (default 1800)")
    args = ap.parse_args()

    import ujson
    import websockets
    from websockets.asyncio.server import broadcast, serve
    from websockets.exceptions import ConnectionClosed

    dumps, loads = ujson.dumps, ujson.loads
    pid = os.getpid()
    sockets = set()

    def pack(t, p, s):
        return dumps([t, p, s], ensure_ascii=False, escape_forward_slashes=False)

    async def handler(ws):
        try:
            msg = await ws.recv()
            if loads(msg)[0] != "~wse:hi":
                await ws.close(1000, "wse.protocol-error")
                return
            sockets.add(ws)
            await ws.send(pack("~wse:welcome", {}, None))
            async for msg in ws:
                m = loads(msg)
                t = m[0]
                p = m[1] if len(m) > 1 else None
                s = m[2] if len(m) > 2 else None
                if s is None:
                    if t == "ping":
                        await ws.send(pack("pong", p, None))
                elif t == "echo":
                    await ws.send(pack("~wse:response", p, s))
                elif t == "fanout":
                    count = p["count"]
                    for i in range(count):
                        broadcast(list(sockets), pack("tick", i, None))
                    await ws.send(pack("~wse:response", count, s))
                elif t == "pid":
                    await ws.send(pack("~wse:response", pid, s))
                else:
                    await ws.send(pack("~wse:response-err",
                                       {"code": "wse.server.rp.not-registered"}, s))
        except ConnectionClosed:
            pass
        finally:
            sockets.discard(ws)

    async def run():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.call_later(args.max_seconds, stop.set)
        _server = await serve(handler, args.host, args.port, subprotocols=[PROTOCOL],
                              ping_interval=None, backlog=2048)
        sys.stderr.write(f"bare websockets {websockets.__version__} server on"
                         f" {args.host}:{args.port} ({type(loop).__module__} loop)\n")
        await stop.wait()
        # like the node baseline: exit at once, the kernel closes the sockets (no
        # closing handshakes, no cancelling of thousands of tasks)
        sys.stderr.flush()
        os._exit(0)

    if args.uvloop:
        import uvloop
        uvloop.run(run())
    else:
        asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
