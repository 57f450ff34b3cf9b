"""RFC 6455 framing, sans-I/O: bytes in, messages out; messages in, bytes out.

``FrameReader.feed(data)`` returns a list of events:
``("text", str)``, ``("binary", bytes)``, ``("ping", bytes)``,
``("pong", bytes)`` and ``("close", code, reason)``. A violation raises
``FrameError`` carrying the close code the peer must be sent (1002 protocol
error, 1007 invalid UTF-8, 1009 too big) and, in ``events``, what the same
``feed`` call completed before the violation (deliver those first). The size
limit is checked against the announced length, before anything is buffered;
the UTF-8 of a fragmented text message is checked fragment by fragment.
"""
from __future__ import annotations

import codecs
import os
import struct
from enum import IntEnum
from typing import Any, List, Optional, Tuple, Union

# what FrameReader.feed returns: ("text", str), ("binary", bytes), ("ping", bytes),
# ("pong", bytes), ("close", code, reason)
RawEvent = Tuple[Any, ...]

__all__ = [
    "Opcode", "CloseCode", "FrameError", "FrameReader", "build_frame", "build_close",
    "parse_close_payload", "apply_mask",
    "OP_CONT", "OP_TEXT", "OP_BINARY", "OP_CLOSE", "OP_PING", "OP_PONG",
]


class Opcode(IntEnum):
    """RFC 6455 §5.2 opcodes."""

    CONT = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class CloseCode(IntEnum):
    """The close codes this package sends or gives meaning to (RFC 6455 §7.4)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS = 1005        # never on the wire: the close frame had no code
    ABNORMAL = 1006         # never on the wire: TCP ended without a close frame
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014
    JUMP = 4000             # wse: the client moves to another server


# plain ints on the hot path: comparing an int with an IntEnum member is slower
OP_CONT, OP_TEXT, OP_BINARY = int(Opcode.CONT), int(Opcode.TEXT), int(Opcode.BINARY)
OP_CLOSE, OP_PING, OP_PONG = int(Opcode.CLOSE), int(Opcode.PING), int(Opcode.PONG)
_DATA_OPS = (OP_CONT, OP_TEXT, OP_BINARY)
_CONTROL_OPS = (OP_CLOSE, OP_PING, OP_PONG)

# Close codes a peer may put on the wire (RFC 6455 §7.4).
_VALID_CLOSE = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}

try:  # a C helper when installed; the int XOR below is exact and fast too
    from wsaccel.xormask import XorMaskerSimple as _XorMasker  # type: ignore
except ImportError:  # pragma: no cover - depends on the extra
    _XorMasker = None


def apply_mask(data: bytes, mask: bytes) -> bytes:
    """XOR ``data`` with the 4-byte ``mask`` (the whole buffer at once)."""
    n = len(data)
    if n == 0:
        return b""
    if _XorMasker is not None and n > 64:
        return bytes(_XorMasker(mask).process(data))
    key = mask * (n // 4 + 1)
    return (int.from_bytes(data, "little") ^ int.from_bytes(key[:n], "little")).to_bytes(
        n, "little"
    )


class FrameError(Exception):
    """The peer broke the framing rules; close the connection with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason
        # events completed by the same feed() before the violation
        self.events: List[RawEvent] = []


def parse_close_payload(payload: bytes) -> Tuple[int, str]:
    """Code and reason of a close frame; 1005 when it has no code."""
    if not payload:
        return 1005, ""
    if len(payload) == 1:
        raise FrameError(1002, "close frame with a 1-byte payload")
    code = struct.unpack("!H", payload[:2])[0]
    if not (code in _VALID_CLOSE or 3000 <= code <= 4999):
        raise FrameError(1002, f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError(1007, "close reason is not UTF-8") from None
    return code, reason


class FrameReader:
    """Incremental frame parser for one direction of one connection.

    ``expect_mask`` is True on the server side (clients must mask) and False
    on the client side (servers must not).
    """

    def __init__(self, max_message_size: Optional[int] = None, expect_mask: bool = True,
                 max_fragments: Optional[int] = None) -> None:
        # largest accepted message (sum of its fragments); None = unlimited
        self.max_message_size = max_message_size
        self.expect_mask = expect_mask
        # most frames one message may arrive in (empty fragments cost memory too); None = no limit
        self.max_fragments = max_fragments
        self._buf = bytearray()
        # opcode and fragments of a fragmented message in progress (a text
        # message's fragments are decoded as they come, to fail on the bad one)
        self._frag_op: Optional[int] = None
        self._frags: List[Any] = []
        self._frag_len = 0
        self._decoder: Optional[codecs.IncrementalDecoder] = None
        # the UTF-8 check of a text frame still arriving: its decoder and how
        # many payload bytes it has seen (invalid text fails before the frame ends)
        self._probe: Optional[codecs.IncrementalDecoder] = None
        self._probed = 0

    def feed(self, data: bytes) -> List[RawEvent]:
        """Add received bytes; return the complete events they finish.

        Raises FrameError on a violation, with the events completed before it.
        """
        events: List[RawEvent] = []
        try:
            self._feed(data, events)
        except FrameError as exc:
            exc.events = events
            raise
        return events

    def _feed(self, data: bytes, events: List[RawEvent]) -> None:
        buf: Union[bytes, bytearray]
        if self._buf:
            self._buf += data
            buf = self._buf
        else:  # the common case: parse the received bytes without copying them
            buf = data
        pos = 0
        n = len(buf)
        while True:
            if n - pos < 2:
                break
            b0 = buf[pos]
            b1 = buf[pos + 1]
            head = 2
            length = b1 & 0x7F
            if length == 126:
                if n - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                head = 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = struct.unpack_from("!Q", buf, pos + 2)[0]
                head = 10
            masked = b1 & 0x80
            opcode = b0 & 0x0F
            fin = b0 & 0x80
            # the common frame, a whole unfragmented text or binary message
            # (FIN, no RSV bits) outside a fragmented one, passes every check
            # of _check_header in this one test (saving a call per message)
            limit = self.max_message_size
            if not ((b0 == 0x81 or b0 == 0x82) and self._frag_op is None
                    and (masked != 0) == self.expect_mask
                    and (limit is None or length <= limit)):
                self._check_header(b0, opcode, fin, masked, length)
            if masked:
                head += 4
            if n - pos < head + length:
                if opcode == OP_TEXT or (opcode == OP_CONT and self._decoder is not None):
                    self._probe_text(buf, pos + head, n, length, opcode, masked)
                break
            if self._probe is not None:
                self._probe, self._probed = None, 0
            start = pos + head
            payload = bytes(buf[start:start + length])
            if masked:
                payload = apply_mask(payload, bytes(buf[start - 4:start]))
            pos = start + length
            if b0 == 0x81:  # a whole text message (checked above): _message, inline
                try:
                    event: Optional[Tuple[Any, ...]] = ("text", payload.decode("utf-8"))
                except UnicodeDecodeError:
                    raise FrameError(1007, "text message is not UTF-8") from None
            else:
                event = self._frame(opcode, fin, payload)
            if event is not None:
                events.append(event)
                if event[0] == "close":
                    break
        if buf is self._buf:
            if pos:
                del self._buf[:pos]
        elif pos < n:
            self._buf = bytearray(buf[pos:])

    def _probe_text(self, buf: Union[bytes, bytearray], start: int, n: int, length: int, opcode: int,
                    masked: int) -> None:
        avail = min(n - start, length)
        done = self._probed
        if avail <= done:
            return
        probe = self._probe
        if probe is None:
            probe = self._probe = codecs.getincrementaldecoder("utf-8")()
            if opcode == OP_CONT and self._decoder is not None:
                probe.setstate(self._decoder.getstate())
        chunk = bytes(buf[start + done:start + avail])
        if masked:
            key = bytes(buf[start - 4:start])
            k = done % 4
            chunk = apply_mask(chunk, key[k:] + key[:k])
        try:
            probe.decode(chunk)
        except UnicodeDecodeError:
            raise FrameError(1007, "text message is not UTF-8") from None
        self._probed = avail

    def _check_header(self, b0: int, opcode: int, fin: int, masked: int, length: int) -> None:
        if b0 & 0x70:
            raise FrameError(1002, "reserved bits set")
        if bool(masked) != self.expect_mask:
            raise FrameError(1002, "frame masking is wrong for this side")
        if opcode in _CONTROL_OPS:
            if not fin or length > 125:
                raise FrameError(1002, "invalid control frame")
            return
        if opcode not in _DATA_OPS:
            raise FrameError(1002, f"unknown opcode {opcode}")
        if opcode == OP_CONT and self._frag_op is None:
            raise FrameError(1002, "continuation frame without a message")
        if opcode != OP_CONT and self._frag_op is not None:
            raise FrameError(1002, "new message inside a fragmented one")
        limit = self.max_message_size
        if limit is not None and self._frag_len + length > limit:
            raise FrameError(1009, "message too big")

    def _frame(self, opcode: int, fin: int, payload: bytes) -> Optional[RawEvent]:
        if opcode == OP_PING:
            return ("ping", payload)
        if opcode == OP_PONG:
            return ("pong", payload)
        if opcode == OP_CLOSE:
            code, reason = parse_close_payload(payload)
            return ("close", code, reason)
        if opcode != OP_CONT:
            if fin:
                return self._message(opcode, payload)
            self._frag_op = opcode
            self._frags = []
            self._frag_len = 0
            if opcode == OP_TEXT:
                self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._frag_len += len(payload)
        if self.max_fragments is not None and len(self._frags) >= self.max_fragments:
            raise FrameError(1008, "too many fragments")
        decoder = self._decoder
        if decoder is not None:
            try:
                self._frags.append(decoder.decode(payload, final=bool(fin)))
            except UnicodeDecodeError:
                raise FrameError(1007, "text message is not UTF-8") from None
        else:
            self._frags.append(payload)
        if not fin:
            return None
        frags = self._frags
        self._frag_op, self._frags, self._frag_len, self._decoder = None, [], 0, None
        if decoder is not None:
            return ("text", "".join(frags))
        return ("binary", b"".join(frags))

    @staticmethod
    def _message(opcode: int, data: bytes) -> RawEvent:
        if opcode == OP_TEXT:
            try:
                return ("text", data.decode("utf-8"))
            except UnicodeDecodeError:
                raise FrameError(1007, "text message is not UTF-8") from None
        return ("binary", data)


def build_frame(opcode: int, payload: bytes, mask: bool = False) -> bytes:
    """One complete (FIN) frame; ``mask=True`` on the client side."""
    n = len(payload)
    first = 0x80 | opcode
    mbit = 0x80 if mask else 0
    if n < 126:
        header = struct.pack("!BB", first, mbit | n)
    elif n < 65536:
        header = struct.pack("!BBH", first, mbit | 126, n)
    else:
        header = struct.pack("!BBQ", first, mbit | 127, n)
    if mask:
        key = os.urandom(4)
        return header + key + apply_mask(payload, key)
    return header + payload


def build_close(code: Optional[int], reason: str = "", mask: bool = False) -> bytes:
    """A close frame: 2-byte code + UTF-8 reason cut to 123 bytes; no code -> empty."""
    if code is None or code == 1005:
        return build_frame(OP_CLOSE, b"", mask)
    raw = reason.encode("utf-8")[:123]
    # do not cut a multi-byte character in half
    raw = raw.decode("utf-8", "ignore").encode("utf-8")
    return build_frame(OP_CLOSE, struct.pack("!H", code) + raw, mask)
