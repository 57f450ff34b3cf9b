"""The "bare aiohttp" baseline: an aiohttp web application with one
``web.WebSocketResponse`` handler, speaking the same subset of the wse protocol as
bare_gevent.py and node/bare_server.js (no broker, no sessions):

    ["~wse:hi", {identity, meta}, null]  -> ["~wse:welcome", {}, null]
    ["echo", payload, stamp]             -> ["~wse:response", payload, stamp]
    ["ping", payload, null]              -> ["pong", payload, null]
    ["fanout", {count}, stamp]           -> ["tick", i, null] to every socket (i < count),
                                            then ["~wse:response", count, stamp]
    ["pid", null, stamp]                 -> ["~wse:response", pid, stamp]

One handler coroutine per connection, ``async for msg in ws`` (text frames come
decoded as ``str``: aiohttp's reader validates their UTF-8 with CPython's codec),
``await ws.send_str()`` for answers and for each receiver of the fanout (aiohttp has
no broadcast helper; ``send_str`` waits only when a socket's buffer is over its
limit). JSON is ujson. Defaults are kept (no heartbeat, autoping, permessage-deflate
offered but not negotiated: the load generator does not ask for it) except the access
log (off, as gevent's ``log=None``) and the backlog (2048, as the others).

It runs on the default asyncio event loop, as ``web.run_app`` does; ``--uvloop`` runs
it on uvloop instead.

    python bench/bare_aiohttp.py --port P [--host 127.0.0.1] [--uvloop] [--max-seconds S]
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

    import aiohttp
    import ujson
    from aiohttp import WSMsgType, web

    dumps, loads = ujson.dumps, ujson.loads
    pid = os.getpid()
    sockets = set()
    TEXT, BINARY = WSMsgType.TEXT, WSMsgType.BINARY

    def pack(t, p, s):
        return dumps([t, p, s], ensure_ascii=False, escape_forward_slashes=False)

    async def handler(request):
        ws = web.WebSocketResponse(protocols=(PROTOCOL,))
        await ws.prepare(request)
        if ws.ws_protocol != PROTOCOL:
            await ws.close(code=1000, message=b"wse.protocol-error")
            return ws
        valid = False
        try:
            async for msg in ws:
                if msg.type != TEXT and msg.type != BINARY:
                    continue
                m = loads(msg.data)
                t = m[0]
                if not valid:
                    if t != "~wse:hi":
                        await ws.close(code=1000, message=b"wse.protocol-error")
                        break
                    valid = True
                    sockets.add(ws)
                    await ws.send_str(pack("~wse:welcome", {}, None))
                    continue
                p = m[1] if len(m) > 1 else None
                s = m[2] if len(m) > 2 else None
                if s is None:
                    if t == "ping":
                        await ws.send_str(pack("pong", p, None))
                elif t == "echo":
                    await ws.send_str(pack("~wse:response", p, s))
                elif t == "fanout":
                    count = p["count"]
                    for i in range(count):
                        data = pack("tick", i, None)
                        for peer in list(sockets):
                            try:
                                await peer.send_str(data)
                            except (ConnectionError, RuntimeError):
                                sockets.discard(peer)
                    await ws.send_str(pack("~wse:response", count, s))
                elif t == "pid":
                    await ws.send_str(pack("~wse:response", pid, s))
                else:
                    await ws.send_str(pack("~wse:response-err",
                                           {"code": "wse.server.rp.not-registered"}, s))
        except ConnectionError:
            pass
        finally:
            sockets.discard(ws)
        return ws

    async def run():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.call_later(args.max_seconds, stop.set)
        app = web.Application()
        app.router.add_get("/", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, args.host, args.port, backlog=2048).start()
        sys.stderr.write(f"bare aiohttp {aiohttp.__version__} server on {args.host}:{args.port}"
                         f" ({type(loop).__module__} loop)\n")
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
