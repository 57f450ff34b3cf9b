"""The Python WseClient: custom protocols, jump, reconnect, close and misuse (against
a server in this process; a real serve process: tests/processes/test_client_restart.py)."""
import json
import struct
import zlib

import pytest
import ujson

from helpers import UNIT, RawWS, inproc_server, wait_for
from wse_sync import WSE_ERROR, WSE_REASON, WSE_STATUS, WseClient, WseError, WseServer
from wse_sync.core.frames import OP_BINARY
from wse_sync.wsgi import make_wsgi_server


def accept_all(identity, accept, **_):
    accept(identity, {"hello": identity})


def make_server(**kw):
    server = WseServer(identify=accept_all, **kw)
    server.register("echo", lambda conn, payload: payload)
    return server


# -- custom protocols ------------------------------------------------------------

class AltJSON:
    """JSON objects instead of arrays, and internal types of its own."""

    name = "alt-json"
    internal_types = {
        "hi": "#hello",
        "challenge": "#quest",
        "welcome": "#welcome",
        "call": "#call",
        "response": "#ok",
        "response_error": "#err",
    }

    def pack(self, type, payload=None, stamp=None):
        return json.dumps({"t": type, "p": payload, "s": stamp}, sort_keys=True)

    def unpack(self, data):
        message = json.loads(data)
        return message["t"], message.get("p"), message.get("s")


class ZlibJSON:
    """A binary protocol: deflated ujson, carried in binary frames."""

    name = "wse-zlib"
    internal_types = {
        "hi": "h",
        "challenge": "c",
        "welcome": "w",
        "call": "k",
        "response": "r",
        "response_error": "e",
    }

    def pack(self, type, payload=None, stamp=None):
        return zlib.compress(ujson.dumps([type, payload, stamp]).encode())

    def unpack(self, data):
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError("wse-zlib frames are binary")
        type_, payload, stamp = ujson.loads(zlib.decompress(bytes(data)))
        return type_, payload, stamp


class StructProtocol:
    """A binary protocol of fixed header: type (8 bytes), stamp (10 bytes), then the
    payload as JSON."""

    name = "wse-struct"
    internal_types = {"hi": "$hi", "challenge": "$ch", "welcome": "$wel", "call": "$call",
                      "response": "$ok", "response_error": "$err"}
    _head = struct.Struct("!8s10s")

    def pack(self, type, payload=None, stamp=None):
        return self._head.pack(type.encode(), (stamp or "").encode()) + ujson.dumps(
            payload).encode()

    def unpack(self, data):
        data = bytes(data)
        type_, stamp = self._head.unpack(data[:self._head.size])
        payload = ujson.loads(data[self._head.size:])
        return type_.rstrip(b"\0").decode(), payload, stamp.rstrip(b"\0").decode() or None


def exercise_protocol(protocol, types=("chat", "reply")):
    """Everything a protocol carries: challenge, welcome, messages, RPCs both ways."""
    seen = []

    def identify(identity, challenge, accept, refuse):
        seen.append(challenge)
        if challenge["response"] == "solved:" + str(identity):
            accept(identity, {"welcome": identity})
        else:
            refuse()

    server = WseServer(identify=identify, protocol=protocol)
    server.use_challenge(lambda identity, quest: quest({"solve": identity}))
    server.register("add", lambda conn, p: p["a"] + p["b"])
    server.register("fail", lambda conn, p: 1 / 0)
    received, conns = [], []
    server.channel.on(types[0], lambda conn, p: (received.append(p), conn.send(types[1], p)))
    server.when.connected(conns.append)
    assert server.protocol is protocol
    with inproc_server(server) as url:
        c = WseClient(url, protocol=protocol)
        c.challenge(lambda quest, solve: solve("solved:" + quest["solve"]))
        c.register("neg", lambda p: {"neg": -p})
        replies = []
        c.channel.on(types[1], replies.append)
        assert c.connect("pro") == {"welcome": "pro"}
        assert seen == [{"quest": {"solve": "pro"}, "response": "solved:pro"}]
        assert c.call("add", {"a": 2, "b": 3}) == 5
        with pytest.raises(WseError) as info:
            c.call("fail", None)
        assert info.value.code == WSE_ERROR.RP_EXECUTION_FAILED
        assert info.value.details["origin"]["name"] == "ZeroDivisionError"
        with pytest.raises(WseError) as info:
            c.call("missing")
        assert info.value.code == WSE_ERROR.RP_NOT_REGISTERED
        c.send(types[0], {"text": "ünïcode"})
        wait_for(lambda: replies)
        assert received == replies == [{"text": "ünïcode"}]
        wait_for(lambda: conns)
        assert conns[0].call("neg", 4) == {"neg": -4}
        with pytest.raises(WseError) as info:
            conns[0].call("unknown-on-client")
        assert info.value.code == WSE_ERROR.RP_NOT_REGISTERED
        c.close()


def test_custom_json_protocol_with_other_type_names():
    exercise_protocol(AltJSON())


def test_custom_json_protocol_on_the_wire():
    protocol = AltJSON()
    server = make_server(protocol=protocol)
    with inproc_server(server) as url:
        ws = RawWS(url, protocol="alt-json")
        assert ws.status == 101
        assert "Sec-WebSocket-Protocol: alt-json" in ws.response_head
        ws.send_text(json.dumps({"t": "#hello", "p": {"identity": "w", "meta": {}}}))
        assert ws.recv() == ("text", '{"p": {"hello": "w"}, "s": null, "t": "#welcome"}')
        ws.send_text(json.dumps({"t": "echo", "p": [1], "s": "abcdefghij"}))
        assert ws.recv() == ("text", '{"p": [1], "s": "abcdefghij", "t": "#ok"}')
        # the default JSON protocol's names mean nothing here: a call of "~wse:response"
        ws.send_text(json.dumps({"t": "~wse:response", "p": 1, "s": "zzzzzzzzzz"}))
        assert ws.recv() == ("text", '{"p": {"code": "wse.server.rp.not-registered"}, '
                                     '"s": "zzzzzzzzzz", "t": "#err"}')
        ws.close()
        ws.recv_until_close()
        ws.shutdown()


def test_binary_protocol():
    exercise_protocol(ZlibJSON())


def test_binary_protocol_uses_binary_frames():
    protocol = ZlibJSON()
    server = make_server(protocol=protocol)
    errors = []
    server.when.error(lambda err, conn: errors.append(err.code))
    with inproc_server(server) as url:
        ws = RawWS(url, protocol="wse-zlib")
        ws.send_frame(OP_BINARY, protocol.pack("h", {"identity": "bin", "meta": {}}))
        kind, data = ws.recv()
        assert kind == "binary"
        assert protocol.unpack(data) == ("w", {"hello": "bin"}, None)
        ws.send_frame(OP_BINARY, protocol.pack("echo", {"x": b"\x00".hex()}, "0123456789"))
        kind, data = ws.recv()
        assert kind == "binary"
        assert protocol.unpack(data) == ("r", {"x": "00"}, "0123456789")
        # a text frame is not this protocol: a processing error
        ws.send_text('["echo",1,"0123456789"]')
        assert ws.recv_until_close() == ("close", 1000, WSE_REASON.PROTOCOL_ERR)
        ws.shutdown()
        wait_for(lambda: errors)
        assert errors == [WSE_ERROR.MESSAGE_PROCESSING_ERROR]


def test_struct_protocol():
    protocol = StructProtocol()
    server = WseServer(identify=lambda accept: accept(7, 99), protocol=protocol)
    server.register("double", lambda conn, n: n * 2)
    server.channel.on("inc", lambda conn, n: conn.send("incd", n + 1))
    with inproc_server(server) as url:
        c = WseClient(url, protocol=protocol)
        got = []
        c.channel.on("incd", got.append)
        assert c.connect() == 99
        assert 7 in server.clients
        assert c.call("double", 21) == 42
        c.send("inc", 41)
        wait_for(lambda: got == [42])
        c.close()


def test_client_and_server_must_agree_on_the_protocol():
    server = make_server(protocol=AltJSON())
    with inproc_server(server) as url:
        c = WseClient(url)  # default protocol
        with pytest.raises(WseError) as info:
            c.connect("x")
        assert info.value.code == WSE_ERROR.WS_CLIENT_ERROR
        assert c.status == WSE_STATUS.OFFLINE
        assert len(server.clients) == 0


def test_invalid_protocol_objects_are_rejected():
    class NoTypes:
        name = "x"
        internal_types = {"hi": 1}

        def pack(self, *a):
            return ""

        def unpack(self, d):
            return (None, None, None)

    with pytest.raises(TypeError):
        WseServer(identify=accept_all, protocol=NoTypes())
    with pytest.raises(TypeError):
        WseClient("ws://127.0.0.1:1/", protocol=object())


# -- jump, reconnect, close --------------------------------------------------------

def test_jump_between_two_servers():
    s1, s2 = make_server(), make_server()
    left1, disc1, joined2 = [], [], []
    s1.when.left(lambda client, code, reason: left1.append((client.cid, code, reason)))
    s1.when.disconnected(lambda conn, code, reason: disc1.append((conn.cid, code, reason)))
    s2.when.joined(lambda client, meta: joined2.append((client.cid, meta)))
    with inproc_server(s1) as url1, inproc_server(s2) as url2:
        c = WseClient(url1)
        ready = []
        c.when.ready(ready.append)
        assert c.connect("jumper", {"from": 1}) == {"hello": "jumper"}
        assert "jumper" in s1.clients
        assert c.jump(url2) == {"hello": "jumper"}
        assert c.status == WSE_STATUS.READY
        assert c.url == url2
        wait_for(lambda: disc1 and left1 and joined2)
        assert disc1 == [("jumper", 4000, "jump")]
        assert left1 == [("jumper", 4000, "jump")]
        assert joined2 == [("jumper", {"from": 1})]
        assert "jumper" not in s1.clients and "jumper" in s2.clients
        assert c.call("echo", "on s2") == "on s2"
        # jump back with another identity and meta
        assert c.jump(url1, "other", {"from": 2}) == {"hello": "other"}
        assert "other" in s1.clients
        wait_for(lambda: "jumper" not in s2.clients)
        assert len(ready) == 3
        c.close()


def test_reconnect_after_a_1012_close():
    server = make_server()
    conns, disconnected = [], []
    server.when.connected(conns.append)
    server.when.disconnected(lambda conn, code, reason: disconnected.append((code, reason)))
    identified = []
    server.identify = lambda identity, meta, accept: (identified.append((identity, meta)),
                                                       accept(identity, len(identified)))
    with inproc_server(server) as url:
        c = WseClient(url, reconnect=True)
        updated, ready = [], []
        c.when.updated(updated.append)
        c.when.ready(ready.append)
        assert c.connect("back", {"m": 1}) == 1
        wait_for(lambda: conns)
        conns[0].close(1012, "")
        wait_for(lambda: len(ready) == 2, timeout=10 * UNIT)
        assert ready == [1, 2]
        assert identified == [("back", {"m": 1}), ("back", {"m": 1})]
        assert disconnected == [(1012, "")]
        # OFFLINE between READY and RE_CONNECTING, as the JS client reports it
        assert updated == [WSE_STATUS.CONNECTING, WSE_STATUS.READY, WSE_STATUS.OFFLINE,
                           WSE_STATUS.RE_CONNECTING, WSE_STATUS.READY]
        assert c.call("echo", "again") == "again"
        c.close()
        assert c.status == WSE_STATUS.OFFLINE


def test_reconnect_to_a_restarted_server_on_the_same_port():
    s1 = make_server()
    http1 = make_wsgi_server(s1, ("127.0.0.1", 0))
    http1.start()
    port = http1.server_port
    url = f"ws://127.0.0.1:{port}/"
    s2 = make_server()
    http2 = None
    try:
        c = WseClient(url, re=True)
        closed, ready = [], []
        c.when.closed(lambda code, reason: closed.append((code, reason)))
        c.when.ready(ready.append)
        c.connect("phoenix")
        s1.shutdown(1012, "", timeout=2 * UNIT)
        http1.stop(timeout=2 * UNIT)
        wait_for(lambda: closed)
        assert closed[0] == (1012, "")
        assert c.status == WSE_STATUS.RE_CONNECTING
        http2 = make_wsgi_server(s2, ("127.0.0.1", port))
        http2.start()
        wait_for(lambda: len(ready) == 2, timeout=15 * UNIT)
        assert c.status == WSE_STATUS.READY
        assert "phoenix" in s2.clients
        assert c.call("echo", 2) == 2
        c.close()
    finally:
        s2.shutdown(1001, "", timeout=2)
        if http2 is not None:
            http2.stop(timeout=2)


def test_no_reconnect_after_a_1000_close():
    server = make_server()
    conns = []
    server.when.connected(conns.append)
    with inproc_server(server) as url:
        c = WseClient(url, reconnect=True)
        updated, closed = [], []
        c.when.updated(updated.append)
        c.when.closed(lambda code, reason: closed.append((code, reason)))
        c.connect("stay-away")
        wait_for(lambda: conns)
        conns[0].drop()
        wait_for(lambda: closed)
        assert closed == [(1000, WSE_REASON.BY_SERVER)]
        assert c.status == WSE_STATUS.OFFLINE
        assert WSE_STATUS.RE_CONNECTING not in updated
        # the server still works and saw one connection only
        other = WseClient(url)
        other.connect("other")
        wait_for(lambda: len(conns) == 2)
        assert [x.cid for x in conns] == ["stay-away", "other"]
        assert "stay-away" not in server.clients
        other.close()


def test_no_reconnect_without_the_option():
    server = make_server()
    conns = []
    server.when.connected(conns.append)
    with inproc_server(server) as url:
        c = WseClient(url)
        updated = []
        c.when.updated(updated.append)
        c.connect("plain")
        wait_for(lambda: conns)
        conns[0].close(1012, "")
        wait_for(lambda: c.status == WSE_STATUS.OFFLINE)
        assert c.close_status == (1012, "")
        assert WSE_STATUS.RE_CONNECTING not in updated


def test_close_while_reconnecting_stops_for_good():
    s1 = make_server()
    http1 = make_wsgi_server(s1, ("127.0.0.1", 0))
    http1.start()
    c = WseClient(f"ws://127.0.0.1:{http1.server_port}/", reconnect=True)
    c.connect("gone")
    s1.shutdown(1012, "", timeout=2 * UNIT)
    http1.stop(timeout=2 * UNIT)
    wait_for(lambda: c.status == WSE_STATUS.RE_CONNECTING)
    c.close()
    assert c.status == WSE_STATUS.OFFLINE
    assert not c.reconnecting


def test_close_goes_offline_and_connect_twice_is_refused():
    server = make_server()
    disconnected = []
    server.when.disconnected(lambda conn, code, reason: disconnected.append((code, reason)))
    with inproc_server(server) as url:
        c = WseClient(url)
        c.connect("twice")
        with pytest.raises(WseError) as info:
            c.connect("twice")
        assert info.value.code == WSE_ERROR.CLIENT_ALREADY_CONNECTED
        assert c.status == WSE_STATUS.READY
        assert c.call("echo", 1) == 1
        closed = []
        c.when.closed(lambda code, reason: closed.append((code, reason)))
        c.close()
        assert c.status == WSE_STATUS.OFFLINE
        assert len(closed) == 1 and closed[0][0] == 1000
        wait_for(lambda: disconnected)
        assert disconnected == [(1000, WSE_REASON.BY_CLIENT)]
        with pytest.raises(WseError) as info:
            c.send("x")
        assert info.value.code == WSE_ERROR.CONNECTION_NOT_READY
        # the same client object may connect again after close()
        assert c.connect("twice") == {"hello": "twice"}
        assert c.status == WSE_STATUS.READY
        c.close()


def test_connect_to_nowhere_raises_ws_client_error():
    from helpers import free_port
    c = WseClient(f"ws://127.0.0.1:{free_port()}/")
    with pytest.raises(WseError) as info:
        c.connect("x")
    assert info.value.code == WSE_ERROR.WS_CLIENT_ERROR
    assert c.status == WSE_STATUS.OFFLINE


def test_client_handler_exception_reported_on_client_error():
    server = make_server()
    server.channel.on("ping", lambda conn, p: conn.send("pong", p))
    with inproc_server(server) as url:
        c = WseClient(url)
        errors, ok = [], []
        c.when.error(errors.append)

        @c.channel.on("pong")
        def pong(payload):
            if payload == "boom":
                raise RuntimeError("client handler failed")
            ok.append(payload)

        c.connect("h")
        c.send("ping", "boom")
        c.send("ping", "fine")
        wait_for(lambda: errors and ok)
        assert errors[0].code == WSE_ERROR.MESSAGE_PROCESSING_ERROR
        assert ok == ["fine"]
        assert c.status == WSE_STATUS.READY
        c.close()


def test_client_channel_off():
    server = make_server()
    with inproc_server(server) as url:
        c = WseClient(url)
        got, ignored = [], []
        handler = c.channel.on("note", got.append)
        c.when.ignored(lambda type_, payload: ignored.append((type_, payload)))
        c.connect("n")
        server.send("n", "note", 1)
        wait_for(lambda: got == [1])
        c.channel.off("note", handler)
        server.send("n", "note", 2)
        wait_for(lambda: ignored == [("note", 2)])
        assert got == [1]
        c.close()


def test_reconnect_stops_when_the_server_refuses():
    allowed = {"once"}
    server = WseServer(identify=lambda identity, accept, refuse:
                       accept(identity) if identity in allowed else refuse())
    conns = []
    server.when.connected(conns.append)
    with inproc_server(server) as url:
        c = WseClient(url, reconnect=True)
        updated = []
        c.when.updated(updated.append)
        c.connect("once")
        wait_for(lambda: conns)
        allowed.clear()
        conns[0].close(1012, "")
        wait_for(lambda: c.status == WSE_STATUS.OFFLINE and updated[-1] == WSE_STATUS.OFFLINE,
                 timeout=10 * UNIT)
        assert updated == [WSE_STATUS.CONNECTING, WSE_STATUS.READY, WSE_STATUS.OFFLINE,
                           WSE_STATUS.RE_CONNECTING, WSE_STATUS.OFFLINE]
        assert not c.reconnecting


def test_a_failed_handshake_closes_the_socket():
    # The server refuses the connection right after the upgrade (no subprotocol
    # match); with a long close_timeout, its handler greenlet ends only when the
    # client closes its socket.
    from gevent.pool import Pool
    server = make_server(protocol=AltJSON(), close_timeout=30)
    pool = Pool()
    http = make_wsgi_server(server, ("127.0.0.1", 0), spawn=pool)
    http.start()
    try:
        for path in ("/", "/again"):
            c = WseClient(f"ws://127.0.0.1:{http.server_port}{path}")
            with pytest.raises(WseError) as info:
                c.connect("x")
            assert info.value.code == WSE_ERROR.WS_CLIENT_ERROR
            wait_for(lambda: len(pool) == 0, timeout=10 * UNIT)
    finally:
        server.shutdown(1001, "", timeout=2)
        http.stop(timeout=2)
