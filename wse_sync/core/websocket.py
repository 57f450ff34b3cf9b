"""One WebSocket connection after the upgrade, sans-I/O (RFC 6455).

``Protocol`` owns every rule of the connection: framing, UTF-8 and size
limits, ping/pong, and the closing handshake. The I/O shell (the server's
transport, ``WseClient``) only moves bytes:

- bytes read from the socket go to ``receive_data()``; the end of the
  stream to ``receive_eof()``;
- ``events_received()`` gives what arrived: ``Message``, ``Ping``, ``Pong``
  and ``Close`` (a ping is answered by the protocol itself); after handling
  them the shell calls ``settle()``, which applies a violation found after
  those events (so that answers to them still go out before the close);
- ``data_to_send()`` gives the bytes to write; an empty ``bytes`` in that
  list means "end our half of TCP now" (``shutdown(SHUT_WR)``);
- once ``close_expected()`` is True the shell waits at most its close
  timeout for TCP to end, then cuts it; once ``handshake_done()`` it closes
  TCP as soon as what is queued is written.

A violation fails the connection: the close frame with the right code goes
out, input is discarded from there on, and the server ends TCP first.
Events parsed before the violation are still delivered, and the connection
stays open for their answers until ``settle()``.
"""
from __future__ import annotations

from enum import IntEnum
from typing import List, NamedTuple, Optional, Tuple, Union

from .frames import (OP_BINARY, OP_PING, OP_PONG, OP_TEXT, CloseCode, FrameError, FrameReader,
                     RawEvent, build_close, build_frame)

__all__ = ["Protocol", "State", "Message", "Ping", "Pong", "Close", "Event", "SERVER", "CLIENT"]

SERVER, CLIENT = "server", "client"


class State(IntEnum):
    """The connection's state, as ``WebSocket.readyState`` names them."""

    OPEN = 1
    CLOSING = 2
    CLOSED = 3


class Message(NamedTuple):
    """A complete data message: ``str`` for text, ``bytes`` for binary."""

    data: Union[str, bytes]


class Ping(NamedTuple):
    data: bytes


class Pong(NamedTuple):
    data: bytes


class Close(NamedTuple):
    """The peer's close frame (code 1005 when it carried none)."""

    code: int
    reason: str


Event = Union[Message, Ping, Pong, Close]

_EOF = b""

# plain names for the states on the hot path: ``State.OPEN`` is an enum class
# attribute lookup (~60 ns, several per message); these are the same members
_OPEN, _CLOSING, _CLOSED = State.OPEN, State.CLOSING, State.CLOSED


class Protocol:
    """The state of one side of one WebSocket connection.

    ``side`` is ``SERVER`` (expects masked frames, ends TCP first) or
    ``CLIENT`` (masks its frames, waits for the server to end TCP).
    ``max_message_size`` (bytes, None = unlimited) is checked against the
    announced length before anything is buffered; a message in more than
    ``max_fragments`` frames fails the connection with 1008.
    """

    __slots__ = ("side", "state", "close_status", "close_sent", "close_rcvd", "failure",
                 "_reader", "_mask", "_events", "_out", "_eof_sent", "_discarding", "_pending")

    def __init__(self, side: str = SERVER, max_message_size: Optional[int] = None,
                 max_fragments: Optional[int] = None) -> None:
        if side not in (SERVER, CLIENT):
            raise ValueError(f"side must be {SERVER!r} or {CLIENT!r}")
        self.side = side
        self.state = _OPEN
        # (code, reason) to report: the peer's when it closed first, else ours;
        # (1006, "") when TCP ended without a closing handshake
        self.close_status: Optional[Tuple[int, str]] = None
        self.close_sent: Optional[Tuple[int, str]] = None
        self.close_rcvd: Optional[Tuple[int, str]] = None
        # the violation that failed the connection, if one did
        self.failure: Optional[FrameError] = None
        self._mask = side == CLIENT
        self._reader = FrameReader(max_message_size, expect_mask=side == SERVER,
                                   max_fragments=max_fragments)
        self._events: List[Event] = []
        self._out: List[bytes] = []
        self._eof_sent = False
        self._discarding = False
        # a violation found behind events not yet handled (applied by settle())
        self._pending: Optional[FrameError] = None

    # -- input -----------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the socket."""
        self.settle()
        if self._discarding or self.state == _CLOSED:
            return
        try:
            raw = self._reader.feed(data)
        except FrameError as exc:
            self._take(exc.events)
            self._discarding = True
            if self.state == _OPEN:
                self._pending = exc
            return
        self._take(raw)

    def settle(self) -> None:
        """Apply a violation found behind the events already delivered."""
        exc, self._pending = self._pending, None
        if exc is not None and self.state == _OPEN:
            self.fail(exc.code, exc.reason if exc.code != CloseCode.MESSAGE_TOO_BIG
                      else "message too big", exc)

    def receive_eof(self) -> None:
        """The peer ended TCP (or the socket failed)."""
        self._pending = None  # nobody is left to tell
        if self.state == _CLOSED:
            return
        self.state = _CLOSED
        if self.close_status is None:
            self.close_status = (CloseCode.ABNORMAL, "")

    def events_received(self) -> List[Event]:
        """What arrived since the last call, in order."""
        events, self._events = self._events, []
        return events

    def _take(self, raw: List[RawEvent]) -> None:
        events = self._events
        for ev in raw:
            kind = ev[0]
            if kind == "text" or kind == "binary":
                if self.state == _OPEN:
                    events.append(Message(ev[1]))
            elif kind == "ping":
                if self.state == _OPEN:
                    self._out.append(build_frame(OP_PONG, ev[1], self._mask))
                events.append(Ping(ev[1]))
            elif kind == "pong":
                events.append(Pong(ev[1]))
            else:  # close
                self._close_received(ev[1], ev[2])
                events.append(Close(ev[1], ev[2]))
                return

    def _close_received(self, code: int, reason: str) -> None:
        self.close_rcvd = (code, reason)
        self._discarding = True  # nothing may follow a close frame
        if self.state == _OPEN:
            # the peer closed first: echo its code and reason (RFC 6455 5.5.1)
            self.close_status = (code, reason)
            self.close_sent = (code, reason)
            self._out.append(build_close(code, reason, self._mask))
        self.state = _CLOSING

    # -- output ----------------------------------------------------------
    def data_to_send(self) -> List[bytes]:
        """Bytes to write, in order; ``b""`` means end our half of TCP."""
        out, self._out = self._out, []
        return out

    def has_data_to_send(self) -> bool:
        return bool(self._out)

    @property
    def open(self) -> bool:
        return self.state == _OPEN

    def send_text(self, text: str) -> bool:
        """Queue a text message; False (nothing queued) unless the connection is open."""
        if self.state != _OPEN:
            return False
        self._out.append(build_frame(OP_TEXT, text.encode("utf-8"), self._mask))
        return True

    def send_binary(self, data: bytes) -> bool:
        if self.state != _OPEN:
            return False
        self._out.append(build_frame(OP_BINARY, bytes(data), self._mask))
        return True

    def frame(self, data: Union[str, bytes]) -> bytes:
        """The wire bytes of one message (text for str), for ``send_frame``."""
        if isinstance(data, str):
            return build_frame(OP_TEXT, data.encode("utf-8"), self._mask)
        return build_frame(OP_BINARY, bytes(data), self._mask)

    def send_frame(self, frame: bytes) -> bool:
        """Queue bytes built by ``frame()`` (one build serves many connections)."""
        if self.state != _OPEN:
            return False
        self._out.append(frame)
        return True

    def send_ping(self, data: bytes = b"") -> bool:
        if self.state != _OPEN:
            return False
        self._out.append(build_frame(OP_PING, data, self._mask))
        return True

    def send_close(self, code: int = CloseCode.NORMAL, reason: str = "") -> bool:
        """Start the closing handshake; False when it has already started."""
        if self.state != _OPEN:
            return False
        self.close_status = self.close_sent = (code, reason)
        self._out.append(build_close(code, reason, self._mask))
        self.state = _CLOSING
        return True

    def fail(self, code: int, reason: str = "", failure: Optional[FrameError] = None) -> None:
        """Fail the connection (RFC 6455 7.1.7): close frame, discard input,
        and on the server end TCP without waiting for the peer's reply."""
        self.failure = failure
        self.send_close(code, reason)
        self._discarding = True
        if self.side == SERVER:
            self._send_eof()

    def _send_eof(self) -> None:
        if not self._eof_sent:
            self._eof_sent = True
            self._out.append(_EOF)

    def close_expected(self) -> bool:
        """True when TCP should end soon: the shell arms its close timeout."""
        return self.state != _OPEN

    def handshake_done(self) -> bool:
        """Both close frames have passed: once what is queued is written, the
        shell closes TCP (RFC 6455 7.1.1; the server does it first)."""
        return self.close_sent is not None and self.close_rcvd is not None
