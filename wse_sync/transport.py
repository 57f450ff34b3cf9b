"""Moves WebSocket frames between one socket and a connection (thin I/O).

``Transport`` owns the socket after the HTTP upgrade: ``run(on_event)`` reads
and parses frames in the calling greenlet until the connection is over;
``write_message`` / ``close`` may be called from any greenlet. Writes never
block the caller: what the socket cannot take at once waits in a bounded
queue drained by a writer greenlet; a peer that lets the queue overflow is
disconnected (close code 1008, reason ``wse.send-queue-full``).
"""
from __future__ import annotations

import logging
import time
from collections import deque
from typing import Callable, Optional, Tuple

import gevent
from gevent import socket as gsocket

from .framing import (OP_BINARY, OP_PING, OP_PONG, OP_TEXT, FrameError, FrameReader,
                      build_close, build_frame)

__all__ = ["Transport", "SEND_QUEUE_FULL"]

log = logging.getLogger("wse_sync.transport")

SEND_QUEUE_FULL = "wse.send-queue-full"

_OPEN, _CLOSING, _CLOSED = 1, 2, 3


class Transport:
    """One server-side WebSocket connection over a gevent socket."""

    def __init__(self, sock, rfile, max_message_size: Optional[int],
                 max_send_queue: int = 4 * 1024 * 1024, close_timeout: float = 2.0,
                 mask: bool = False) -> None:
        # the gevent socket; its non-blocking raw socket for the fast path
        self.sock = sock
        # (a TLS socket's _sock is the TCP socket under it: never write there)
        self._raw = None if hasattr(sock, "getpeercert") else getattr(sock, "_sock", None)
        self.rfile = rfile
        self.reader = FrameReader(max_message_size, expect_mask=not mask)
        self.mask = mask
        self.max_send_queue = max_send_queue
        self.close_timeout = close_timeout
        self.state = _OPEN
        # (code, reason) of the close: the peer's when it closed first
        self.close_status: Optional[Tuple[int, str]] = None
        self.last_recv = time.monotonic()
        # frames waiting for the socket; created on first need (idle sockets are many)
        self._queue: Optional[deque] = None
        self._queued = 0
        self._writer: Optional[gevent.Greenlet] = None
        self._abort_timer = None
        self._discarding = False
        try:  # small frames must not wait for delayed ACKs (Nagle)
            sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass

    # -- writing -------------------------------------------------------
    @property
    def open(self) -> bool:
        return self.state == _OPEN

    def frame_for(self, data) -> bytes:
        """Wire bytes of one message: text frame for str, binary for bytes."""
        if isinstance(data, str):
            return build_frame(OP_TEXT, data.encode("utf-8"), self.mask)
        return build_frame(OP_BINARY, bytes(data), self.mask)

    def write_message(self, data) -> bool:
        """Queue one message (str or bytes); False when the connection is not open."""
        if self.state != _OPEN:
            return False
        return self.write_raw(self.frame_for(data))

    def write_raw(self, frame: bytes) -> bool:
        """Queue already-framed bytes (the same bytes may go to many sockets)."""
        if self.state == _CLOSED:
            return False
        if self._writer is not None or self._queue:
            if self._queued + len(frame) > self.max_send_queue:
                log.warning("send queue of a connection is full (%d bytes): dropping it",
                            self._queued)
                self.abort((1008, SEND_QUEUE_FULL))
                return False
            self._queue.append(frame)  # type: ignore[union-attr]
            self._queued += len(frame)
            return True
        sent = 0
        if self._raw is not None:
            try:
                sent = self._raw.send(frame)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.abort((1006, ""))
                return False
        if sent < len(frame):
            rest = frame[sent:] if sent else frame
            if self._queue is None:
                self._queue = deque()
            self._queue.append(rest)
            self._queued += len(rest)
            self._writer = gevent.spawn(self._drain)
        return True

    def _drain(self) -> None:
        try:
            while self._queue:
                chunk = self._queue.popleft()
                self._queued -= len(chunk)
                self.sock.sendall(chunk)
        except OSError:
            self.abort((1006, ""))
        finally:
            self._writer = None

    def ping(self, payload: bytes = b"") -> None:
        self.write_raw(build_frame(OP_PING, payload, self.mask))

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake; the socket is cut after ``close_timeout``."""
        if self.state != _OPEN:
            return
        self.state = _CLOSING
        self.close_status = (code, reason)
        self.write_raw(build_close(code, reason, self.mask))
        self._arm_abort(self.close_timeout)

    def abort(self, status: Tuple[int, str] = (1006, "")) -> None:
        """Cut the TCP connection now."""
        if self.state == _CLOSED:
            return
        if self.close_status is None:
            self.close_status = status
        self.state = _CLOSED
        if self._queue:
            self._queue.clear()
        self._queued = 0
        if self._abort_timer is not None:
            self._abort_timer.stop()
        try:
            self.sock.shutdown(gsocket.SHUT_RDWR)
        except OSError:
            pass

    def _arm_abort(self, seconds: float) -> None:
        if self._abort_timer is None:
            self._abort_timer = gevent.get_hub().loop.timer(seconds)
            self._abort_timer.start(self.abort)

    # -- reading -------------------------------------------------------
    def run(self, on_message: Callable[[object], None]) -> Tuple[int, str]:
        """Read until the connection ends; call ``on_message(data)`` per message.

        Returns the close (code, reason) to report.
        """
        # the first read empties what the HTTP parser buffered; then the socket
        read = self.rfile.read1
        reader = self.reader
        try:
            while self.state != _CLOSED:
                try:
                    data = read(65536)
                    read = self.sock.recv
                except (OSError, ValueError):
                    break
                if not data:
                    break
                self.last_recv = time.monotonic()
                if self._discarding:
                    continue
                try:
                    events = reader.feed(data)
                except FrameError as exc:
                    # what arrived before the violation is still delivered
                    self._dispatch(exc.events, on_message)
                    if self.state != _CLOSED:
                        self._protocol_failure(exc)
                    continue
                if self._dispatch(events, on_message):
                    break
        finally:
            self.abort(self.close_status or (1006, ""))
            self._drop_socket()
        return self.close_status or (1006, "")

    def _dispatch(self, events: list, on_message: Callable[[object], None]) -> bool:
        """Act on parsed events; True once the peer's close frame was handled."""
        for ev in events:
            kind = ev[0]
            if kind == "text" or kind == "binary":
                if self.state == _OPEN:
                    on_message(ev[1])
            elif kind == "ping":
                if self.state == _OPEN:
                    self.write_raw(build_frame(OP_PONG, ev[1], self.mask))
            elif kind == "close":
                self._peer_closed(ev[1], ev[2])
                return True
        return False

    def _peer_closed(self, code: int, reason: str) -> None:
        if self.state == _OPEN:
            # the peer closed first: echo its code and reason (RFC 6455 5.5.1;
            # the ws library does the same and the JS client reports what it gets)
            self.close_status = (code, reason)
            self.state = _CLOSING
            self.write_raw(build_close(code, reason, self.mask))
        self._finish_after_flush()

    def _finish_after_flush(self) -> None:
        writer = self._writer
        if writer is not None:
            writer.join(self.close_timeout)
        self.abort(self.close_status or (1006, ""))

    def _protocol_failure(self, exc: FrameError) -> None:
        # Fail the connection (RFC 6455 7.1.7): send the close frame, then end
        # our half of TCP, as the server closes TCP first. What the peer still
        # sends (its close reply among it) is read and discarded until its FIN
        # or close_timeout, so that it reads our close frame, not a TCP reset.
        self._discarding = True
        if self.state == _OPEN:
            self.close(exc.code, exc.reason if exc.code != 1009 else "message too big")
        self._arm_abort(self.close_timeout)
        if self._writer is None:
            self._end_writing()
        else:
            gevent.spawn(self._end_writing_after_flush)

    def _end_writing_after_flush(self) -> None:
        writer = self._writer
        if writer is not None:
            writer.join(self.close_timeout)
        self._end_writing()

    def _end_writing(self) -> None:
        if self.state == _CLOSED:
            return
        try:
            self.sock.shutdown(gsocket.SHUT_WR)
        except OSError:
            pass

    def _drop_socket(self) -> None:
        try:
            self.sock.close()
        except OSError:  # pragma: no cover - already closed
            pass

