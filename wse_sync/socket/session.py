"""One connection's life at run time: authentication and dispatch in greenlets.

What a client message means, and in which state, is decided by the pure
``core.session.SessionCore`` (its ``TRANSITIONS`` table); ``Session`` carries
the decided actions out. Messages are read in the event loop's own greenlet
(``Transport.start``), which must never block: application code (identify,
RPC and channel handlers, events) runs in greenlets of its own, so an idle
connection has no greenlet at all.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Counter, Iterator, Optional, Protocol

import gevent
from gevent.event import AsyncResult

from .connection import CLOSED, OPEN, WseConnection
from ..core.config import Config
from ..core.session import ACCEPTED, QUEST, VIOLATION, SessionCore
from ..core.errors import WSE_ERROR, WSE_REASON, WseError, rpc_error_payload
from ..core.events import Emitter, call_with_kwargs
from ..core.metrics import Tally, WorkerMetrics
from ..core.refusals import CHANNEL_QUEUE_FULL, HANDSHAKE_TIMEOUT, SERVER_BUSY

__all__ = ["Session", "SessionApp", "SessionHost", "Slots"]
# a deadline timer running this late (s) shows an overloaded loop: the
# server, not the client, is the slow side
LOOP_LAG = 0.5

log = logging.getLogger("wse_sync.session")


class SessionApp(Protocol):
    """What a session reads of the application (the WseServer)."""

    @property
    def protocol(self) -> Any: ...  # the codec: pack, unpack, internal_types

    @property
    def config(self) -> Config: ...

    @property
    def identify(self) -> Callable: ...

    @property
    def challenge_generator(self) -> Optional[Callable]: ...

    @property
    def channel(self) -> Emitter: ...

    def rpc_handler(self, rp: str) -> Optional[Callable]: ...


class Slots(Protocol):
    """A FIFO of slots (max_identify)."""

    def try_acquire(self) -> bool: ...

    def acquire(self) -> None: ...

    def release(self) -> None: ...


class SessionHost(Protocol):
    """What a session asks of its worker."""

    @property
    def app(self) -> SessionApp: ...

    @property
    def counters(self) -> Counter[str]: ...

    @property
    def metrics(self) -> WorkerMetrics: ...

    @property
    def tally(self) -> Tally:
        """The counters bumped per message (``metrics.tally``)."""

    @property
    def identify_slots(self) -> Slots: ...

    def emit(self, name: str, *args: Any) -> None: ...

    def emit_error(self, error: WseError, conn: Optional[Any] = None,
                   exc: Optional[BaseException] = None) -> None: ...

    def spawn(self, fn: Callable, *args: Any) -> None: ...

    def rpc_slot(self) -> bool:
        """Take one of max_rpc_per_worker (False: none is free)."""

    def rpc_done(self) -> None: ...

    def refused(self, limit: str, remote: Optional[str], level: int = logging.WARNING,
                what: str = "refused a connection from %s: %s") -> None:
        """Count (``refused.<limit>``) and log (thinned) one refusal;
        ``what % (remote, limit)`` is the log line."""

    def accept(self, session: "Session", cid: Any, welcome: Any) -> None:
        """identify accepted ``cid``: join, welcome (then ``session.ready()``)."""

    def closed(self, session: "Session", code: int, reason: str) -> None:
        """The socket is gone (a session's last word)."""


class _Refused(Exception):
    pass


class Session:
    """Drives one WseConnection; created by the hub for each upgraded socket.

    It reads the app (identify, handlers, options) from ``host.app`` and
    reports to the host: ``accept`` when identify accepts, ``closed`` at the end.
    """

    def __init__(self, host: SessionHost, conn: WseConnection) -> None:
        self.host = host
        self.app = app = host.app
        self.conn = conn
        types = app.protocol.internal_types
        self.core = SessionCore(types)
        self._t_challenge = types["challenge"]
        self._t_response = types["response"]
        self._t_response_err = types["response_error"]
        self._answer: Optional[AsyncResult] = None
        # channel messages waiting for their handler, in order (created on first use)
        self._channel_queue: Optional[deque] = None
        # a task is draining the channel queue (one at a time keeps the order)
        self._channel_busy = False
        self._channel_bytes = 0
        # size of the message being dispatched (for the channel queue's bytes)
        self._size = 0
        # RPC handlers of this connection running now (max_rpc_per_conn)
        self._rpc_running = 0
        self._auth: Optional[gevent.Greenlet] = None
        self._timer = None
        # True while the hub joins the cluster (the auth greenlet must not be killed)
        self.joining = False
        self._deadline_at = 0.0
        self._said_hi = False
        # True while authentication waits on the server (an identify slot,
        # identify or the challenge generator running): a deadline passing
        # then is the server's doing (1013, retried), not the client's (1000)
        self._server_side = False

    # -- reading ------------------------------------------------------
    def start(self) -> None:
        """Serve the connection: returns at once (on TLS, at the end); reads
        run in the loop's callbacks, ``host.closed`` is called at the end."""
        self._set_deadline(self.app.config.handshake_timeout)
        self.conn.transport.start(self.on_data, self._ended)

    def _ended(self, code: int, reason: str) -> None:
        """The socket is closed (in a greenlet of its own): fire the closing events."""
        self._cancel_deadline()
        self.core.close()
        if self._channel_queue:  # nobody is there to see them handled
            self._channel_queue.clear()
            self._channel_bytes = 0
        if self._auth is not None:
            if self.joining:
                self._auth.join()  # bounded by the broker request timeout
            else:
                self._auth.kill()
        self.host.closed(self, code, reason)

    def on_data(self, data: Any) -> None:
        server = self.app
        self.host.tally.messages_in += 1
        self._size = len(data)
        try:
            type_, payload, stamp = server.protocol.unpack(data)
        except Exception as exc:
            self.host.emit_error(WseError(WSE_ERROR.MESSAGE_PROCESSING_ERROR,
                                        {"exception": exc, "message": str(exc)}), self.conn)
            self.conn.close(1000, WSE_REASON.PROTOCOL_ERR)
            return
        decision = self.core.message(type_, payload, stamp)
        action = decision.action
        if action == VIOLATION:
            self.host.emit_error(WseError(WSE_ERROR.PROTOCOL_VIOLATION,
                                        {"reason": decision.reason}), self.conn)
            self.conn.close(1000, WSE_REASON.PROTOCOL_ERR)
        elif action != "ignore":
            _ACTIONS[action](self, type_, payload, stamp)

    # -- actions -------------------------------------------------------
    def _start_auth(self, type_, payload, stamp) -> None:
        self._said_hi = True
        self.conn.identity = payload.get("identity", "")
        meta = payload.get("meta")
        self.conn.meta = meta if meta is not None else {}
        self._set_deadline(self.app.config.auth_timeout)
        self._server_side = True  # (from now on the server's turn, until a challenge is sent)
        self._auth = gevent.spawn(self._authenticate)

    def _challenge_answer(self, type_, payload, stamp) -> None:
        if self._answer is not None:
            self._answer.set(payload)

    def _resolve_call(self, type_, payload, stamp) -> None:
        self.conn.resolve(stamp, type_ == self._t_response, payload)

    def _rpc(self, type_, payload, stamp) -> None:
        host, most = self.host, self.app.config.max_rpc_per_conn
        if (most and self._rpc_running >= most) or not host.rpc_slot():
            host.refused("max_rpc", self.conn.remote_addr, logging.INFO,
                         "answered an RPC from %s with rp.too-many-calls (%s)")
            self.conn.transport.write_message(self.app.protocol.pack(self._t_response_err, {
                "code": WSE_ERROR.RP_TOO_MANY,
                "details": {"rpc": type_, "running": self._rpc_running}}, stamp))
            return
        self._rpc_running += 1
        host.spawn(self._run_rpc, type_, payload, stamp)

    def _channel(self, type_, payload, stamp) -> None:
        if not self.app.channel.has(type_):
            self.host.emit("ignored", self.conn, type_, payload)
            return
        if self._channel_queue is None:
            self._channel_queue = deque()
        config = self.app.config
        if ((config.max_channel_queue and len(self._channel_queue) >= config.max_channel_queue)
                or (config.max_channel_queue_bytes
                    and self._channel_bytes + self._size > config.max_channel_queue_bytes)):
            if self.conn.ready_state == OPEN:
                self.host.refused("max_channel_queue", self.conn.remote_addr, logging.INFO,
                                  "cut a connection from %s: its channel queue is full (%s)")
                self.host.emit_error(WseError(WSE_ERROR.MESSAGE_PROCESSING_ERROR, {
                    "type": type_, "reason": CHANNEL_QUEUE_FULL,
                    "waiting": len(self._channel_queue)}), self.conn)
                self.conn.close(1008, CHANNEL_QUEUE_FULL)
            self._channel_queue.clear()
            self._channel_bytes = 0
            return
        self._channel_bytes += self._size
        self._channel_queue.append((type_, payload, self._size))
        if not self._channel_busy:
            self._channel_busy = True
            self.host.spawn(self._drain_channel)

    # -- greenlets -----------------------------------------------------
    def _drain_channel(self) -> None:
        # one greenlet per connection at a time: messages are handled in order
        try:
            # a closing connection's messages are dropped: nobody waits for them
            while self._channel_queue and self.conn.ready_state == OPEN:
                type_, payload, size = self._channel_queue.popleft()
                self._channel_bytes -= size
                for handler in self.app.channel.handlers(type_):
                    try:
                        handler(self.conn, payload)
                    except Exception as exc:
                        self.host.emit_error(WseError(WSE_ERROR.MESSAGE_PROCESSING_ERROR, {
                            "type": type_, "exception": exc, "message": str(exc)}), self.conn,
                            exc)
        finally:
            self._channel_busy = False

    def _run_rpc(self, rp: str, payload: Any, stamp: str) -> None:
        try:
            self._answer_rpc(rp, payload, stamp)
        finally:
            self._rpc_running -= 1
            self.host.rpc_done()

    def _answer_rpc(self, rp: str, payload: Any, stamp: str) -> None:
        server, conn = self.app, self.conn
        handler = server.rpc_handler(rp)
        metrics = self.host.metrics
        tally = metrics.tally
        tally.rpc_calls += 1
        if handler is None:
            tally.rpc_errors += 1
            answer = (server.protocol.internal_types["response_error"],
                      {"code": WSE_ERROR.RP_NOT_REGISTERED})
        else:
            started = time.monotonic()
            try:
                answer = (self._t_response, handler(conn, payload))
            except Exception as exc:
                tally.rpc_errors += 1
                error = rpc_error_payload(exc, rp, payload, server.config.rpc_tracebacks)
                answer = (self._t_response_err, error)
                if not isinstance(exc, WseError):
                    self.host.emit_error(WseError(error["code"], error["details"]), conn, exc)
            metrics.rpc_seconds.observe(time.monotonic() - started)
        if conn.ready_state == OPEN:
            try:
                data = server.protocol.pack(answer[0], answer[1], stamp)
            except Exception as exc:  # a result the codec cannot pack
                self.host.emit_error(WseError(WSE_ERROR.RP_EXECUTION_FAILED, {
                    "rpc": rp, "message": f"result cannot be packed: {exc}"}), conn)
                data = server.protocol.pack(self._t_response_err, {
                    "code": WSE_ERROR.RP_EXECUTION_FAILED,
                    "message": "result cannot be packed", "details": {"rpc": rp}}, stamp)
            conn.transport.write_message(data)

    def _authenticate(self) -> None:
        server, conn = self.app, self.conn
        try:
            challenge = None
            if server.challenge_generator is not None:
                challenge = self._run_challenge()
            decision = AsyncResult()

            def accept(cid: Any = None, welcome: Any = None) -> None:
                if decision.ready():
                    return
                if cid and (isinstance(cid, bool) or not isinstance(cid, (str, int))):
                    self.host.emit_error(WseError(WSE_ERROR.NOT_AUTHORIZED, {
                        "message": f"accept() needs a str or int user id, not {type(cid).__name__}"}),
                        conn)
                    cid = None
                decision.set((cid, welcome) if cid else None)

            def refuse() -> None:
                if not decision.ready():
                    decision.set(None)

            try:
                with self._identify_slot():
                    call_with_kwargs(server.identify, identity=conn.identity, meta=conn.meta,
                                     accept=accept, refuse=refuse, challenge=challenge,
                                     conn_id=conn.conn_id)
            except Exception as exc:
                self.host.emit_error(WseError(WSE_ERROR.NOT_AUTHORIZED, {
                    "message": f"identify raised {type(exc).__name__}: {exc}",
                    "exception": exc}), conn, exc)
                raise _Refused() from None
            outcome = decision.get()  # the auth deadline bounds this wait
            self._server_side = False
            if outcome is None:
                raise _Refused()
            cid, welcome = outcome
            if conn.transport.open:
                self._cancel_deadline()
                self.joining = True
                try:
                    self.host.accept(self, cid, welcome)
                finally:
                    self.joining = False
        except _Refused:
            self._cancel_deadline()
            self.host.counters["auth_refused"] += 1
            log.info("refused a login from %s (connection %s)", conn.remote_addr, conn.conn_id)
            conn.close(1000, WSE_REASON.NOT_AUTHORIZED)
        finally:
            if not self.joining:
                self._auth = None  # a finished greenlet holds ~3 KB per connection

    def _run_challenge(self) -> dict:
        server, conn = self.app, self.conn
        quest_sent = AsyncResult()
        self._answer = AsyncResult()

        def quest(data: Any = None) -> None:
            if not quest_sent.ready() and conn.transport.open:
                quest_sent.set(("quest", data))
                self.core.fire(QUEST)
                conn.transport.write_message(server.protocol.pack(self._t_challenge, data, None))

        def refuse() -> None:
            if not quest_sent.ready():
                quest_sent.set(("refuse", None))

        try:
            with self._identify_slot():
                call_with_kwargs(server.challenge_generator, identity=conn.identity,
                                 meta=conn.meta, quest=quest, refuse=refuse)
        except Exception as exc:
            self.host.emit_error(WseError(WSE_ERROR.NOT_AUTHORIZED, {
                "message": f"challenge generator raised {type(exc).__name__}: {exc}",
                "exception": exc}), conn, exc)
            raise _Refused() from None
        kind, data = quest_sent.get()
        self._server_side = False  # (the client's turn: it has its auth deadline)
        if kind == "refuse":
            raise _Refused()
        response = self._answer.get()
        return {"quest": data, "response": response}

    @contextmanager
    def _identify_slot(self) -> Iterator[None]:
        """One of max_identify slots while application auth code runs. Time
        spent in the queue for it is the server's, bounded by
        identify_queue_timeout (then 1013); auth_timeout starts again once the
        slot is ours (a crowd queues instead of failing)."""
        slots = self.host.identify_slots
        self._server_side = True
        if not slots.try_acquire():
            self._set_deadline(self.app.config.identify_queue_timeout)
            slots.acquire()
            self._set_deadline(self.app.config.auth_timeout)
        try:
            yield
        finally:
            slots.release()

    # -- deadlines -----------------------------------------------------
    def ready(self) -> None:
        """Called by the hub once the welcome is out."""
        self._cancel_deadline()
        self.core.fire(ACCEPTED)

    def _set_deadline(self, seconds: Optional[float]) -> None:
        self._cancel_deadline()
        if seconds:
            self._deadline_at = time.monotonic() + seconds
            self._timer = gevent.get_hub().loop.timer(seconds)
            self._timer.start(self._deadline_passed)

    def _cancel_deadline(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer.close()
            self._timer = None

    def _deadline_passed(self) -> None:
        self._timer = None
        if self.core.authenticating and self.conn.ready_state != CLOSED:
            if self._auth is not None and not self.joining:
                self._auth.kill(block=False)
            remote = self.conn.remote_addr
            if not self._said_hi:
                # The wse client says hi as soon as the socket opens: without
                # it the path (or this loop) is congested, or the peer is no
                # wse client. Either way the socket goes, with a code a real
                # client retries; a client that never answers is not logged out.
                self.host.refused("handshake_timeout", remote, logging.INFO)
                self.conn.close(1013, HANDSHAKE_TIMEOUT)
                return
            late = time.monotonic() - self._deadline_at
            if (self._server_side or late > LOOP_LAG or self.conn.transport.has_unread()):
                # identify (or its queue) took too long, what the client sent
                # in time waits unread, or this loop is so busy that the timer
                # itself came late: the server is the slow side
                self.host.refused("identify_timeout", remote)
                self.conn.close(1013, SERVER_BUSY)
                return
            self.host.refused("auth_timeout", remote, logging.INFO,
                              "a connection from %s did not authenticate in time (%s)")
            self.conn.close(1000, WSE_REASON.NOT_AUTHORIZED)


# what SessionCore decides -> the Session method that carries it out
_ACTIONS = {
    "start_auth": Session._start_auth,
    "challenge_answer": Session._challenge_answer,
    "resolve_call": Session._resolve_call,
    "rpc": Session._rpc,
    "channel": Session._channel,
}
