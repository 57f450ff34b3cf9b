"""Moves WebSocket frames between one socket and a connection (thin I/O).

``Transport`` owns the socket after the HTTP upgrade. The server calls
``start(on_message, on_end)``: from then on the event loop's read watcher
calls it back with what arrived (one read per readiness, every frame in it),
so an idle connection costs no greenlet; ``on_message`` runs in the loop's
own greenlet and must not block. The Python ``WseClient`` calls ``run``
instead, which reads in the calling greenlet (``side=CLIENT``: its frames
are masked). ``write_message`` / ``close`` may be called from any greenlet
and never block: what the socket cannot take at once waits in a bounded
queue drained by a writer greenlet (one exists only while a send waits); a
peer that lets the queue overflow is disconnected (close code 1008, reason
``wse.send-queue-full``). The first frame of a loop turn goes to the socket
at once; later frames of the same turn wait for the turn's end and are
written together, in one send.

No watcher on a closed descriptor, ever: libev aborts the whole process on
one (gevent issue #2100). ``start`` takes the descriptor out of gevent's
socket (pywsgi then closes an empty object when its handler returns), and a
plain socket is used non-blocking with libev watchers of the transport's
own; the end stops the writer and closes those watchers before the socket.
"""
from __future__ import annotations

import _socket
import logging
import os
import time
from collections import Counter, deque
from typing import Any, Callable, NamedTuple, Optional, Tuple

import gevent
from gevent import socket as gsocket
from gevent.exceptions import ConcurrentObjectUseError

from . import runner
from ..core.config import Config
from ..core.limits import TokenBucket
from ..core.metrics import Tally
from ..core.refusals import Refusals
from ..core.websocket import SERVER, Close, Message, Ping, Pong, Protocol, State

_OPEN = State.OPEN  # (a plain name: the enum class attribute costs ~60 ns a lookup)

__all__ = ["Transport", "TransportLimits", "SEND_QUEUE_FULL", "RATE_LIMITED"]

log = logging.getLogger("wse_sync.transport")

SEND_QUEUE_FULL = "wse.send-queue-full"
RATE_LIMITED = "wse.rate-limit"

# A reader yields to the other greenlets after this many frames (or bytes) of
# one read, so a flooding peer cannot hold the loop.
YIELD_EVERY_FRAMES = 32
YIELD_EVERY_BYTES = 16384
# bytes asked of the socket per read
READ_SIZE = 65536
# bytes of one loop turn's frames held back to be sent together, at most
BATCH_BYTES = 65536
# seconds the reader waits, at the end, for the writer it stops
WRITER_STOP_TIMEOUT = 1.0

# where a Transport without its worker's reports its cuts
_LOCAL_REFUSALS = Refusals(Counter(), log)


# the option table's defaults (core/options.py)
_OPTIONS = Config()


class TransportLimits(NamedTuple):
    """What one socket may do (bytes, seconds, frames per second as (rate,
    burst)); sizes and times default to the options' defaults, the fragment
    count and the rates to no limit (``from_config`` takes all of them from a
    server's Config)."""

    max_message_size: Optional[int] = _OPTIONS.max_message_size
    max_send_queue: int = _OPTIONS.max_send_queue
    close_timeout: float = _OPTIONS.close_timeout
    max_fragments: Optional[int] = None
    rate: Optional[Tuple[float, float]] = None
    control_rate: Optional[Tuple[float, float]] = None

    @classmethod
    def from_config(cls, config: Config) -> "TransportLimits":
        return cls(config.max_message_size, config.max_send_queue, config.close_timeout,
                   config.max_fragments, config.rate, config.control_rate)


_DEFAULT_LIMITS = TransportLimits()


class Transport:
    """The I/O shell of one WebSocket connection over a gevent socket.

    Every rule of the connection lives in ``self.protocol`` (sans-I/O); this
    class moves its bytes and keeps the close deadline. ``rfile`` is the
    socket's buffered reader that read the HTTP head (what it holds beyond
    the head is read first); ``side`` is ``SERVER`` or ``CLIENT``
    (``core.websocket``: a client masks its frames and waits for the server
    to end TCP).
    """

    def __init__(self, sock: Any, rfile: Any, limits: Optional[TransportLimits] = None,
                 counters: Optional[Counter] = None,
                 refusals: Optional[Refusals] = None, side: str = SERVER,
                 tally: Optional[Tally] = None) -> None:
        max_message_size, max_send_queue, close_timeout, max_fragments, rate_limit, \
            control_rate_limit = limits if limits is not None else _DEFAULT_LIMITS
        self.sock = sock
        self.rfile = rfile
        # A plain socket: non-blocking (gevent's recv/send then never wait on
        # the socket's own watchers) and readiness from watchers of ours.
        # A TLS socket is used through gevent's blocking API (decrypted bytes
        # may wait in the SSL object while the descriptor is empty).
        self._plain = not hasattr(sock, "getpeercert")
        self._rwatch: Any = None
        self._wwatch: Any = None
        if self._plain:
            sock.settimeout(0.0)
            loop = gevent.get_hub().loop
            self._rwatch = loop.io(sock.fileno(), 1)
            self._wwatch = loop.io(sock.fileno(), 2)
        self.protocol = Protocol(side, max_message_size, max_fragments)
        self.max_send_queue = max_send_queue
        # the worker's counters (refusals), and its per-message ones
        self._counters: Counter = counters if counters is not None else Counter()
        self._tally = tally if tally is not None else Tally()
        # where the cut of a full send queue is counted and logged (the worker's)
        if refusals is None:
            refusals = _LOCAL_REFUSALS if counters is None else Refusals(self._counters, log)
        self._refusals = refusals
        self.close_timeout = close_timeout
        self._cut = False
        # the status of a cut before any close frame passed (ping timeout, full queue)
        self._cut_status: Optional[Tuple[int, str]] = None
        self.last_recv = time.monotonic()
        # frames waiting for the socket; created on first need (idle sockets are many)
        self._queue: Optional[deque] = None
        self._queued = 0
        self._writer: Optional[gevent.Greenlet] = None
        # the server's socket writes a turn's later frames together (a client's
        # goes out at once: its caller need not yield to the loop)
        self._loop = gevent.get_hub().loop if self._plain and side == SERVER else None
        # the loop turn of the last frame sent at once (-1: none); the queue is
        # "batched" while it waits for the end of that turn, not for a writer
        self._turn = -1
        self._batched = False
        # what a batch may hold before it is sent (never enough to reach max_send_queue:
        # only bytes the kernel would not take may count against that)
        self._batch_bytes = min(BATCH_BYTES, max_send_queue)
        self._abort_timer = None
        # start()'s callbacks, and whether reading is over (then, _end runs once)
        self._on_message: Optional[Callable[[object], None]] = None
        self._on_end: Optional[Callable[[int, str], None]] = None
        self._ending = False
        # frames per second the peer may send (None: no limit)
        self._bucket = (TokenBucket(rate_limit[0], rate_limit[1], time.monotonic())
                        if rate_limit else None)
        # pings and pongs per second (each ping costs a pong the peer may never read)
        self._control = (TokenBucket(control_rate_limit[0], control_rate_limit[1],
                                     time.monotonic()) if control_rate_limit else None)
        try:  # small frames must not wait for delayed ACKs (Nagle)
            sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass

    @property
    def open(self) -> bool:
        return self.protocol.state == _OPEN and not self._cut

    @property
    def queued(self) -> int:
        """Bytes waiting for the socket."""
        return self._queued

    @property
    def close_status(self) -> Optional[Tuple[int, str]]:
        """(code, reason) of the close: the peer's when it closed first."""
        return self._cut_status or self.protocol.close_status

    def has_unread(self) -> bool:
        """Bytes from the peer wait in the socket, not yet read (this side is
        the slow one). False when it cannot tell (TLS)."""
        if not self._plain or self._cut:
            return False
        try:
            return bool(self.sock.recv(1, gsocket.MSG_PEEK))
        except OSError:  # (BlockingIOError: nothing there)
            return False

    # -- writing -------------------------------------------------------
    def frame_for(self, data) -> bytes:
        """Wire bytes of one message: text frame for str, binary for bytes."""
        return self.protocol.frame(data)

    def write_message(self, data) -> bool:
        """Queue one message (str or bytes); False when the connection is not open."""
        if not self.open:
            return False
        return self.write_raw(self.protocol.frame(data))

    def write_raw(self, frame: bytes) -> bool:
        """Queue already-framed bytes (the same bytes may go to many sockets).

        False when the connection is not open, or when the frame alone is
        larger than ``max_send_queue`` (it could never be queued; the
        connection stays).
        """
        if len(frame) > self.max_send_queue:
            log.warning("a %d-byte message is larger than max_send_queue (%d): not sent",
                        len(frame), self.max_send_queue)
            return False
        protocol = self.protocol
        if self._cut or protocol.state != _OPEN:
            return False
        self._tally.messages_out += 1
        if not protocol.has_data_to_send():
            # nothing of the protocol's waits before it: straight to the socket
            # (what send_frame + _flush would do, without their list round trip)
            return self._write(frame)
        protocol.send_frame(frame)
        return self._flush()

    def _flush(self) -> bool:
        """Write what the protocol has to send; False when the socket is gone."""
        for chunk in self.protocol.data_to_send():
            if not chunk:
                self._after_queue(self._end_writing)
            elif not self._write(chunk):
                return False
        return True

    def _write(self, frame: bytes) -> bool:
        if self._batched and self._queued + len(frame) > self._batch_bytes:
            self._send_batch()  # (a turn that writes a lot is not held back)
        if self._writer is not None or self._queue:
            if self._queued + len(frame) > self.max_send_queue:
                self._refusals.refused("max_send_queue", self._queued, logging.WARNING,
                                       "cut a connection whose send queue was full (%d bytes):"
                                       " 1008 " + SEND_QUEUE_FULL + " (%s)")
                self.abort((1008, SEND_QUEUE_FULL))
                return False
            self._queue.append(frame)  # type: ignore[union-attr]
            self._queued += len(frame)
            return True
        loop = self._loop  # (a plain server socket's only)
        if loop is not None:
            turn = loop.iteration
            if turn == self._turn:  # a later frame of this turn: sent at its end
                self._queue = deque((frame,))
                self._queued = len(frame)
                self._batched = True
                loop.run_callback(self._send_batch)
                return True
            self._turn = turn
        return self._put(frame)  # (it fits: write_raw checked the size)

    def _put(self, data: bytes) -> bool:
        """Hand ``data`` to the socket; what it does not take waits for a
        writer greenlet. False when the socket is gone (the connection is cut)."""
        sent = 0
        if self._plain:
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.abort((1006, ""))
                return False
        if sent < len(data):
            self._wait_socket(data[sent:] if sent else data)
        return True

    def _wait_socket(self, rest: bytes) -> None:
        """Queue bytes the socket did not take, for a writer greenlet."""
        if self._queue is None:
            self._queue = deque()
        self._queue.append(rest)
        self._queued += len(rest)
        self._writer = gevent.spawn(self._drain)

    def _send_batch(self) -> None:
        """The end of a turn: the frames it queued after its first, in one send."""
        if not self._batched:  # (sent already: a close, or a wait for the queue)
            return
        self._batched = False
        queue = self._queue
        if self._cut or not queue:
            return
        data = b"".join(queue) if len(queue) > 1 else queue[0]
        self._queue = None  # (idle sockets are many: no empty deque kept)
        self._queued = 0
        self._put(data)

    def _drain(self) -> None:
        """The writer greenlet: what the socket could not take at once."""
        try:
            if not self._plain:
                while self._queue:
                    chunk = self._queue.popleft()
                    self._queued -= len(chunk)
                    self.sock.sendall(chunk)
                return
            hub = gevent.get_hub()
            sock, queue = self.sock, self._queue
            while queue and not self._cut:
                hub.wait(self._wwatch)
                while queue and not self._cut:
                    chunk = queue[0]
                    try:
                        sent = sock.send(chunk)
                    except BlockingIOError:
                        break
                    self._queued -= sent
                    if sent < len(chunk):
                        queue[0] = chunk[sent:]
                        break
                    queue.popleft()
        except OSError:
            self.abort((1006, ""))
        finally:
            self._writer = None

    def wait_sent(self, timeout: Optional[float] = None) -> bool:
        """Block this greenlet until what is queued has been written (or the
        connection is cut); True when nothing waits any more. For a sender
        that wants back-pressure (the client); not from the event loop."""
        self._send_batch()
        writer = self._writer
        if writer is not None and writer is not gevent.getcurrent():
            writer.join(timeout)
        return not self._queue

    def _after_queue(self, action: Callable[[], None]) -> None:
        """Run ``action`` once everything queued so far is written."""
        self._send_batch()
        if self._writer is None:
            action()
        else:
            gevent.spawn(self._run_after_writer, self._writer, action)

    def _run_after_writer(self, writer: gevent.Greenlet, action: Callable[[], None]) -> None:
        writer.join(self.close_timeout)
        action()

    def _end_writing(self) -> None:
        if self._cut:
            return
        try:
            self.sock.shutdown(gsocket.SHUT_WR)
        except OSError:
            pass

    def ping(self, payload: bytes = b"") -> None:
        if self.protocol.send_ping(payload):
            self._flush()

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake; the socket is cut after ``close_timeout``."""
        if self._cut or not self.protocol.send_close(code, reason):
            return
        self._flush()
        self._arm_abort(self.close_timeout)

    def fail(self, code: int, reason: str = "") -> None:
        """Fail the connection: close frame, end of our side of TCP, and what
        the peer sends next is discarded unread (cut after ``close_timeout``)."""
        if self._cut or not self.open:
            return
        self.protocol.fail(code, reason)
        self._flush()
        self._arm_abort(self.close_timeout)

    def abort(self, status: Tuple[int, str] = (1006, "")) -> None:
        """Cut the TCP connection now; ``status`` is reported unless a close
        handshake has already given one."""
        if self._cut:
            return
        if self.protocol.close_status is None:
            self._cut_status = status
        self._cut = True
        self.protocol.receive_eof()
        if self._queue:
            self._queue.clear()
        self._queued = 0
        if self._abort_timer is not None:
            self._abort_timer.stop()
        try:
            self.sock.shutdown(gsocket.SHUT_RDWR)
        except OSError:
            pass
        if self._on_end is not None:
            self._finish()

    def _arm_abort(self, seconds: float) -> None:
        if self._abort_timer is None:
            self._abort_timer = gevent.get_hub().loop.timer(seconds)
            self._abort_timer.start(self.abort)

    # -- reading -------------------------------------------------------
    def start(self, on_message: Callable[[object], None],
              on_end: Callable[[int, str], None]) -> None:
        """Serve the connection from the event loop's I/O callbacks and return
        at once: no greenlet waits for an idle peer (the caller's may end).

        ``on_message(data)`` runs in the loop's own greenlet, so it must not
        block (hand work to a greenlet); ``on_end(code, reason)`` runs once,
        in a greenlet of its own, after the socket is closed. The socket
        leaves gevent's object (pywsgi may close that one when its handler
        returns). A TLS socket is read the blocking way: there ``start``
        returns only at the end.
        """
        if not self._plain:
            status = (1006, "")
            try:
                status = self.run(on_message)
            finally:  # (this greenlet killed, or on_message raised: on_end still runs)
                on_end(*status)
            return
        try:
            data = self.rfile.read1(READ_SIZE)  # what the HTTP parser buffered
        except (OSError, ValueError):
            data = b""
        self._on_message, self._on_end = on_message, on_end
        try:
            self._own_descriptor()
        except (OSError, ValueError):  # the socket is gone already
            self.abort((1006, ""))
            return
        if data:
            self._handle(data)
        if self._cut:
            self._finish()
        elif not self._ending:
            self._rwatch.start(self._readable)

    def _own_descriptor(self) -> None:
        """Take the descriptor out of gevent's socket into a plain one."""
        sock = self.sock
        fd = sock.detach()  # (gevent drops its watchers on it; pywsgi's close is a no-op)
        try:
            plain = _socket.socket(fileno=fd)
        except (OSError, ValueError):
            if fd >= 0:  # (our watchers on it are not started)
                os.close(fd)
            raise
        plain.setblocking(False)
        self.sock = plain
        try:
            self.rfile.close()
        except (OSError, ValueError):  # pragma: no cover
            pass
        self.rfile = None

    def _readable(self) -> None:
        """The read watcher's callback (in the loop's greenlet): one read,
        every frame in it."""
        if self._cut:
            self._finish()
            return
        try:
            data = self.sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._finish()
        else:
            self._handle(data)

    def _handle(self, data: bytes) -> None:
        """Bytes read in start()'s mode; reading ends when they say so."""
        try:
            going = self._received(data, self._on_message) is not None
        except Exception:  # a bug of ours, not the peer's: this socket only
            log.exception("failed to handle a read: connection cut")
            going = False
        if not going or self._cut:
            self._finish()

    def _finish(self) -> None:
        """Reading is over: the rest (closing, ``on_end``) in a greenlet."""
        if self._ending:
            return
        self._ending = True
        if self._rwatch is not None:
            self._rwatch.stop()
        runner.spawn(self._end)

    def _end(self) -> None:
        self.abort((1006, ""))
        self._drop_socket()
        on_end = self._on_end
        self._on_end = self._on_message = None
        if on_end is not None:
            on_end(*(self.close_status or (1006, "")))

    def run(self, on_message: Callable[[object], None]) -> Tuple[int, str]:
        """Read in this greenlet until the connection ends; call
        ``on_message(data)`` per message (the client's way: it may block).

        Returns the close (code, reason) to report.
        """
        sock, plain = self.sock, self._plain
        hub, rwatch = gevent.get_hub(), self._rwatch
        # True after a read shorter than the buffer: the socket is most likely
        # empty, so wait for readiness before reading instead of a recv that
        # fails with EAGAIN (one syscall and one exception more per message in
        # a request/answer loop).
        drained = False
        try:
            # the first read empties what the HTTP parser buffered (non-blocking
            # on a plain socket: b"" there may only mean nothing is buffered,
            # and the socket says below whether it is the end)
            try:
                data = self.rfile.read1(READ_SIZE)
            except (OSError, ValueError):
                data = b""
            if plain and not data:
                data = None
            while not self._cut:
                if data is None:
                    try:
                        if not plain:
                            data = sock.recv(READ_SIZE)
                        else:
                            if drained:
                                hub.wait(rwatch)
                            try:
                                data = sock.recv(READ_SIZE)
                            except BlockingIOError:
                                drained = True
                                continue
                            drained = len(data) < READ_SIZE
                    except (OSError, ValueError, ConcurrentObjectUseError):
                        break
                if not data:
                    break
                handled = self._received(data, on_message)
                if handled is None:
                    break
                if handled >= YIELD_EVERY_FRAMES or len(data) >= YIELD_EVERY_BYTES:
                    gevent.sleep(0)  # the others get their turn
                data = None
        finally:
            self.abort((1006, ""))
            self._drop_socket()
        return self.close_status or (1006, "")

    def _received(self, data: bytes, on_message: Callable[[object], None]) -> Optional[int]:
        """Handle bytes from the peer: how many frames they held, or None
        when reading is over (both close frames passed)."""
        protocol = self.protocol
        self.last_recv = now = time.monotonic()
        protocol.receive_data(data)
        events = protocol.events_received()
        if events and (self._bucket is not None or self._control is not None):
            events = self._limit(events, now)
        for ev in events:
            if type(ev) is Message:  # (only those received while open)
                on_message(ev.data)
            elif type(ev) is Close:
                break
        protocol.settle()  # a violation behind those events fails the connection now
        if protocol.has_data_to_send():  # pongs, the close echo, a failure
            self._flush()
        if protocol.handshake_done():
            # both close frames passed: TCP ends once the echo is written
            self._after_queue(self.abort)
            if self._writer is None:
                return None
        if protocol.close_expected():
            self._arm_abort(self.close_timeout)
        return len(events)

    def _limit(self, events: list, now: float) -> list:
        """Apply the rate limits; over one, close 1008 and keep only a close frame."""
        over = None
        if self._bucket is not None and not self._bucket.take(len(events), now):
            over = "rate_limit"
        elif self._control is not None and not (len(events) == 1 and type(events[0]) is Message):
            # (one message read alone, the common case: no ping or pong to count)
            control = sum(1 for ev in events if type(ev) is Ping or type(ev) is Pong)
            if control and not self._control.take(control, now):
                over = "control_rate_limit"
        if over is None:
            return events
        if self.open:
            self._refusals.refused(over, RATE_LIMITED, logging.INFO,
                                   "cut a connection: 1008 %s (%s)")
            self.fail(1008, RATE_LIMITED)
        return [ev for ev in events if type(ev) is Close]

    def _drop_socket(self) -> None:
        """Stop everything that waits on the descriptor, then close it through
        gevent (the rfile too: while it is open, closing the socket leaves the
        descriptor open for pywsgi to close behind gevent's back)."""
        writer = self._writer
        if writer is not None and writer is not gevent.getcurrent():
            writer.kill(block=True, timeout=WRITER_STOP_TIMEOUT)
        for watcher in (self._rwatch, self._wwatch):
            if watcher is not None:
                watcher.close()
        self._rwatch = self._wwatch = None
        if self._abort_timer is not None:
            self._abort_timer.close()
        for closeable in (self.rfile, self.sock):
            if closeable is None:
                continue
            try:
                closeable.close()
            except (OSError, ValueError):  # pragma: no cover - already closed
                pass
