"""No cyclic garbage per connection or per refusal: whatever way a connection
ends, its objects are freed by reference counting, so nothing of it is left
for a full collection to find (serve's GC tuning collects seldom: cycles per
connection would make a worker's memory ratchet under churn)."""
import gc
import socket
import struct

import gevent
import pytest

from helpers import UNIT, RawWS, inproc_server, wait_for
from wse_sync import WseServer

pytestmark = pytest.mark.timeout(60)

# modules of a server-side connection's code, whose objects must never be
# found in a cycle after a wave (the test's own WseClients of earlier tests
# may still be freed meanwhile: not counted)
OURS = ("wse_sync.socket.transport", "wse_sync.socket.session", "wse_sync.socket.connection",
        "wse_sync.worker.hub", "wse_sync.worker.admission", "wse_sync.integrations",
        "wse_sync.core.websocket", "wse_sync.core.session", "geventwebsocket", "gevent.pywsgi",
        "gevent._socket", "socket")


def accept_all(identity, accept, **_):
    accept(identity, {"hello": identity})


def make_server(**options):
    server = WseServer(identify=accept_all, auth_timeout=0.3 * UNIT, header_timeout=0.3 * UNIT,
                       max_send_queue=64 * 1024, **options)

    @server.register("flood")
    def flood(conn, payload):
        for _ in range(100):
            conn.send("big", "x" * 8000)
        return True

    @server.register("echo")
    def echo(conn, payload):
        return payload

    return server


def port_of(url):
    return int(url.rsplit(":", 1)[1].strip("/"))


def hi(ws, cid):
    ws.send_text('["~wse:hi",{"identity":"%s","meta":{}},null]' % cid)
    assert ws.recv()[0] == "text"


def one_wave(url, n):
    """n connections per way of ending; returns when the client side is done."""
    port = port_of(url)
    held = []
    for i in range(n):
        ws = RawWS(url)  # clean close
        hi(ws, f"clean{i}")
        ws.close(1000, "bye")
        held.append(ws)
        ws = RawWS(url)  # FIN without a close frame
        hi(ws, f"fin{i}")
        ws.sock.shutdown(socket.SHUT_WR)
        held.append(ws)
        ws = RawWS(url)  # RST
        hi(ws, f"rst{i}")
        ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        ws.shutdown()
        ws = RawWS(url)  # hang-up in the middle of an RPC
        hi(ws, f"rpc{i}")
        ws.send_text('["~wse:call",{"rp":"echo","payload":1},"s"]')
        ws.shutdown()
        held.append(RawWS(url))  # never says hi: cut by auth_timeout
        raw = socket.create_connection(("127.0.0.1", port))  # unfinished upgrade: 408
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        held.append(raw)
        ws = RawWS(url)  # asks for a flood and does not read: send-queue-full
        hi(ws, f"flood{i}")
        ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        ws.send_text('["~wse:call",{"rp":"flood","payload":null},"f"]')
        held.append(ws)
        ws = RawWS(url, protocol=None)  # refused: no subprotocol
        held.append(ws)
    return held


def hang_up(peer):
    (peer.shutdown if isinstance(peer, RawWS) else peer.close)()


def saved_garbage():
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        return list(gc.garbage)
    finally:
        gc.set_debug(0)
        del gc.garbage[:]


def ours(objects):
    """The garbage objects that belong to a connection's code."""
    found = []
    for o in objects:
        if type(o).__name__ == "frame":
            module = o.f_globals.get("__name__", "")
        else:
            module = type(o).__module__ or ""
        if module.startswith(OURS):
            found.append(o)
    return found


def test_a_wave_of_connections_ending_every_way_leaves_no_cycle():
    server = make_server()
    with inproc_server(server) as url:
        # warm up (imports, first-use caches), then measure a clean slate
        for ws in one_wave(url, 2):
            hang_up(ws)
        wait_for(lambda: not server.hub.metrics_report()["gauges"]["connections"], timeout=10 * UNIT)
        saved_garbage()
        # what lives now (earlier tests' servers too) is not this wave's
        before = {id(o) for o in gc.get_objects()}
        held = one_wave(url, 10)
        # every server-side ending has happened (timeouts, cuts, closes)
        gevent.sleep(0.6 * UNIT)
        for ws in held:
            hang_up(ws)
        wait_for(lambda: not server.hub.metrics_report()["gauges"]["connections"], timeout=10 * UNIT)
        gevent.sleep(0.1 * UNIT)
        del held
        found = [o for o in ours(saved_garbage()) if id(o) not in before]
        names = sorted({type(o).__name__ if type(o).__name__ != "frame"
                        else f"frame {o.f_code.co_name}" for o in found})
        assert not found, f"{len(found)} objects of a connection's code in cycles: {names}"
