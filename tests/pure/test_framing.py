"""Pure tests of RFC 6455 framing: bytes in, events out."""
import struct

import pytest

from wse_sync.core.frames import (OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_TEXT, FrameError,
                              FrameReader, apply_mask, build_close, build_frame)


def masked(opcode, payload, fin=True, rsv=0):
    frame = bytearray(build_frame(opcode, payload, mask=True))
    if not fin:
        frame[0] &= 0x7F
    frame[0] |= rsv
    return bytes(frame)


def test_roundtrip_sizes_byte_by_byte():
    for n in (0, 1, 125, 126, 65535, 65536, 70000):
        payload = bytes(range(256)) * (n // 256) + bytes(n % 256)
        frame = build_frame(OP_BINARY, payload, mask=True)
        r = FrameReader()
        events = []
        step = 1 if n < 200 else 4096
        for i in range(0, len(frame), step):
            events += r.feed(frame[i:i + step])
        assert events == [("binary", payload)]


def test_text_is_decoded_and_validated():
    assert FrameReader().feed(masked(OP_TEXT, "é€".encode())) == [("text", "é€")]
    with pytest.raises(FrameError) as info:
        FrameReader().feed(masked(OP_TEXT, b"\xff"))
    assert info.value.code == 1007


def test_fragments_and_interleaved_ping():
    r = FrameReader()
    data = masked(OP_TEXT, b"ab", fin=False) + masked(OP_PING, b"p") + masked(OP_CONT, b"cd")
    assert r.feed(data) == [("ping", b"p"), ("text", "abcd")]


def test_size_limit_checked_on_the_header():
    r = FrameReader(max_message_size=10)
    header = struct.pack("!BBQ", 0x82, 0x80 | 127, 2 ** 31) + b"mask"
    with pytest.raises(FrameError) as info:
        r.feed(header)
    assert info.value.code == 1009
    r = FrameReader(max_message_size=10)
    r.feed(masked(OP_TEXT, b"123456", fin=False))
    with pytest.raises(FrameError):
        r.feed(masked(OP_CONT, b"123456"))


@pytest.mark.parametrize("frame", [
    build_frame(OP_TEXT, b"x", mask=False),          # client frame not masked
    masked(OP_TEXT, b"x", rsv=0x40),                  # reserved bit
    masked(0x3, b"x"),                                # unknown opcode
    masked(OP_PING, b"x", fin=False),                 # fragmented control frame
    masked(OP_PING, b"x" * 126),                      # control frame too long
    masked(OP_CONT, b"x"),                            # continuation without start
    masked(OP_CLOSE, b"\x03"),                        # 1-byte close payload
    masked(OP_CLOSE, struct.pack("!H", 999)),         # invalid close code
])
def test_protocol_errors(frame):
    with pytest.raises(FrameError) as info:
        FrameReader().feed(frame)
    assert info.value.code == 1002


def test_close_frames():
    r = FrameReader(expect_mask=False)
    assert r.feed(build_close(1000, "wse.not-authorized")) == [("close", 1000, "wse.not-authorized")]
    assert FrameReader(expect_mask=False).feed(build_close(None)) == [("close", 1005, "")]
    # reasons are cut at 123 bytes without splitting a character
    frame = build_close(4000, "é" * 100)
    code, reason = FrameReader(expect_mask=False).feed(frame)[0][1:]
    assert code == 4000 and reason == "é" * 61
    assert frame[2:4] == struct.pack("!H", 4000)


def test_mask_matches_bytewise_xor():
    data, key = bytes(range(200)), b"\x01\x80\xff\x10"
    expected = bytes(b ^ key[i % 4] for i, b in enumerate(data))
    assert apply_mask(data, key) == expected
    assert apply_mask(data[:7], key) == expected[:7]


def test_events_before_a_violation_come_with_the_error():
    # a valid message and a ping, then a bad frame, all in one read (Autobahn 3.2, 5.15)
    data = masked(OP_TEXT, b"ok") + masked(OP_PING, b"p") + masked(OP_TEXT, b"x", rsv=0x20)
    with pytest.raises(FrameError) as info:
        FrameReader().feed(data)
    assert info.value.code == 1002
    assert info.value.events == [("text", "ok"), ("ping", b"p")]


def test_invalid_utf8_fails_on_the_fragment_that_carries_it():
    r = FrameReader()
    assert r.feed(masked(OP_TEXT, "é".encode(), fin=False)) == []
    # a character split across fragments is fine
    euro = "€".encode()
    assert r.feed(masked(OP_CONT, euro[:1], fin=False)) == []
    assert r.feed(masked(OP_CONT, euro[1:], fin=False)) == []
    with pytest.raises(FrameError) as info:
        r.feed(masked(OP_CONT, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80", fin=False))
    assert info.value.code == 1007
    # a message that ends in the middle of a character fails on its last fragment
    r = FrameReader()
    assert r.feed(masked(OP_TEXT, b"a", fin=False)) == []
    with pytest.raises(FrameError) as info:
        r.feed(masked(OP_CONT, b"\xe2\x82"))
    assert info.value.code == 1007


def test_fragmented_text_and_binary_are_joined():
    r = FrameReader()
    data = (masked(OP_TEXT, "κό".encode()[:3], fin=False) + masked(OP_CONT, "κό".encode()[3:])
            + masked(OP_BINARY, b"\x00", fin=False) + masked(OP_CONT, b"\xff"))
    assert r.feed(data) == [("text", "κό"), ("binary", b"\x00\xff")]


def test_invalid_utf8_fails_while_its_frame_is_still_arriving():
    # Autobahn 6.4.3/6.4.4: one frame in pieces; fail on the piece with the bad bytes
    payload = "κόσμε".encode() + b"\xf4\x90\x80\x80" + b"edited"
    frame = masked(OP_TEXT, payload)
    head = 6  # 2 header bytes + 4 mask bytes
    r = FrameReader()
    assert r.feed(frame[:head + 5]) == []
    with pytest.raises(FrameError) as info:
        r.feed(frame[head + 5:head + 12])
    assert info.value.code == 1007
    # a valid frame in pieces, a character split between them, a continuation too
    r = FrameReader()
    good = masked(OP_TEXT, "aé€".encode(), fin=False) + masked(OP_CONT, "€x".encode())
    events = []
    for i in range(len(good)):
        events += r.feed(good[i:i + 1])
    assert events == [("text", "aé€€x")]
    r = FrameReader()
    cont = masked(OP_CONT, b"\x80\xff")
    assert r.feed(masked(OP_TEXT, b"\xe2\x82", fin=False)) == []
    with pytest.raises(FrameError):  # \xe2\x82 + \x80 is the euro sign; \xff is not
        r.feed(cont[:head + 1])
        r.feed(cont[head + 1:])


def test_a_message_in_too_many_fragments_fails_with_1008():
    r = FrameReader(max_fragments=3)
    data = masked(OP_TEXT, b"", fin=False) + masked(OP_CONT, b"", fin=False) + masked(OP_CONT, b"")
    assert r.feed(data) == [("text", "")]  # three frames are allowed
    with pytest.raises(FrameError) as info:
        r.feed(masked(OP_TEXT, b"a", fin=False) + masked(OP_CONT, b"", fin=False) * 3)
    assert info.value.code == 1008 and info.value.reason == "too many fragments"
