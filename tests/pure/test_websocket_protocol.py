"""The sans-I/O WebSocket Protocol: bytes and calls in, events and bytes out."""
import struct

import pytest

from test_framing import masked as from_client
from wse_sync.core.frames import OP_CONT, OP_PING, OP_PONG, OP_TEXT, FrameReader, build_close, build_frame
from wse_sync.core.websocket import CLIENT, SERVER, Close, Message, Ping, Protocol, State


def sent_frames(proto, expect_mask=False):
    """What the protocol wants written, parsed back: (frames, eof_requested)."""
    out = proto.data_to_send()
    eof = b"" in out
    data = b"".join(out)
    return FrameReader(expect_mask=expect_mask).feed(data), eof


def test_messages_in_and_out():
    p = Protocol(SERVER)
    p.receive_data(from_client(OP_TEXT, "héllo".encode()) + from_client(0x2, b"\x00\x01"))
    assert p.events_received() == [Message("héllo"), Message(b"\x00\x01")]
    assert p.events_received() == []
    assert p.send_text("back") and p.send_binary(b"\xff")
    assert sent_frames(p) == ([("text", "back"), ("binary", b"\xff")], False)


def test_a_ping_is_answered_by_the_protocol():
    p = Protocol(SERVER)
    p.receive_data(from_client(OP_PING, b"abc"))
    assert p.events_received() == [Ping(b"abc")]
    frames = b"".join(p.data_to_send())
    assert frames == build_frame(OP_PONG, b"abc")


def test_peer_closes_first_code_and_reason_are_echoed():
    p = Protocol(SERVER)
    p.receive_data(build_close(4001, "bye now", mask=True))
    assert p.events_received() == [Close(4001, "bye now")]
    assert sent_frames(p) == ([("close", 4001, "bye now")], False)
    assert p.state == State.CLOSING and p.handshake_done() and p.close_expected()
    assert p.close_status == (4001, "bye now")
    # nothing may follow a close frame
    p.receive_data(from_client(OP_TEXT, b"late"))
    assert p.events_received() == []
    assert not p.send_text("too late")
    p.receive_eof()
    assert p.state == State.CLOSED and p.close_status == (4001, "bye now")


def test_we_close_first_and_the_peer_answers():
    p = Protocol(SERVER)
    assert p.send_close(1000, "wse.by-server")
    assert not p.send_close(1000, "twice")
    assert sent_frames(p) == ([("close", 1000, "wse.by-server")], False)
    assert p.close_expected() and not p.handshake_done()
    p.receive_data(build_close(1000, "", mask=True))
    assert p.events_received() == [Close(1000, "")]
    assert p.data_to_send() == []  # no echo of an answer
    assert p.handshake_done()
    assert p.close_status == (1000, "wse.by-server")


def test_a_violation_waits_for_settle_so_earlier_messages_can_be_answered():
    p = Protocol(SERVER)
    p.receive_data(from_client(OP_TEXT, b"first") + from_client(OP_TEXT, b"x", rsv=0x40))
    assert p.events_received() == [Message("first")]
    assert p.state == State.OPEN
    assert p.send_text("answer to first")
    p.settle()
    frames, eof = sent_frames(p)
    assert frames == [("text", "answer to first"), ("close", 1002, "reserved bits set")]
    assert eof  # the server ends TCP first after failing
    assert p.failure is not None and p.failure.code == 1002
    p.receive_data(from_client(OP_TEXT, b"ignored"))
    assert p.events_received() == [] and p.data_to_send() == []


def test_the_next_input_settles_a_pending_violation_too():
    p = Protocol(SERVER)
    p.receive_data(from_client(OP_CONT, b"no message"))
    p.receive_data(b"more")
    assert p.state == State.CLOSING
    assert sent_frames(p)[0] == [("close", 1002, "continuation frame without a message")]


def test_message_too_big_is_1009():
    p = Protocol(SERVER, max_message_size=10)
    p.receive_data(struct.pack("!BBH", 0x81, 0x80 | 126, 5000) + b"mask")
    p.settle()
    assert sent_frames(p)[0] == [("close", 1009, "message too big")]


def test_invalid_utf8_is_1007():
    p = Protocol(SERVER)
    p.receive_data(from_client(OP_TEXT, b"ok", fin=False) + from_client(OP_CONT, b"\xff"))
    p.settle()
    assert sent_frames(p)[0] == [("close", 1007, "text message is not UTF-8")]


def test_eof_without_close_is_1006():
    p = Protocol(SERVER)
    p.receive_eof()
    assert p.state == State.CLOSED and p.close_status == (1006, "")
    assert not p.send_text("x")


def test_the_client_side_masks_and_expects_unmasked_frames():
    c = Protocol(CLIENT)
    c.send_text("hi")
    frames, _ = sent_frames(c, expect_mask=True)  # parses only if masked
    assert frames == [("text", "hi")]
    c.receive_data(build_frame(OP_TEXT, b"from server"))
    assert c.events_received() == [Message("from server")]
    c.receive_data(build_frame(OP_TEXT, b"masked", mask=True))  # servers must not mask
    c.settle()
    frames, eof = sent_frames(c, expect_mask=True)
    assert frames[0][:2] == ("close", 1002)
    assert not eof  # the client leaves ending TCP to the server


def test_fragments_pass_through_with_interleaved_ping():
    p = Protocol(SERVER)
    p.receive_data(from_client(OP_TEXT, b"ab", fin=False) + from_client(OP_PING, b"")
                   + from_client(OP_CONT, b"cd"))
    assert p.events_received() == [Ping(b""), Message("abcd")]


def test_side_is_checked():
    with pytest.raises(ValueError):
        Protocol("both")
