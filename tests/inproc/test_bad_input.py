"""Bad input from clients: what the client reads, what the server reports, and
that a client already connected keeps working afterwards.

Every test runs a WseServer in this process (``inproc_server``), connects one
well-behaved WseClient first (``env.good``), then misbehaves with a RawWS.
"""
from __future__ import annotations

import contextlib
import json
import socket
import struct

import gevent
import pytest

from helpers import UNIT, RawWS, inproc_server, wait_for
from wse_sync import WSE_ERROR, WSE_REASON, WseClient, WseError, WseServer
from wse_sync.core.frames import (OP_BINARY, OP_CONT, OP_PING, OP_PONG, OP_TEXT, build_close,
                              build_frame)

PROTOCOL_ERR = ("close", 1000, WSE_REASON.PROTOCOL_ERR)
NOT_AUTHORIZED = ("close", 1000, WSE_REASON.NOT_AUTHORIZED)
HANDSHAKE_TIMEOUT = ("close", 1013, "wse.handshake-timeout")


def hi(identity="raw", meta=None):
    return json.dumps(["~wse:hi", {"identity": identity, "meta": meta or {}}, None])


class Env:
    """A server with its events collected, a connected WseClient, raw peers."""

    def __init__(self, server: WseServer, url: str) -> None:
        self.server = server
        self.url = url
        self.errors = []
        self.disconnected = []
        self.connected = []
        self.ignored = []
        self.raws = []
        server.when.error(lambda err, conn: self.errors.append((err, conn)))
        server.when.disconnected(
            lambda conn, code, reason: self.disconnected.append((conn.cid, code, reason)))
        server.when.connected(lambda conn: self.connected.append(conn))
        server.when.ignored(lambda conn, t, p: self.ignored.append((conn.cid, t, p)))
        self.good = WseClient(url)
        assert self.good.connect("good") == {"welcome": "good"}

    def raw(self, protocol="wse-default-json", path=None, **kw) -> RawWS:
        url = self.url if path is None else self.url.rsplit("/", 1)[0] + path
        ws = RawWS(url, protocol=protocol, **kw)
        self.raws.append(ws)
        return ws

    def ready_raw(self, identity="raw") -> RawWS:
        """A raw peer that went through ~wse:hi and read the welcome."""
        ws = self.raw()
        assert ws.status == 101
        ws.send_text(hi(identity))
        ev = ws.recv()
        assert ev[0] == "text", ev
        assert json.loads(ev[1]) == ["~wse:welcome", {"welcome": identity}, None]
        wait_for(lambda: any(c.cid == identity for c in self.connected))
        return ws

    def conn_of(self, cid):
        return next(c for c in self.connected if c.cid == cid)

    def check_good_still_works(self) -> None:
        assert self.good.call("echo", {"still": "here"}) == {"still": "here"}
        assert self.server.clients.get("good") is not None

    def error_codes(self):
        return [e.code for e, _ in self.errors]

    def close(self) -> None:
        for ws in self.raws:
            ws.shutdown()
        self.good.close()


def default_identify(identity, accept, refuse, **_):
    if identity:
        accept(identity, {"welcome": identity})
    else:
        refuse()


@contextlib.contextmanager
def env(identify=default_identify, **options):
    options.setdefault("conn_per_user", 5)
    # after a framing error the server discards input until it cuts the socket
    options.setdefault("close_timeout", 0.5)
    server = WseServer(identify=identify, **options)
    server.register("echo", lambda conn, payload: payload)
    path = options.get("path") or "/"
    with inproc_server(server, path=path) as url:
        e = Env(server, url)
        try:
            yield e
        finally:
            e.close()


def expect_close(ws: RawWS, timeout: float = 5 * UNIT) -> tuple:
    """Read up to the server's close frame and answer it, as a real client does."""
    ev = ws.recv_until_close(timeout)
    if ev[0] == "close":
        try:
            ws.close(1000 if ev[1] == 1005 else ev[1])
        except OSError:
            pass
    return ev


def wait_error(e: Env, code: str) -> WseError:
    wait_for(lambda: code in e.error_codes())
    return next(err for err, _ in e.errors if err.code == code)


# -- not JSON / not an array ------------------------------------------------

NOT_JSON = ["not json", "[1, 2", "{\"type\": 1", "", "\u00e9t\u00e9"]


@pytest.mark.parametrize("when", ["before_hi", "after_welcome"])
@pytest.mark.parametrize("text", NOT_JSON)
def test_frame_that_is_not_json(when, text):
    with env() as e:
        ws = e.raw() if when == "before_hi" else e.ready_raw()
        ws.send_text(text)
        assert expect_close(ws) == PROTOCOL_ERR
        err = wait_error(e, WSE_ERROR.MESSAGE_PROCESSING_ERROR)
        assert isinstance(err, WseError)
        assert isinstance(err.details, dict) and "exception" in err.details
        e.check_good_still_works()


@pytest.mark.parametrize("text", [
    '["chat", NaN, null]', '["chat", Infinity, null]', '["chat", -Infinity, null]',
    '["chat", 01, null]', '["chat", 1., null]', '["chat", "a\tb", null]',
    '["chat", "a\u0001b", null]', '["chat", {"a": 1,}, null]', "['chat']",
], ids=["NaN", "Infinity", "-Infinity", "leading-zero", "trailing-dot", "raw-tab",
        "raw-control-char", "trailing-comma", "single-quotes"])
def test_almost_json_is_not_json(text):
    """What JSON.parse refuses is a processing error, whatever a lenient parser says."""
    with env() as e:
        ws = e.ready_raw()
        e.server.channel.on("chat", lambda conn, p: None)
        ws.send_text(text)
        assert expect_close(ws) == PROTOCOL_ERR
        wait_error(e, WSE_ERROR.MESSAGE_PROCESSING_ERROR)
        e.check_good_still_works()


def test_deeply_nested_json_is_a_processing_error():
    with env() as e:
        ws = e.ready_raw()
        ws.send_text('["chat", ' + "[" * 100_000 + "]" * 100_000 + ", null]")
        assert expect_close(ws) == PROTOCOL_ERR
        wait_error(e, WSE_ERROR.MESSAGE_PROCESSING_ERROR)
        # moderately nested data is fine
        ws2 = e.ready_raw("nested")
        ws2.send_text('["echo", ' + "[" * 200 + "]" * 200 + ', "abcdefghij"]')
        assert json.loads(ws2.recv()[1])[2] == "abcdefghij"
        e.check_good_still_works()


def _strict_json(text):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_lone_surrogates_round_trip():
    """JSON.stringify escapes lone surrogates; a JS client can send them."""
    with env() as e:
        ws = e.ready_raw()
        ws.send_text('["echo", ["\\ud800", "x\\udfff", "\u00e9"], "abcdefghij"]')
        ev = ws.recv()
        assert ev[0] == "text", ev
        assert _strict_json(ev[1]) == ["~wse:response", ["\ud800", "x\udfff", "\u00e9"],
                                       "abcdefghij"]
        assert e.errors == []
        # the Python client too
        assert e.good.call("echo", "a\udc00b") == "a\udc00b"
        e.check_good_still_works()


def test_non_finite_numbers_go_out_as_null():
    """1e400 parses to Infinity; JSON.stringify writes it (and NaN) as null."""
    with env() as e:
        e.server.register("nan", lambda conn, p: {"nan": float("nan"), "inf": [float("inf")]})
        ws = e.ready_raw()
        ws.send_text('["echo", [1e400, -1e400, 1.5], "abcdefghij"]')
        ev = ws.recv()
        assert ev[0] == "text", ev
        assert _strict_json(ev[1]) == ["~wse:response", [None, None, 1.5], "abcdefghij"]
        ws.send_text('["nan", null, "klmnopqrst"]')
        ev = ws.recv()
        assert _strict_json(ev[1]) == ["~wse:response", {"nan": None, "inf": [None]},
                                       "klmnopqrst"]
        assert e.errors == []
        e.check_good_still_works()


@pytest.mark.parametrize("text", ['{"type": "x"}', '"~wse:hi"', "42", "null", "true", "[]"])
def test_json_that_is_not_a_non_empty_array(text):
    with env() as e:
        ws = e.ready_raw()
        ws.send_text(text)
        assert expect_close(ws) == PROTOCOL_ERR
        wait_error(e, WSE_ERROR.MESSAGE_PROCESSING_ERROR)
        wait_for(lambda: ("raw", 1000, WSE_REASON.PROTOCOL_ERR) in e.disconnected)
        e.check_good_still_works()


def test_array_with_more_than_three_elements_is_accepted():
    with env() as e:
        ws = e.raw()
        ws.send_text(json.dumps(["~wse:hi", {"identity": "raw", "meta": {}}, None, "x", 5]))
        assert json.loads(ws.recv()[1]) == ["~wse:welcome", {"welcome": "raw"}, None]
        ws.send_text(json.dumps(["echo", [1, 2], "abcdefghij", "extra", {"more": 1}]))
        assert json.loads(ws.recv()[1]) == ["~wse:response", [1, 2], "abcdefghij"]
        # one and two elements: missing ones are null
        ws.send_text(json.dumps(["lonely"]))
        ws.send_text(json.dumps(["pair", 7]))
        wait_for(lambda: [i[1:] for i in e.ignored] == [("lonely", None), ("pair", 7)])
        assert e.errors == []
        e.check_good_still_works()


# -- bad type / stamp -----------------------------------------------------------

@pytest.mark.parametrize("message", [
    [5, None, None],                 # type not a string
    [{"t": 1}, None, None],
    [["echo"], 1, "abcdefghij"],     # ... also with a stamp
    ["echo", 1, 5],                  # stamp not a string
    ["echo", 1, ["abc"]],
    ["echo", 1, ""],                 # empty stamp
    ["", 1, None],                   # empty type, no stamp
    [None, 1, None],                 # missing type, no stamp
    [None],
])
def test_bad_type_or_stamp_is_a_protocol_violation(message):
    with env() as e:
        ws = e.ready_raw()
        ws.send_text(json.dumps(message))
        assert expect_close(ws) == PROTOCOL_ERR
        wait_error(e, WSE_ERROR.PROTOCOL_VIOLATION)
        wait_for(lambda: ("raw", 1000, WSE_REASON.PROTOCOL_ERR) in e.disconnected)
        e.check_good_still_works()


# -- handshake order ---------------------------------------------------------------

@pytest.mark.parametrize("message", [
    ["chat", "hello", None],
    ["echo", 1, "abcdefghij"],                       # an RPC call
    ["~wse:response", 1, "abcdefghij"],              # an answer to nothing
    ["~wse:challenge", "solution", None],            # challenge answer, never asked
    ["~wse:welcome", {}, None],
])
def test_message_before_hi_is_a_protocol_error(message):
    identified = []

    def identify(identity, accept, **_):
        identified.append(identity)
        accept(identity, {"welcome": identity})

    with env(identify=identify) as e:
        ws = e.raw()
        ws.send_text(json.dumps(message))
        assert expect_close(ws) == PROTOCOL_ERR
        # the same socket cannot authenticate afterwards; identify never saw it
        assert identified == ["good"]
        e.check_good_still_works()


def test_challenge_answer_while_identify_decides_is_ignored():
    """No challenge asked: messages after ~wse:hi and before the welcome are ignored."""
    def identify(identity, accept, challenge, **_):
        assert challenge is None
        accept(identity, {"welcome": identity})

    with env(identify=identify) as e:
        ws = e.raw()
        # one write: the server reads the three frames before identify runs
        ws.send_raw(b"".join(build_frame(OP_TEXT, t.encode(), mask=True) for t in (
            hi("early"), json.dumps(["~wse:challenge", "unasked", None]),
            json.dumps(["chat", "early", None]))))
        assert json.loads(ws.recv()[1]) == ["~wse:welcome", {"welcome": "early"}, None]
        ws.send_text(json.dumps(["echo", "after", "abcdefghij"]))
        assert json.loads(ws.recv()[1]) == ["~wse:response", "after", "abcdefghij"]
        assert e.ignored == [] and e.errors == []
        e.check_good_still_works()


@pytest.mark.parametrize("payload", ["identity-only", 5, None, ["raw", {}],
                                     {"identity": "raw", "meta": "not an object"},
                                     {"identity": "raw", "meta": [1]}])
def test_invalid_hi_payload(payload):
    with env() as e:
        ws = e.raw()
        ws.send_text(json.dumps(["~wse:hi", payload, None]))
        assert expect_close(ws) == PROTOCOL_ERR
        err = wait_error(e, WSE_ERROR.PROTOCOL_VIOLATION)
        assert isinstance(err, WseError)
        assert list(e.server.clients) == ["good"]
        e.check_good_still_works()


def test_second_hi_after_welcome_is_ignored():
    with env() as e:
        ws = e.ready_raw()
        ws.send_text(hi("someone-else", {"x": 1}))
        wait_for(lambda: e.ignored)
        assert e.ignored == [("raw", "~wse:hi", {"identity": "someone-else", "meta": {"x": 1}})]
        # the connection stays, with its first identity
        ws.send_text(json.dumps(["echo", "still", "abcdefghij"]))
        assert json.loads(ws.recv()[1]) == ["~wse:response", "still", "abcdefghij"]
        assert e.conn_of("raw").cid == "raw"
        assert "someone-else" not in e.server.clients
        assert e.errors == [] and e.disconnected == []
        e.check_good_still_works()


# -- binary frames ---------------------------------------------------------------

def test_binary_utf8_json_is_read_like_text():
    with env() as e:
        ws = e.raw()
        ws.send_frame(OP_BINARY, hi("bin").encode())
        assert json.loads(ws.recv()[1]) == ["~wse:welcome", {"welcome": "bin"}, None]
        ws.send_frame(OP_BINARY, json.dumps(["echo", "h\u00e9", "abcdefghij"],
                                            ensure_ascii=False).encode("utf-8"))
        ev = ws.recv()
        assert ev[0] == "text"  # the server answers in text frames
        assert json.loads(ev[1]) == ["~wse:response", "h\u00e9", "abcdefghij"]
        assert e.errors == []
        e.check_good_still_works()


@pytest.mark.parametrize("data", [b"\xff\xfe\x00\x01", b"\x80[]", "[\"\u00e9\"]".encode("latin-1"),
                                  b"", b"\x00"])
def test_binary_that_is_not_utf8_json(data):
    with env() as e:
        ws = e.ready_raw()
        ws.send_frame(OP_BINARY, data)
        assert expect_close(ws) == PROTOCOL_ERR
        wait_error(e, WSE_ERROR.MESSAGE_PROCESSING_ERROR)
        wait_for(lambda: ("raw", 1000, WSE_REASON.PROTOCOL_ERR) in e.disconnected)
        e.check_good_still_works()


# -- size limits ------------------------------------------------------------------

def test_message_over_max_message_size_gets_1009():
    with env(max_message_size=1000) as e:
        ws = e.ready_raw()
        # at the limit: fine
        at_limit = json.dumps(["echo", "", "abcdefghij"])
        at_limit = json.dumps(["echo", "x" * (1000 - len(at_limit)), "abcdefghij"])
        assert len(at_limit.encode()) == 1000
        ws.send_text(at_limit)
        assert json.loads(ws.recv()[1])[0] == "~wse:response"
        # over it, followed by more data the server must discard
        ws.send_text(json.dumps(["echo", "x" * 200_000, "abcdefghij"]))
        ws.send_text(json.dumps(["echo", "after", "klmnopqrst"]))
        ev = expect_close(ws)
        assert ev[0] == "close", ev
        assert ev[1] == 1009
        wait_for(lambda: [d for d in e.disconnected if d[0] == "raw"])
        assert [d[1] for d in e.disconnected if d[0] == "raw"] == [1009]
        e.check_good_still_works()


def test_fragmented_message_over_the_limit_gets_1009():
    with env(max_message_size=1000) as e:
        ws = e.ready_raw()
        first = bytearray(build_frame(OP_TEXT, b"[\"echo\", \"" + b"x" * 600, mask=True))
        first[0] &= 0x7F  # not FIN
        ws.send_raw(bytes(first))
        ws.send_frame(OP_CONT, b"y" * 600)
        ev = expect_close(ws)
        assert ev[:2] == ("close", 1009)
        e.check_good_still_works()


def test_frame_header_announcing_2_gib_is_refused_at_once():
    with env() as e:  # default limit: 1 MiB
        ws = e.ready_raw()
        # header only (+ a few bytes): the server cannot wait for 2 GiB to arrive
        header = struct.pack("!BBQ", 0x80 | OP_TEXT, 0x80 | 127, 2 ** 31) + b"\x01\x02\x03\x04"
        ws.send_raw(header + b"x" * 1000)
        ev = expect_close(ws)
        assert ev[:2] == ("close", 1009)
        wait_for(lambda: [d for d in e.disconnected if d[0] == "raw"])
        e.check_good_still_works()


# -- timeouts and identify failures -------------------------------------------------

def test_handshake_timeout():
    with env(handshake_timeout=0.3) as e:
        ws = e.raw()
        assert ws.status == 101
        # never sends ~wse:hi
        assert expect_close(ws, 10 * UNIT) == HANDSHAKE_TIMEOUT
        e.check_good_still_works()


def test_handshake_timeout_for_a_peer_that_never_finishes_its_hi_frame():
    with env(handshake_timeout=0.3) as e:
        ws = e.raw()
        frame = build_frame(OP_TEXT, hi("trickle").encode(), mask=True)
        ws.send_raw(frame[:-5])  # all but the last bytes, never sent
        assert expect_close(ws, 10 * UNIT) == HANDSHAKE_TIMEOUT
        assert "trickle" not in e.server.clients
        e.check_good_still_works()


def test_a_frame_sent_byte_by_byte_is_read_whole():
    with env() as e:
        ws = e.raw()
        for byte in build_frame(OP_TEXT, hi("bytewise").encode(), mask=True):
            ws.send_raw(bytes([byte]))
            gevent.sleep(0)  # let the server read each byte on its own
        assert json.loads(ws.recv()[1]) == ["~wse:welcome", {"welcome": "bytewise"}, None]
        e.check_good_still_works()


@pytest.mark.parametrize("how", ["returns", "blocks"])
def test_auth_timeout(how):
    calls = []

    def identify(identity, accept, **_):
        calls.append(identity)
        if identity == "undecided":
            if how == "blocks":
                gevent.sleep(30)
            return
        accept(identity, {"welcome": identity})

    with env(identify=identify, auth_timeout=0.3) as e:
        ws = e.raw()
        ws.send_text(hi("undecided"))
        # identify, the server's code, did not decide: 1013, which clients retry
        assert expect_close(ws, 10 * UNIT) == ("close", 1013, "wse.server-busy")
        assert "undecided" in calls
        assert "undecided" not in e.server.clients
        e.check_good_still_works()


def test_identify_that_raises(capfd, caplog):
    def identify(identity, accept, **_):
        if identity == "boom":
            raise RuntimeError("identify exploded")
        accept(identity, {"welcome": identity})

    with env(identify=identify) as e:
        ws = e.raw()
        ws.send_text(hi("boom"))
        assert expect_close(ws) == NOT_AUTHORIZED
        wait_for(lambda: e.errors)
        [(err, conn)] = e.errors
        assert isinstance(err, WseError)
        assert "identify exploded" in str(err.details)
        assert conn is not None and conn.identity == "boom"
        e.check_good_still_works()
    out, errout = capfd.readouterr()
    assert "Traceback" not in out + errout
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.exc_info]


# -- HTTP level ---------------------------------------------------------------------

@pytest.mark.parametrize("protocol", [None, "other-protocol", "wse-default-json-x",
                                      "wse-default"])
def test_without_the_subprotocol(protocol):
    with env() as e:
        ws = e.raw(protocol=protocol)
        assert ws.status == 101
        assert "wse-default-json" not in ws.response_head
        assert expect_close(ws) == PROTOCOL_ERR
        e.check_good_still_works()


def test_subprotocol_among_others_is_selected():
    with env() as e:
        ws = e.raw(protocol="chat, wse-default-json")
        assert "Sec-WebSocket-Protocol: wse-default-json" in ws.response_head
        ws.send_text(hi("multi"))
        assert json.loads(ws.recv()[1])[0] == "~wse:welcome"


def _http_get(url_port: int, path: str, extra: str = "") -> str:
    with socket.create_connection(("127.0.0.1", url_port), timeout=5 * UNIT) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{extra}\r\n"
                  .encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return data.decode("latin-1")


def _port(url: str) -> int:
    return int(url.split(":")[2].split("/")[0])


def test_plain_http_get_gets_426(capfd):
    with env() as e:
        answer = gevent.get_hub().threadpool.apply(_http_get, (_port(e.url), "/"))
        assert answer.startswith("HTTP/1.1 426"), answer
        e.check_good_still_works()
    assert "Traceback" not in "".join(capfd.readouterr())


UPGRADE = ("Upgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
           "Sec-WebSocket-Protocol: wse-default-json\r\n")


@pytest.mark.parametrize("request_", [
    "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 99\r\n\r\n",
    "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n",
    "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Version: 13\r\n\r\n",
    "this is not HTTP at all\r\n\r\n",
    "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
], ids=["bad-version", "bad-key", "no-key", "garbage", "bad-content-length"])
def test_bad_http_requests_get_400(request_, capfd):
    def exchange(port):
        with socket.create_connection(("127.0.0.1", port), timeout=5 * UNIT) as s:
            s.sendall(request_.encode())
            data = b""
            while b"\r\n\r\n" not in data:  # the status and headers are enough
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        return data.decode("latin-1")

    with env() as e:
        answer = gevent.get_hub().threadpool.apply(exchange, (_port(e.url),))
        assert answer.startswith("HTTP/1.1 400"), answer
        e.check_good_still_works()
    assert "Traceback" not in "".join(capfd.readouterr())


def test_path_option_refuses_other_paths(capfd):
    with env(path="/ws") as e:
        assert e.url.endswith("/ws")
        get = gevent.get_hub().threadpool.apply
        port = _port(e.url)
        for path in ("/other", "/", "/ws/x", "/w"):
            answer = get(_http_get, (port, path, UPGRADE))
            assert answer.startswith("HTTP/1.1 404"), answer
            assert "Sec-WebSocket-Accept" not in answer
            answer = get(_http_get, (port, path))
            assert answer.startswith("HTTP/1.1 404"), answer
        answer = get(_http_get, (port, "/ws"))
        assert answer.startswith("HTTP/1.1 426"), answer
        ok = e.raw(path="/ws")
        assert ok.status == 101
        ok.send_text(hi("on-path"))
        assert json.loads(ok.recv()[1])[0] == "~wse:welcome"
        e.check_good_still_works()
    assert "Traceback" not in "".join(capfd.readouterr())


# -- framing violations ------------------------------------------------------------

def _unmasked(ws):
    ws.send_raw(build_frame(OP_TEXT, b'["chat", 1, null]', mask=False))


def _reserved_bits(bit):
    def send(ws):
        frame = bytearray(build_frame(OP_TEXT, b'["chat", 1, null]', mask=True))
        frame[0] |= bit
        ws.send_raw(bytes(frame))
    return send


def _unknown_opcode(op):
    return lambda ws: ws.send_frame(op, b"")


def _fragmented_control(op):
    def send(ws):
        frame = bytearray(build_frame(op, b"" if op == 0x8 else b"x", mask=True))
        frame[0] &= 0x7F
        ws.send_raw(bytes(frame))
    return send


def _long_control(ws):
    ws.send_frame(OP_PING, b"x" * 126)


def _continuation_without_start(ws):
    ws.send_frame(OP_CONT, b"x")


def _new_message_inside_fragmented(ws):
    first = bytearray(build_frame(OP_TEXT, b'["chat",', mask=True))
    first[0] &= 0x7F
    ws.send_raw(bytes(first) + build_frame(OP_TEXT, b'1]', mask=True))


def _bad_close_code(ws):
    ws.send_frame(0x8, struct.pack("!H", 1005))


def _one_byte_close(ws):
    ws.send_frame(0x8, b"\x03")


VIOLATIONS = {
    "unmasked": _unmasked,
    "rsv1": _reserved_bits(0x40), "rsv2": _reserved_bits(0x20), "rsv3": _reserved_bits(0x10),
    "opcode-3": _unknown_opcode(0x3), "opcode-7": _unknown_opcode(0x7),
    "opcode-B": _unknown_opcode(0xB), "opcode-F": _unknown_opcode(0xF),
    "fragmented-ping": _fragmented_control(OP_PING),
    "fragmented-pong": _fragmented_control(OP_PONG),
    "fragmented-close": _fragmented_control(0x8),
    "control-over-125": _long_control,
    "continuation-without-start": _continuation_without_start,
    "new-message-inside-fragmented": _new_message_inside_fragmented,
    "close-code-1005": _bad_close_code,
    "close-1-byte": _one_byte_close,
}


@pytest.mark.parametrize("send", list(VIOLATIONS.values()), ids=list(VIOLATIONS))
def test_framing_violation_gets_1002(send):
    with env() as e:
        ws = e.ready_raw()
        send(ws)
        ev = expect_close(ws)
        assert ev[:2] == ("close", 1002), ev
        wait_for(lambda: [d for d in e.disconnected if d[0] == "raw"])
        assert [d[1] for d in e.disconnected if d[0] == "raw"] == [1002]
        e.check_good_still_works()


def test_control_frames_inside_a_fragmented_message_are_fine():
    with env() as e:
        ws = e.ready_raw()
        parts = [b'["echo", "frag', b'mented", ', b'"abcdefghij"]']
        first = bytearray(build_frame(OP_TEXT, parts[0], mask=True))
        first[0] &= 0x7F
        middle = bytearray(build_frame(OP_CONT, parts[1], mask=True))
        middle[0] &= 0x7F
        ws.send_raw(bytes(first) + build_frame(OP_PING, b"p1", mask=True) + bytes(middle)
                    + build_frame(OP_PONG, b"unsolicited", mask=True)
                    + build_frame(OP_CONT, parts[2], mask=True))
        assert ws.recv() == ("pong", b"p1")
        assert json.loads(ws.recv()[1]) == ["~wse:response", "fragmented", "abcdefghij"]
        assert e.errors == []
        e.check_good_still_works()


def test_framing_violation_before_hi_gets_1002():
    with env() as e:
        ws = e.raw()
        _unmasked(ws)
        assert expect_close(ws)[:2] == ("close", 1002)
        e.check_good_still_works()


@pytest.mark.parametrize("how", ["text", "fragmented", "close-reason"])
def test_invalid_utf8_gets_1007(how):
    with env() as e:
        ws = e.ready_raw()
        if how == "text":
            ws.send_frame(OP_TEXT, b'["chat", "\xff\xfe", null]')
        elif how == "fragmented":
            first = bytearray(build_frame(OP_TEXT, b'["chat", "\xc3', mask=True))
            first[0] &= 0x7F
            ws.send_raw(bytes(first) + build_frame(OP_CONT, b'\x28", null]', mask=True))
        else:
            ws.send_frame(0x8, struct.pack("!H", 1000) + b"\xff")
        ev = expect_close(ws)
        assert ev[:2] == ("close", 1007), ev
        e.check_good_still_works()


def test_client_close_code_is_echoed_and_reported():
    with env() as e:
        ws = e.ready_raw()
        ws.close(4001, "going away now")
        ev = ws.recv_until_close()
        assert ev == ("close", 4001, "going away now"), ev
        assert ws.recv() == ("eof",)
        wait_for(lambda: e.disconnected)
        assert e.disconnected == [("raw", 4001, "going away now")]
        e.check_good_still_works()


def test_client_close_without_code():
    with env() as e:
        ws = e.ready_raw()
        ws.send_raw(build_close(None, mask=True))
        ev = ws.recv_until_close()
        assert ev[0] == "close", ev
        wait_for(lambda: e.disconnected)
        assert e.disconnected == [("raw", 1005, "")]
        e.check_good_still_works()


def test_peer_that_vanishes_is_reported_1006():
    with env() as e:
        ws = e.ready_raw()
        ws.shutdown()
        wait_for(lambda: e.disconnected)
        assert e.disconnected == [("raw", 1006, "")]
        e.check_good_still_works()


# -- silent peers and slow readers -------------------------------------------------

def _answer_pings(ws: RawWS, pings: list) -> None:
    """Read everything; answer each ping with a pong carrying its payload."""
    while True:
        ev = ws.recv(timeout=30 * UNIT)
        if ev[0] == "ping":
            ws.send_frame(OP_PONG, ev[1])
            pings.append(ev[1])
        elif ev[0] in ("close", "eof"):
            pings.append(ev)
            return


def test_silent_peer_is_cut_and_a_ponging_one_stays():
    with env(ping_interval=0.2, ping_timeout=0.3) as e:
        silent = e.ready_raw("silent")
        alive = e.ready_raw("alive")
        pings = []
        reader = gevent.spawn(_answer_pings, alive, pings)
        try:
            wait_for(lambda: [d for d in e.disconnected if d[0] == "silent"], timeout=10 * UNIT)
            assert [d[1] for d in e.disconnected if d[0] == "silent"] == [1006]
            # 1006: the socket was cut, without a closing handshake
            assert silent.recv_until_close() == ("eof",)
            # the ponging peer was pinged, answered, and outlives several silent periods
            n = len(pings)
            wait_for(lambda: len(pings) >= n + 4, timeout=10 * UNIT)
            assert all(isinstance(p, bytes) for p in pings)
            assert [d for d in e.disconnected if d[0] == "alive"] == []
            assert e.conn_of("alive").ready_state == 1
            assert list(e.server.clients) != [] and "alive" in e.server.clients
            assert "silent" not in e.server.clients
        finally:
            reader.kill()
        e.check_good_still_works()  # the WseClient answers pings by itself


def test_slow_reader_is_dropped_when_its_send_queue_is_full():
    with env(max_send_queue=64 * 1024) as e:
        ws = e.ready_raw("slow")
        ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        conn = e.conn_of("slow")
        big = "x" * 32 * 1024
        sent = 0
        for _ in range(5000):  # at most 160 MB: far more than the socket buffers
            if not conn.send("big", big):
                break
            sent += 1
            if sent % 16 == 0:
                gevent.sleep(0)  # let the writer greenlet drain what it can
        assert sent < 5000, "the server never gave up on a client that does not read"
        wait_for(lambda: [d for d in e.disconnected if d[0] == "slow"], timeout=10 * UNIT)
        assert [d[1:] for d in e.disconnected if d[0] == "slow"] == [
            (1008, "wse.send-queue-full")]
        assert "slow" not in e.server.clients
        e.check_good_still_works()
        # a broadcast still reaches the good client (and skips the dropped one)
        got = []
        e.good.channel.on("news", got.append)
        e.server.broadcast("news", 1)
        wait_for(lambda: got == [1])


def test_a_message_before_a_bad_frame_in_the_same_read_is_delivered_and_tcp_ends():
    got = []
    with env(close_timeout=30 * UNIT) as e:
        e.server.channel.on("note", lambda conn, payload: got.append(payload))
        ws = e.ready_raw()
        bad = bytearray(build_frame(OP_TEXT, b"x", mask=True))
        bad[0] |= 0x40  # a reserved bit
        ws.send_raw(build_frame(OP_TEXT, b'["note","before",null]', mask=True) + bytes(bad))
        ev = ws.recv_until_close()
        assert ev[:2] == ("close", 1002), ev
        # the server ends TCP after failing the connection: no wait for close_timeout
        # (30 units) even though this peer never answers the close frame
        assert ws.recv(timeout=5 * UNIT) == ("eof",)
        wait_for(lambda: got)
        assert got == ["before"]
        ws.shutdown()  # our FIN ends the server's discarding at once
        wait_for(lambda: e.disconnected)
        assert e.disconnected[0][:2] == ("raw", 1002)
        e.check_good_still_works()


def test_a_flood_of_empty_continuation_frames_is_closed_1008():
    with env(max_fragments=100) as e:
        ws = e.ready_raw()
        first = bytearray(build_frame(OP_TEXT, b"", mask=True))
        first[0] &= 0x7F  # a text message that goes on in continuation frames
        ws.send_raw(bytes(first))
        empty_cont = bytearray(build_frame(OP_CONT, b"", mask=True))
        empty_cont[0] &= 0x7F  # not the last fragment
        try:
            ws.send_raw(bytes(empty_cont) * 5000)
        except OSError:
            pass  # the server may have cut us while we were still sending
        ev = expect_close(ws)
        assert ev == ("close", 1008, "too many fragments"), ev
        wait_for(lambda: e.disconnected)
        assert e.disconnected[0][:2] == ("raw", 1008)
        e.check_good_still_works()
