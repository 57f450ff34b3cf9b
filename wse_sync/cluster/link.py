"""The zmq.green shell around LinkCore: a worker's DEALER socket to the broker.

One greenlet reads the socket, one beats the heart; sends use NOBLOCK from
any greenlet, so no greenlet ever waits on the socket for writing (zmq.green
allows a single waiter per direction). Requests that need an answer (join,
remote call, stats, lookup) wait in ``Answers`` (socket/answers.py), never on
the socket.
"""
from __future__ import annotations

import logging
import os
import time
from functools import partial
from collections import deque
from typing import (Any, Callable, Deque, Dict, Hashable, Iterable, List, Optional, Protocol,
                    Tuple)

import gevent
from gevent import get_hub
from gevent.event import Event

from ..core.errors import WSE_ERROR, WseError
from ..core.link import (Answer, Deliver, Drop, Forget, LinkCore, LocalEntry, MapReplica,
                         ServeCall, Step, UserJoined, UserLeft)
from ..core.refusals import ThinnedLog
from ..core.routes import link_identity
from ..core.messages import MAX_MSG_SIZE, Message, SchemaError, batch, decode, encode, split
from ..socket import runner
from ..socket.answers import Answers, answer_error
from .curve import ClientKeys, needs_curve

__all__ = ["BrokerLink", "MapReplica", "LocalPort"]

log = logging.getLogger("wse_sync.link")

# one ZeroMQ message to the broker carries at most this many messages or bytes
BATCH_MESSAGES = 1000
# messages kept for a broker that is behind (ZeroMQ's queue full), and the
# seconds between attempts to write them
HELD_MAX = 200000
HELD_RETRY = 0.01
# seconds a stopping link waits for them to go
STOP_FLUSH = 3.0
BATCH_BYTES = 1 << 20


class LocalPort(Protocol):
    """What the link needs from the worker runtime (its connection table and events)."""

    def entries(self) -> Iterable[LocalEntry]: ...

    def deliver(self, scope: str, key: Any, data: Any) -> None: ...

    def drop(self, conn_ids: List[str], cid: Optional[Hashable], has_cid: bool,
             reason: str) -> None: ...

    def user_left(self, cid: Hashable, code: int, reason: str, meta: Any,
                  started: Optional[Callable[[], None]] = None) -> None: ...

    def user_joined(self, cid: Hashable, meta: Any,
                    started: Optional[Callable[[], None]] = None) -> None: ...

    def forget(self, cid: Hashable) -> None: ...

    def call_local(self, conn_id: str, rp: str, payload: Any, timeout: Optional[float]) -> Any: ...

    def error(self, error: WseError) -> None: ...

    def metrics_report(self) -> Dict[str, Any]: ...


class BrokerLink:
    """Connects one worker runtime to the broker."""

    def __init__(self, port: LocalPort, worker_id: str, endpoint: str, ctx: Any,
                 limit: Optional[int] = 1, serves: bool = True, heartbeat: float = 1.0,
                 request_timeout: float = 5.0, broker_timeout: float = 3.0,
                 outage_buffer: int = 10000, outage_limit: float = 30.0,
                 curve: Optional[ClientKeys] = None, max_msg_size: int = MAX_MSG_SIZE,
                 report_interval: float = 5.0, replica: bool = False,
                 shard: Tuple[int, int] = (0, 1)) -> None:
        import zmq.green as zmq
        self.zmq = zmq
        self.port = port
        self.worker_id = worker_id
        self.endpoint = endpoint
        self.ctx = ctx
        self.heartbeat = heartbeat
        self.request_timeout = request_timeout
        self.outage_buffer = outage_buffer
        self.core = LinkCore(worker_id, port.entries, limit, pid=os.getpid(), serves=serves,
                             broker_timeout=broker_timeout, outage_buffer=outage_buffer,
                             outage_limit=outage_limit, now=time.monotonic(),
                             replica=replica, shard=shard)
        self.curve = curve
        self.max_msg_size = max_msg_size
        # why the broker refused the handshake (CURVE), until one succeeds
        self._handshake_refused: Optional[str] = None
        self.sock: Any = None
        self._monitor: Any = None
        # requests waiting for the broker's answer, by request number
        self._answers = Answers()
        self._greenlets: List[gevent.Greenlet] = []
        self._beater: Any = None
        # batches ZeroMQ would not take (its queue to the broker was full), in
        # order, and the timer that tries them again
        self._held: Deque[List[List[bytes]]] = deque()
        self._held_count = 0
        self._retry: Any = None
        # senders waiting for room in a full outbox (the broker is behind)
        self._room = Event()
        self._room_waiters = 0
        self._beats = 0
        self._stopped = False
        # encoded messages waiting for the end of this event-loop turn
        self._outgoing: List[List[bytes]] = []
        self._outgoing_bytes = 0
        # seconds of the last stats round trip; metrics reports every report_every beats
        self.rtt: Optional[float] = None
        self.report_every = max(1, round(report_interval / heartbeat)) if heartbeat else 5

    @property
    def view(self) -> MapReplica:
        return self.core.view

    # -- life ------------------------------------------------------------
    def start(self) -> None:
        zmq = self.zmq
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 1000)
        # (the broker routes to the identity, the nonce keeps others from taking it)
        self.sock.setsockopt(zmq.IDENTITY, link_identity(self.worker_id).encode("ascii"))
        self.sock.setsockopt(zmq.SNDHWM, self.outage_buffer)
        self.sock.setsockopt(zmq.RCVHWM, 100000)
        self.sock.setsockopt(zmq.MAXMSGSIZE, self.max_msg_size)
        self._greenlets = []
        if self.curve is not None:
            self.curve.apply(self.sock)
        if needs_curve(self.endpoint):
            # handshake failures are the only sign of a refused key: watch them
            self._monitor = self.sock.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
            self._greenlets.append(gevent.spawn(self._monitor_loop))
        self.sock.connect(self.endpoint)
        self._send(self.core.hello())
        self._greenlets.append(gevent.spawn(self._recv_loop))
        if self.heartbeat:
            self._beater = get_hub().loop.timer(self.heartbeat, self.heartbeat)
            self._beater.start(self._beat)
        log.info("worker %s (pid %d) joined broker %s%s", self.worker_id, os.getpid(),
                 self.endpoint, " with CURVE" if self.curve is not None else "")

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._room.set()
        self._send(self.core.bye())
        self._flush()
        # what a broker that is behind has not taken yet (the bye last)
        deadline = time.monotonic() + STOP_FLUSH
        while self._held and time.monotonic() < deadline and gevent.getcurrent() is not get_hub():
            gevent.sleep(HELD_RETRY)
            self._send_held()
        if self._held:
            _unsent.note("stop", "%d message(s) for the broker not sent at the stop",
                         self._held_count)
        for g in self._greenlets:
            g.kill(block=False)
        if self._beater is not None:
            self._beater.close()
            self._beater = None
        if self._retry is not None:
            self._retry.close()
            self._retry = None
        if self._monitor is not None:
            try:
                self.sock.disable_monitor()
            except self.zmq.ZMQError:
                pass
            self._monitor.close(0)
            self._monitor = None
        if self.sock is not None:
            self.sock.close(linger=500)

    # -- requests ------------------------------------------------------------
    def join(self, conn_id: str, cid: Hashable, meta: Any, at: float,
             local: List[Tuple[str, float]], limit: Optional[int]) -> Tuple[bool, List[str]]:
        """One broker round trip: (is the user new?, conn_ids to evict here).

        Without an answer in ``request_timeout`` the join is decided locally
        and is pending (see LinkCore.join).
        """
        step = self.core.join(conn_id, cid, meta, at, local, limit)
        if step.decided is not None or step.req is None:
            return step.decided or (False, [])
        # (an answer that came in the same turn of the loop as the timeout is
        # taken: a join decided here would wait for a verdict already spent)
        got = self._answers.get(step.req, partial(self._send, step.out), self.request_timeout)
        if got is None:
            _slow_joins.note("join", "the broker did not answer a join in %.1fs:"
                             " deciding locally", self.request_timeout)
            return self.core.join_timed_out(step.req, conn_id, cid, meta, local, limit)
        return self.core.join_answered(step.req, conn_id, cid, meta, got[1])

    def leave(self, conn_id: str, cid: Hashable, meta: Any, code: int, reason: str,
              quiet: bool = False) -> None:
        self._send(self.core.leave(conn_id, cid, meta, code, reason, quiet))

    def is_pending(self, conn_id: str) -> bool:
        return self.core.is_pending(conn_id)

    def send_cid(self, cid: Hashable, data: Any) -> None:
        self._command("send", {"cid": cid}, data)

    def broadcast(self, data: Any) -> None:
        self._command("bcast", {}, data)

    def drop_cid(self, cid: Hashable, reason: str) -> None:
        self._command("drop_cid", {"cid": cid, "reason": reason})

    # the connection's user (``cid``) picks the shard of a ShardedLink; unused here
    def conn_send(self, conn_id: str, cid: Hashable, data: Any) -> None:
        self._command("conn_send", {"conn_id": conn_id}, data)

    def conn_drop(self, conn_id: str, cid: Hashable, reason: str) -> None:
        self._command("conn_drop", {"conn_id": conn_id, "reason": reason})

    def call(self, conn_id: str, cid: Hashable, rp: str, payload: Any, timeout: float) -> Any:
        """Server -> client RPC on a connection held by another worker."""
        req, out = self.core.call(conn_id, rp, payload, timeout)
        try:
            # the holder enforces the timeout; allow it one broker hop more
            body = self._answers.wait(req, rp, partial(self._send, out), timeout,
                                      grace=self.request_timeout)
        finally:
            self.core.call_done(req)
        if body.get("ok"):
            return body.get("value")
        # (the holder's WseError as {"code", "details"}, or the broker's RP_DISCONNECT)
        raise answer_error(rp, body.get("value") or {})

    def stats(self, full: bool = True, timeout: Optional[float] = None) -> Optional[Dict[str, Any]]:
        """Send this worker's metrics report; the broker's answer: the cluster's
        stats (``full``) or ``{}``, None without an answer in ``timeout``
        (default ``request_timeout``) or at once while the broker is away.
        Measures ``rtt``."""
        if self._stopped or self.core.down_since is not None:
            return None
        req, out = self.core.stats(self.port.metrics_report(), full)
        started = time.monotonic()
        try:
            got = self._answers.get(req, partial(self._send, out),
                                    self.request_timeout if timeout is None else timeout)
        finally:
            self.core.call_done(req)
        if got is None:
            return None
        self.rtt = time.monotonic() - started
        body: Dict[str, Any] = got[1]
        return body

    def lookup(self, cids: Optional[List[Hashable]] = None, count: bool = False,
               timeout: Optional[float] = None) -> Optional[Dict[str, Any]]:
        """The broker's answer about ``cids``, the user ``count``, or every user
        (see LinkCore.lookup); None when the broker is away or silent for
        ``timeout`` (default ``request_timeout``)."""
        if self._stopped or self.core.down_since is not None:
            return None
        req, out = self.core.lookup(cids, count)
        try:
            got = self._answers.get(req, partial(self._send, out),
                                    self.request_timeout if timeout is None else timeout)
        finally:
            self.core.call_done(req)
        if got is None:
            return None
        body: Dict[str, Any] = got[1]
        return body

    @property
    def state(self) -> str:
        """"up" (in sync with the broker), "joining" (no snapshot yet), "away"
        (silent past broker_timeout) or "refused" (CURVE handshake refused, or
        the broker said ``refused``: another schema or shard)."""
        if self.refused is not None:
            return "refused"
        if self.core.down_since is not None:
            return "away"
        return "up" if self.core.synced else "joining"

    @property
    def shard_states(self) -> List[str]:
        """Each shard's ``state``: one broker is one shard."""
        return [self.state]

    @property
    def refused(self) -> Optional[str]:
        """Why the broker refused this worker (its key at the handshake, or its
        schema or shard list in an answer), until it lets it in; else None."""
        return self._handshake_refused or self.core.refused

    @property
    def resent(self) -> int:
        """Commands sent again to a broker that had lost them."""
        return self.core.resent

    @property
    def synced(self) -> bool:
        return self.core.synced

    @property
    def unconfirmed(self) -> int:
        return self.core.unconfirmed

    @property
    def unanswered_leaves(self) -> int:
        return 0 if self.core.down_since is not None else self.core.unanswered_leaves

    # -- socket --------------------------------------------------------------
    def _command(self, kind: str, body: dict, data: Any = None) -> None:
        if self._stopped:
            raise WseError(WSE_ERROR.BROKER_UNAVAILABLE, {"reason": "worker is stopping"})
        if self.core.outbox_full and self.core.down_since is None:
            self._wait_for_room()
        try:
            out = self.core.command(kind, body, data, time.monotonic())
        except WseError as error:
            self.port.error(error)
            raise
        self._send(out)

    def _wait_for_room(self) -> None:
        """Back-pressure: the broker answers but is behind, so the sender waits
        (at most request_timeout) for its acks to make room in the outbox.
        Never in the event loop itself (it cannot wait)."""
        if gevent.getcurrent() is get_hub():
            return
        deadline = time.monotonic() + self.request_timeout
        self._room_waiters += 1
        try:
            while (self.core.outbox_full and self.core.down_since is None
                   and not self._stopped):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._room.clear()
                self._room.wait(remaining)
        finally:
            self._room_waiters -= 1

    def _send(self, messages: List[Message]) -> None:
        """Queue messages; everything queued in one turn of the event loop goes
        out as one ZeroMQ message (each send wakes ZeroMQ's I/O thread, which
        costs far more than encoding), up to BATCH_MESSAGES or BATCH_BYTES (so
        a table in parts reaches the broker as many messages, read between
        other work)."""
        for m in messages:
            frames = encode(m.kind, m.body, m.data)
            if not self._outgoing:
                get_hub().loop.run_callback(self._flush)
            self._outgoing.append(frames)
            self._outgoing_bytes += sum(len(f) for f in frames)
            if len(self._outgoing) >= BATCH_MESSAGES or self._outgoing_bytes >= BATCH_BYTES:
                self._flush()

    def _flush(self) -> None:
        messages, self._outgoing, self._outgoing_bytes = self._outgoing, [], 0
        if messages:
            self._held.append(messages)
            self._held_count += len(messages)
        self._send_held()

    def _send_held(self) -> None:
        """Write the batches waiting, in order. When ZeroMQ's queue towards
        the broker is full (the broker is behind), they wait here and are
        tried again shortly: dropping them lost heartbeats (the broker then
        took the worker for dead), leaves and confirmations."""
        zmq, sock, held = self.zmq, self.sock, self._held
        if sock is None or sock.closed:
            held.clear()
            self._held_count = 0
            return
        while held:
            try:
                sock.send_multipart(batch(held[0]), zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EAGAIN:
                    self._hold_back()
                    return
                # commands stay in the outbox (resent with the next hello); a join
                # waits for its answer and decides locally after request_timeout
                _unsent.note("unsent", "cannot reach the broker (%s): %d message(s) not sent",
                             exc, len(held[0]))
            self._held_count -= len(held.popleft())

    def _hold_back(self) -> None:
        """The broker is behind: retry soon; beyond HELD_MAX messages the
        oldest batch goes (counted, logged)."""
        while self._held_count > HELD_MAX and len(self._held) > 1:
            dropped = self._held.popleft()
            self._held_count -= len(dropped)
            _unsent.note("held-max", "%d message(s) for the broker dropped: more than %d wait"
                         " for it", len(dropped), HELD_MAX)
        if self._retry is None:
            self._retry = get_hub().loop.timer(HELD_RETRY)
        if not self._retry.active:
            self._retry.start(self._send_held)

    def _monitor_loop(self) -> None:
        from zmq.utils.monitor import parse_monitor_message
        zmq = self.zmq
        while True:
            try:
                event = parse_monitor_message(self._monitor.recv_multipart())
            except zmq.ZMQError:
                return
            kind, value = event["event"], event["value"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                if self._handshake_refused is not None:
                    log.info("CURVE handshake with the broker %s succeeded", self.endpoint)
                self._handshake_refused = None
                continue
            if kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                # also a broker that went away mid-handshake: not a verdict
                log.debug("%s: a handshake with the broker failed", self.endpoint)
                continue
            if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                why = (f"the broker refused this key (ZAP status {value}): is this worker's"
                       " public key in the broker's --allow-workers (or --allow-clients)"
                       " directory?")
            elif self.curve is None:
                why = ("the handshake with the broker failed: a CURVE broker needs this side's"
                       " keys (--broker-key and --curve-secret)")
            else:
                why = ("the CURVE handshake with the broker failed (is it a CURVE broker, and"
                       " is --broker-key its public key?)")
            if self._handshake_refused != why:
                log.error("%s: %s", self.endpoint, why)
            self._handshake_refused = why

    def _beat(self) -> None:
        """The heartbeat, run by a libev timer in the event loop itself, and
        written at once: a message queued for the end of the loop turn (as
        other messages are, to batch them) waits behind every greenlet ready
        to run, a reconnect storm makes thousands, and the broker took the
        busy worker for a dead one. Messages waiting unread in the socket tell
        that the broker is alive (this side is the slow one). Only a loop held
        by one greenlet that never yields stops it."""
        try:
            incoming = bool(self.sock.getsockopt(self.zmq.EVENTS) & self.zmq.POLLIN)
            self._carry_out(self.core.tick(time.monotonic(), incoming))
            self._flush()
            self._beats += 1
            if self._beats % self.report_every == 0 and self.core.down_since is None:
                gevent.spawn(self.stats, False)
        except Exception:  # (the loop would print it and go on: say it once here)
            if not self._stopped:
                log.exception("the broker link's heartbeat failed")

    def _recv_loop(self) -> None:
        zmq = self.zmq
        while True:
            try:
                frames = self.sock.recv_multipart()
            except zmq.ZMQError:
                if self._stopped:
                    return
                raise
            now = time.monotonic()
            self._send(self.core.received(now))
            try:
                messages = [decode(part) for part in split(frames)]
            except SchemaError as exc:
                log.warning("dropped a malformed message from the broker: %s", exc)
                continue
            for msg in messages:
                try:
                    self._carry_out(self.core.handle(msg, now))
                except Exception:
                    log.exception("failed to handle a %r message from the broker", msg.kind)
            if self._room_waiters and not self.core.outbox_full:
                self._room.set()
            if any(m.kind == "snapshot" for m in messages):
                gevent.sleep(0)  # a streamed map: let the heartbeat and the others run

    def _carry_out(self, step: Step) -> None:
        self._send(step.out)
        port = self.port
        for effect in step.effects:
            if isinstance(effect, Deliver):
                port.deliver(effect.scope, effect.key, effect.data)
            elif isinstance(effect, Answer):
                self._answers.resolve(effect.req, True, effect.body)
            elif isinstance(effect, UserLeft):
                started = None if effect.fire is None else partial(self._fired, effect.fire)
                port.user_left(effect.cid, effect.code, effect.reason, effect.meta, started)
            elif isinstance(effect, UserJoined):
                # (confirmed like any 'joined': the broker may track it)
                port.user_joined(effect.cid, effect.meta,
                                 partial(self.joined_started, effect.conn_id, effect.cid))
            elif isinstance(effect, Forget):
                port.forget(effect.cid)
            elif isinstance(effect, Drop):
                port.drop(effect.conn_ids, effect.cid, effect.has_cid, effect.reason)
            elif isinstance(effect, ServeCall):
                runner.spawn(self._serve_call, effect.body)

    def _fired(self, fire_id: str) -> None:
        """A 'left' has started here: the broker need not fire it elsewhere.
        (Queued with this turn's batch; the hub yields once before the
        handler runs, so it is written before the handler acts.)"""
        if not self._stopped:
            self._send([Message("fired", {"ids": [fire_id]})])

    @property
    def others_fire(self) -> bool:
        """The broker said other workers fire this stopping worker's 'left'."""
        return self.core.others_fire

    def stopping(self) -> None:
        """This worker closes its connections next: tell the broker."""
        if not self._stopped:
            self._send(self.core.stopping())
            self._flush()

    def joined_started(self, conn_id: str, cid: Hashable) -> None:
        """The 'joined' of ``conn_id``'s user has started here: if this worker
        dies now, the user's 'left' is due (not before: no 'left' without a
        'joined')."""
        if not self._stopped:
            self._send([Message("fired", {"ids": [], "joined": [conn_id]})])

    def _serve_call(self, body: dict) -> None:
        try:
            value = self.port.call_local(body["conn_id"], body["rp"], body.get("payload"),
                                         body.get("timeout"))
            out = LinkCore.call_result(body, True, value)
        except WseError as exc:
            out = LinkCore.call_result(body, False,
                                       {"code": exc.code, "details": _jsonable(exc.details)})
        self._send(out)


# joins decided locally for want of an answer: one line per interval, with counts
_slow_joins = ThinnedLog(log, logging.ERROR)
# messages for the broker that could not be sent
_unsent = ThinnedLog(log, logging.ERROR)


def _jsonable(value: Any) -> Any:
    try:
        encode("result", {"v": value})
        return value
    except (TypeError, OverflowError, ValueError):
        return {"message": str(value)}
