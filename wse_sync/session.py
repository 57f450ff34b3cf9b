"""One connection's life: handshake, authentication, message dispatch.

Everything that decides what a client message means lives in ``RULES``: a
table from (auth state, kind of message) to an action. ``Session`` carries
the actions out; handlers run in greenlets of their own so the reading
greenlet never blocks on application code.

States: ``AWAIT_HI`` -> (``~wse:hi``) -> ``DECIDING`` (challenge generator
or identify running) <-> ``CHALLENGED`` (quest sent, answer awaited) ->
``READY`` (welcome sent) -> ``CLOSED``.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING, Any, Optional

import gevent
from gevent.event import AsyncResult

from .connection import CLOSED, OPEN, WseConnection
from .errors import WSE_ERROR, WSE_REASON, WseError, rpc_error_payload
from .events import call_with_kwargs

if TYPE_CHECKING:  # pragma: no cover
    from .server import WseServer

__all__ = ["Session", "RULES"]

log = logging.getLogger("wse_sync.session")

AWAIT_HI, DECIDING, CHALLENGED, READY = "AWAIT_HI", "DECIDING", "CHALLENGED", "READY"

# Kinds of a well-formed message, as classify() names them.
HI, CHALLENGE, RESPONSE, CALL, CHANNEL = "hi", "challenge", "response", "call", "channel"

# (state, kind) -> action. Missing pairs are protocol errors.
RULES = {
    (AWAIT_HI, HI): "start_auth",
    **{(DECIDING, k): "ignore" for k in (HI, CHALLENGE, RESPONSE, CALL, CHANNEL)},
    # once challenged, anything but the answer is a protocol error (as in the reference)
    (CHALLENGED, CHALLENGE): "challenge_answer",
    (READY, RESPONSE): "resolve_call",
    (READY, CALL): "rpc",
    (READY, CHANNEL): "channel",
    # after the welcome, internal types without a stamp are plain messages
    (READY, HI): "channel",
    (READY, CHALLENGE): "channel",
}


class _Refused(Exception):
    pass


class Session:
    """Drives one WseConnection; created by the server for each accepted socket."""

    def __init__(self, server: "WseServer", conn: WseConnection) -> None:
        self.server = server
        self.conn = conn
        self.state = AWAIT_HI
        types = server.protocol.internal_types
        self._t_hi = types["hi"]
        self._t_challenge = types["challenge"]
        self._t_response = types["response"]
        self._t_response_err = types["response_error"]
        # a custom protocol may use non-string values for its internal types
        self._own_types = frozenset(v for v in types.values() if not isinstance(v, str))
        self._answer: Optional[AsyncResult] = None
        # channel messages waiting for their handler, in order (created on first use)
        self._channel_queue: Optional[deque] = None
        # a task is draining the channel queue (one at a time keeps the order)
        self._channel_busy = False
        self._auth: Optional[gevent.Greenlet] = None
        self._timer = None
        # True while accept() joins the cluster (the auth greenlet must not be killed)
        self.joining = False

    # -- the reading greenlet -----------------------------------------
    def run(self) -> None:
        """Serve the connection until it closes; fires the closing events."""
        self._set_deadline(self.server.handshake_timeout)
        code, reason = self.conn.transport.run(self.on_data)
        self._cancel_deadline()
        self.state = "CLOSED"
        if self._auth is not None:
            if self.joining:
                self._auth.join()  # bounded by the broker request timeout
            else:
                self._auth.kill()
        self.server._connection_closed(self.conn, code, reason)

    def on_data(self, data: Any) -> None:
        server = self.server
        try:
            type_, payload, stamp = server.protocol.unpack(data)
        except Exception as exc:
            server._emit_error(WseError(WSE_ERROR.MESSAGE_PROCESSING_ERROR,
                                        {"exception": exc, "message": str(exc)}), self.conn)
            self.conn.close(1000, WSE_REASON.PROTOCOL_ERR)
            return
        kind = self._classify(type_, stamp)
        if kind is None:
            return
        action = RULES.get((self.state, kind))
        if action is None:
            server._emit_error(WseError(WSE_ERROR.PROTOCOL_VIOLATION, {
                "reason": f"{type_!r} is not allowed in state {self.state}"}), self.conn)
            self.conn.close(1000, WSE_REASON.PROTOCOL_ERR)
            return
        if action != "ignore":
            getattr(self, "_" + action)(type_, payload, stamp)

    def _own_type(self, type_: Any) -> bool:
        try:
            return type_ in self._own_types
        except TypeError:  # unhashable
            return False

    def _classify(self, type_: Any, stamp: Any) -> Optional[str]:
        bad = None
        if stamp is not None and (not isinstance(stamp, str) or not stamp):
            bad = "the stamp must be null or a non-empty string"
        elif not isinstance(type_, str) and type_ is not None and not self._own_type(type_):
            bad = "the type must be a string"
        elif not type_:
            bad = "a message needs a type"
        if bad is not None:
            self.server._emit_error(WseError(WSE_ERROR.PROTOCOL_VIOLATION, {"reason": bad}),
                                    self.conn)
            self.conn.close(1000, WSE_REASON.PROTOCOL_ERR)
            return None
        if type_ == self._t_response or type_ == self._t_response_err:
            return RESPONSE if stamp is not None else CHANNEL
        if stamp is not None:
            return CALL
        if type_ == self._t_hi:
            return HI
        if type_ == self._t_challenge:
            return CHALLENGE
        return CHANNEL

    # -- actions -------------------------------------------------------
    def _start_auth(self, type_, payload, stamp) -> None:
        if not isinstance(payload, dict) or not isinstance(payload.get("meta", {}), (dict, type(None))):
            self.server._emit_error(WseError(WSE_ERROR.PROTOCOL_VIOLATION, {
                "reason": "~wse:hi payload must be {identity, meta}"}), self.conn)
            self.conn.close(1000, WSE_REASON.PROTOCOL_ERR)
            return
        self.conn.identity = payload.get("identity", "")
        meta = payload.get("meta")
        self.conn.meta = meta if meta is not None else {}
        self.state = DECIDING
        self._set_deadline(self.server.auth_timeout)
        self._auth = gevent.spawn(self._authenticate)

    def _challenge_answer(self, type_, payload, stamp) -> None:
        self.state = DECIDING
        if self._answer is not None:
            self._answer.set(payload)

    def _resolve_call(self, type_, payload, stamp) -> None:
        self.conn._resolve(stamp, type_ == self._t_response, payload)

    def _rpc(self, type_, payload, stamp) -> None:
        self.server._spawn(self._run_rpc, type_, payload, stamp)

    def _channel(self, type_, payload, stamp) -> None:
        if not self.server.channel.has(type_):
            self.server._emit("ignored", self.conn, type_, payload)
            return
        if self._channel_queue is None:
            self._channel_queue = deque()
        self._channel_queue.append((type_, payload))
        if not self._channel_busy:
            self._channel_busy = True
            self.server._spawn(self._drain_channel)

    # -- greenlets -----------------------------------------------------
    def _drain_channel(self) -> None:
        # one greenlet per connection at a time: messages are handled in order
        try:
            while self._channel_queue:
                type_, payload = self._channel_queue.popleft()
                for handler in self.server.channel.handlers(type_):
                    try:
                        handler(self.conn, payload)
                    except Exception as exc:
                        self.server._emit_error(WseError(WSE_ERROR.MESSAGE_PROCESSING_ERROR, {
                            "type": type_, "exception": exc, "message": str(exc)}), self.conn)
        finally:
            self._channel_busy = False

    def _run_rpc(self, rp: str, payload: Any, stamp: str) -> None:
        server, conn = self.server, self.conn
        handler = server._rpcs.get(rp)
        if handler is None:
            answer = (server.protocol.internal_types["response_error"],
                      {"code": WSE_ERROR.RP_NOT_REGISTERED})
        else:
            try:
                answer = (self._t_response, handler(conn, payload))
            except Exception as exc:
                error = rpc_error_payload(exc, rp, payload, server.options["rpc_tracebacks"])
                answer = (self._t_response_err, error)
                if not isinstance(exc, WseError):
                    server._emit_error(WseError(error["code"], error["details"]), conn)
        if conn.ready_state == OPEN:
            try:
                data = server.protocol.pack(answer[0], answer[1], stamp)
            except Exception as exc:  # a result the codec cannot pack
                server._emit_error(WseError(WSE_ERROR.RP_EXECUTION_FAILED, {
                    "rpc": rp, "message": f"result cannot be packed: {exc}"}), conn)
                data = server.protocol.pack(self._t_response_err, {
                    "code": WSE_ERROR.RP_EXECUTION_FAILED,
                    "message": "result cannot be packed", "details": {"rpc": rp}}, stamp)
            conn.transport.write_message(data)

    def _authenticate(self) -> None:
        server, conn = self.server, self.conn
        try:
            challenge = None
            if server._cra_generator is not None:
                challenge = self._run_challenge()
            decision = AsyncResult()

            def accept(cid: Any = None, welcome: Any = None) -> None:
                if decision.ready():
                    return
                if cid and (isinstance(cid, bool) or not isinstance(cid, (str, int))):
                    server._emit_error(WseError(WSE_ERROR.NOT_AUTHORIZED, {
                        "message": f"accept() needs a str or int user id, not {type(cid).__name__}"}),
                        conn)
                    cid = None
                decision.set((cid, welcome) if cid else None)

            def refuse() -> None:
                if not decision.ready():
                    decision.set(None)

            try:
                call_with_kwargs(server.identify, identity=conn.identity, meta=conn.meta,
                                 accept=accept, refuse=refuse, challenge=challenge,
                                 conn_id=conn.conn_id)
            except Exception as exc:
                server._emit_error(WseError(WSE_ERROR.NOT_AUTHORIZED, {
                    "message": f"identify raised {type(exc).__name__}: {exc}",
                    "exception": exc}), conn)
                raise _Refused() from None
            outcome = decision.get()  # the auth deadline bounds this wait
            if outcome is None:
                raise _Refused()
            cid, welcome = outcome
            if conn.transport.open:
                server._accept(self, cid, welcome)
        except _Refused:
            self._cancel_deadline()
            conn.close(1000, WSE_REASON.NOT_AUTHORIZED)
        finally:
            if not self.joining:
                self._auth = None  # a finished greenlet holds ~3 KB per connection

    def _run_challenge(self) -> dict:
        server, conn = self.server, self.conn
        quest_sent = AsyncResult()
        self._answer = AsyncResult()

        def quest(data: Any = None) -> None:
            if not quest_sent.ready() and conn.transport.open:
                quest_sent.set(("quest", data))
                self.state = CHALLENGED
                conn.transport.write_message(server.protocol.pack(self._t_challenge, data, None))

        def refuse() -> None:
            if not quest_sent.ready():
                quest_sent.set(("refuse", None))

        try:
            call_with_kwargs(server._cra_generator, identity=conn.identity, meta=conn.meta,
                             quest=quest, refuse=refuse)
        except Exception as exc:
            server._emit_error(WseError(WSE_ERROR.NOT_AUTHORIZED, {
                "message": f"challenge generator raised {type(exc).__name__}: {exc}",
                "exception": exc}), conn)
            raise _Refused() from None
        kind, data = quest_sent.get()
        if kind == "refuse":
            raise _Refused()
        response = self._answer.get()
        return {"quest": data, "response": response}

    # -- deadlines -----------------------------------------------------
    def ready(self) -> None:
        """Called by the server once the welcome is out."""
        self._cancel_deadline()
        self.state = READY

    def _set_deadline(self, seconds: Optional[float]) -> None:
        self._cancel_deadline()
        if seconds:
            self._timer = gevent.get_hub().loop.timer(seconds)
            self._timer.start(self._deadline_passed)

    def _cancel_deadline(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer.close()
            self._timer = None

    def _deadline_passed(self) -> None:
        self._timer = None
        if self.state in (AWAIT_HI, DECIDING, CHALLENGED) and self.conn.ready_state != CLOSED:
            log.info("connection %s did not authenticate in time", self.conn.conn_id)
            if self._auth is not None and not self.joining:
                self._auth.kill(block=False)
            self.conn.close(1000, WSE_REASON.NOT_AUTHORIZED)

