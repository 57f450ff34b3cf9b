"""The worker's side of the broker: a DEALER socket and a replica of the map.

One greenlet reads the socket; sends use NOBLOCK from any greenlet, so no
greenlet ever waits on the socket for writing (zmq.green allows a single
waiter per direction). Requests that need an answer (join, remote call) wait
on an AsyncResult, never on the socket.
"""
from __future__ import annotations

import itertools
from collections import deque
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Deque, Dict, Hashable, List, Optional, Tuple

import gevent
from gevent import get_hub
from gevent.event import AsyncResult

from . import runner
from .errors import WSE_ERROR, WseError
from .messages import Message, SchemaError, batch, decode, encode, split

if TYPE_CHECKING:  # pragma: no cover
    from .connection import WseConnection
    from .server import WseServer

__all__ = ["BrokerLink", "ClusterView"]

log = logging.getLogger("wse_sync.link")


class ClusterView:
    """A worker's read replica of the broker's map: cid -> {conn_id: (worker, meta)}."""

    def __init__(self) -> None:
        self.users: Dict[Hashable, Dict[str, Tuple[str, Any]]] = {}
        self._cid_of: Dict[str, Hashable] = {}

    def load(self, entries: List[list]) -> None:
        self.users.clear()
        self._cid_of.clear()
        self.apply(entries, [])

    def apply(self, add: List[list], remove: List[str]) -> List[Hashable]:
        """Apply a delta; returns the cids that have no connection left."""
        gone = []
        for conn_id in remove:
            cid = self._cid_of.pop(conn_id, None)
            user = self.users.get(cid)
            if user is not None:
                user.pop(conn_id, None)
                if not user:
                    del self.users[cid]
                    gone.append(cid)
        for conn_id, cid, worker, meta, *_ in add:
            self.users.setdefault(cid, {})[conn_id] = (worker, meta)
            self._cid_of[conn_id] = cid
        return [cid for cid in gone if cid not in self.users]

    def meta_of(self, cid: Hashable) -> Any:
        user = self.users.get(cid)
        if not user:
            return None
        return next(iter(user.values()))[1]


class BrokerLink:
    """Connects one worker (a WseServer runtime) to the broker."""

    def __init__(self, server: "WseServer", endpoint: str, ctx, heartbeat: float = 1.0,
                 request_timeout: float = 5.0, broker_timeout: float = 3.0,
                 outage_buffer: int = 10000, outage_limit: float = 30.0) -> None:
        import zmq.green as zmq
        self.zmq = zmq
        self.server = server
        self.endpoint = endpoint
        self.ctx = ctx
        self.heartbeat = heartbeat
        self.request_timeout = request_timeout
        self.broker_timeout = broker_timeout
        self.view = ClusterView()
        self.sock = None
        self._ids = itertools.count(1)
        self._pending: Dict[int, AsyncResult] = {}
        self._greenlets: List[gevent.Greenlet] = []
        self._last_broker = time.monotonic()
        self._stopped = False
        # messages the socket may hold while the broker is away, and for how long
        self.outage_buffer = outage_buffer
        self.outage_limit = outage_limit
        # the broker incarnation our map comes from (from its snapshot)
        self.epoch: Optional[str] = None
        # leaves the broker has not answered yet: resent after a broker restart
        self._unacked: Dict[str, dict] = {}
        self.down_since: Optional[float] = None
        # cross-worker commands not yet acked by the broker: (seq, kind, body, data)
        self._outbox: Deque[tuple] = deque()
        # joins we stopped waiting for: req -> conn_id (their answer may still come)
        self._late_joins: Dict[int, str] = {}
        # pending connections that closed before the broker decided them
        self._closed_pending: Dict[str, "WseConnection"] = {}
        # encoded messages waiting for the end of this event-loop turn
        self._outgoing: List[List[bytes]] = []
        self._seq = 0

    # -- life ------------------------------------------------------------
    def start(self) -> None:
        zmq = self.zmq
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.setsockopt(zmq.IDENTITY, self.server.worker_id.encode("ascii"))
        self.sock.setsockopt(zmq.SNDHWM, self.outage_buffer)
        self.sock.setsockopt(zmq.RCVHWM, 100000)
        self.sock.connect(self.endpoint)
        self._hello()
        self._greenlets = [gevent.spawn(self._recv_loop), gevent.spawn(self._hb_loop)]
        log.info("worker %s (pid %d) joined broker %s",
                 self.server.worker_id, os.getpid(), self.endpoint)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._send("bye")
        self._flush()
        for g in self._greenlets:
            g.kill(block=False)
        if self.sock is not None:
            self.sock.close(linger=500)

    def _hello(self) -> None:
        """Send this worker's table, then every command the broker has not acked."""
        table = [[c.conn_id, c.cid, c.meta, c.joined_at, c._pending_join]
                 for c in self.server._conns.values()]
        base = self._outbox[0][0] - 1 if self._outbox else self._seq
        self._send("hello", {"pid": os.getpid(), "limit": self.server.conn_per_user,
                             "table": table, "base": base, "serves": self.server.serves})
        for _seq, kind, body, data in list(self._outbox):
            self._send(kind, body, data)

    # -- requests ------------------------------------------------------------
    def join(self, conn: "WseConnection", limit: Optional[int]) -> Tuple[bool, List[str]]:
        """One broker round trip: (is the user new?, conn_ids evicted here).

        When the broker does not answer, the join is decided locally and the
        connection is *pending*: first is False, and the broker fires the
        user's 'joined' later (a ``joined`` answer or ``resolved``) once it knows.
        """
        if self.down_since is not None:
            # the broker is away: decide with what this worker knows; the
            # table sent on resync reconciles (conn_per_user included)
            return self._join_locally(conn, limit)
        req = next(self._ids)
        result = self._pending[req] = AsyncResult()
        try:
            self._send("join", {"req": req, "conn_id": conn.conn_id, "cid": conn.cid,
                                "meta": conn.meta, "limit": limit, "at": conn.joined_at})
            body = result.get(timeout=self.request_timeout)
        except (gevent.Timeout, WseError):
            log.error("broker did not answer a join in %.1fs: deciding locally",
                      self.request_timeout)
            self._late_joins[req] = conn.conn_id
            return self._join_locally(conn, limit)
        finally:
            self._pending.pop(req, None)
        self.view.apply([[conn.conn_id, conn.cid, self.server.worker_id, conn.meta]], body["evicted"])
        return bool(body["first"]), list(body["evicted"])

    def _join_locally(self, conn: "WseConnection", limit: Optional[int]) -> Tuple[bool, List[str]]:
        local = sorted(self.server._by_cid.get(conn.cid, {}).values(), key=lambda c: c.joined_at)
        conn._pending_join = True
        evicted: List[str] = []
        if limit and len(local) + 1 > limit:
            evicted = [c.conn_id for c in local[: len(local) + 1 - limit]]
        return False, evicted

    def leave(self, conn: "WseConnection", code: int, reason: str, quiet: bool = False) -> None:
        # (the identity object is kept for the 'left' event that may follow)
        self.view.apply([], [conn.conn_id])
        body = {"conn_id": conn.conn_id, "cid": conn.cid, "meta": conn.meta, "code": code,
                "reason": reason, "quiet": quiet, "epoch": self.epoch,
                "pending": conn._pending_join}
        self._unacked[conn.conn_id] = body
        if conn._pending_join and len(self._closed_pending) < 10000:
            # the broker may still say this user's 'joined' is ours to fire
            self._closed_pending[conn.conn_id] = conn
        self._send_quietly("leave", body)

    def send_cid(self, cid: Hashable, data: Any) -> None:
        self._command("send", {"cid": cid}, data)

    def broadcast(self, data: Any) -> None:
        self._command("bcast", {}, data)

    def drop_cid(self, cid: Hashable, reason: str) -> None:
        self._command("drop_cid", {"cid": cid, "reason": reason})

    def conn_send(self, conn_id: str, data: Any) -> None:
        self._command("conn_send", {"conn_id": conn_id}, data)

    def conn_drop(self, conn_id: str, reason: str) -> None:
        self._command("conn_drop", {"conn_id": conn_id, "reason": reason})

    def call(self, conn_id: str, rp: str, payload: Any, timeout: float) -> Any:
        """Server -> client RPC on a connection held by another worker."""
        req = next(self._ids)
        result = self._pending[req] = AsyncResult()
        try:
            self._send("call", {"call": req, "conn_id": conn_id, "rp": rp, "payload": payload,
                                "timeout": timeout})
            try:
                # the holder enforces the timeout; allow it one broker hop more
                body = result.get(timeout=timeout + self.request_timeout)
            except gevent.Timeout:
                raise WseError(WSE_ERROR.RP_TIMEOUT, {"rpc": rp, "timeout": timeout}) from None
        finally:
            self._pending.pop(req, None)
        if body.get("ok"):
            return body.get("value")
        err = body.get("value") or {}
        raise WseError(err.get("code", WSE_ERROR.RP_EXECUTION_FAILED), err.get("details"))

    # -- socket --------------------------------------------------------------
    def _command(self, kind: str, body: dict, data: Any = None) -> None:
        """A cross-worker command: kept until the broker acks it, resent to a
        restarted broker, and refused with BROKER_UNAVAILABLE (plus an
        ``error`` event) when ``outage_buffer`` commands wait or the broker has
        been away for more than ``outage_limit`` seconds."""
        if self._stopped:
            raise WseError(WSE_ERROR.BROKER_UNAVAILABLE, {"reason": "worker is stopping"})
        down = self.down_since
        if down is not None and time.monotonic() - down > self.outage_limit:
            self._unavailable(kind, f"broker away for more than {self.outage_limit:.0f}s")
        if len(self._outbox) >= self.outage_buffer:
            self._unavailable(kind, f"{len(self._outbox)} commands wait for the broker")
        self._seq += 1
        body["seq"] = self._seq
        self._outbox.append((self._seq, kind, body, data))
        if down is None:
            try:
                self._send(kind, body, data)
            except WseError:
                pass  # kept in the outbox: resent with the next hello

    def _acked(self, seq: int) -> None:
        outbox = self._outbox
        while outbox and outbox[0][0] <= seq:
            outbox.popleft()

    def _send(self, kind: str, body: Optional[dict] = None, data: Any = None) -> None:
        """Queue a message; everything queued in one turn of the event loop goes
        out as one ZeroMQ message (each send wakes ZeroMQ's I/O thread, which
        costs far more than encoding)."""
        self._outgoing.append(encode(kind, body, data))
        if len(self._outgoing) == 1:
            get_hub().loop.run_callback(self._flush)
        elif len(self._outgoing) >= 1000:
            self._flush()

    def _flush(self) -> None:
        messages, self._outgoing = self._outgoing, []
        if not messages or self.sock is None or self.sock.closed:
            return
        try:
            self.sock.send_multipart(batch(messages), self.zmq.NOBLOCK)
        except self.zmq.ZMQError as exc:
            # commands stay in the outbox (resent with the next hello); a join
            # waits for its answer and decides locally after broker_timeout
            log.error("cannot reach the broker (%s): %d message(s) not sent", exc, len(messages))

    def _unavailable(self, kind: str, why: str) -> None:
        error = WseError(WSE_ERROR.BROKER_UNAVAILABLE, {"kind": kind, "reason": why})
        log.error("%r refused: %s", kind, why)
        self.server._emit_error(error, None)
        raise error

    def _send_quietly(self, kind: str, body: dict) -> None:
        try:
            self._send(kind, body)
        except WseError:
            pass

    def _hb_loop(self) -> None:
        while True:
            gevent.sleep(self.heartbeat)
            if self.down_since is None:
                self._send_quietly("hb", {})
            silent = time.monotonic() - self._last_broker
            if silent > self.broker_timeout and self.down_since is None:
                self.down_since = self._last_broker
                log.error("no word from the broker for %.1fs: it is away; local traffic goes on,"
                          " cross-worker commands wait (at most %d, %.0fs)",
                          silent, self.outage_buffer, self.outage_limit)

    def _recv_loop(self) -> None:
        zmq = self.zmq
        while True:
            try:
                frames = self.sock.recv_multipart()
            except zmq.ZMQError:
                if self._stopped:
                    return
                raise
            self._last_broker = time.monotonic()
            if self.down_since is not None:
                log.info("the broker answers again after %.1fs",
                         self._last_broker - self.down_since)
                self.down_since = None
                self._hello()
            try:
                messages = [decode(part) for part in split(frames)]
            except SchemaError as exc:
                log.warning("dropped a malformed message from the broker: %s", exc)
                continue
            for msg in messages:
                try:
                    self._handle(msg)
                except Exception:
                    log.exception("failed to handle a %r message from the broker", msg.kind)

    def _handle(self, msg: Message) -> None:
        server, body = self.server, msg.body
        kind = msg.kind
        if kind == "deliver":
            if body.get("all"):
                server._deliver_local(list(server._conns.values()), msg.data)
            elif "cid" in body:
                server._deliver_local(list(server._local_by_cid(body["cid"])), msg.data)
            else:
                conn = server._conns.get(body.get("conn_id"))
                if conn is not None:
                    server._deliver_local([conn], msg.data)
        elif kind == "left":
            if "conn_id" in body and self._unacked.pop(body["conn_id"], None) is None:
                return  # an answer to a leave we already had answered (resent)
            if body.get("last"):
                server._remote_left(body["cid"], body.get("code", 1005), body.get("reason", ""),
                                    body.get("meta"))
        elif kind in ("joined", "result"):
            pending = self._pending.get(body.get("req", body.get("call")))
            if pending is not None:
                pending.set(body)
            elif kind == "joined" and body.get("req") in self._late_joins:
                # the answer to a join we stopped waiting for
                conn_id = self._late_joins.pop(body["req"])
                self._resolved([conn_id], [conn_id] if body.get("first") else [])
        elif kind == "resolved":
            self._resolved(body.get("conns", []), body.get("first", []))
        elif kind == "delta":
            for cid in self.view.apply(body.get("add", []), body.get("remove", [])):
                server._forget_identity(cid)
        elif kind == "snapshot":
            self.view.load(body.get("entries", []))
            previous, self.epoch = self.epoch, body.get("epoch")
            if previous is not None and previous != self.epoch and self._unacked:
                log.info("new broker: resending %d unanswered leave(s)", len(self._unacked))
                for leave in list(self._unacked.values()):
                    self._send_quietly("leave", leave)
        elif kind == "drop":
            targets = [server._conns.get(i) for i in body.get("conns", [])]
            if "cid" in body:
                targets += list(server._local_by_cid(body["cid"]))
            for conn in targets:
                if conn is not None:
                    conn.close(1000, body.get("reason", ""))
        elif kind == "call":
            runner.spawn(self._serve_call, body)
        elif kind == "reset":
            log.info("broker asked for this worker's table: resending %d connections",
                     len(server._conns))
            self._hello()
        elif kind == "refused":
            log.error("the broker refused this worker: it speaks schema %s", body.get("version"))
        elif kind in ("hb", "ack"):
            self._acked(int(body.get("ack", body.get("seq", 0))))

    def _resolved(self, conn_ids: List[str], first: List[str]) -> None:
        """Pending joins decided by the broker: fire 'joined' where it says."""
        for conn_id in conn_ids:
            conn = self.server._conns.get(conn_id) or self._closed_pending.pop(conn_id, None)
            if conn is not None and conn._pending_join:
                conn._pending_join = False
                if conn_id in first:  # (a closed one too: its 'left' follows)
                    self.server._emit("joined", conn.client, conn.meta)

    def _serve_call(self, body: dict) -> None:
        conn = self.server._conns.get(body["conn_id"])
        answer: Dict[str, Any] = {"call": body["call"], "origin": body["origin"]}
        try:
            if conn is None:
                raise WseError(WSE_ERROR.CONNECTION_NOT_READY, {"conn_id": body["conn_id"]})
            answer.update(ok=True, value=conn.call(body["rp"], body.get("payload"),
                                                   body.get("timeout")))
        except WseError as exc:
            answer.update(ok=False, value={"code": exc.code, "details": _jsonable(exc.details)})
        self._send_quietly("result", answer)


def _jsonable(value: Any) -> Any:
    try:
        encode("result", {"v": value})
        return value
    except (TypeError, OverflowError, ValueError):
        return {"message": str(value)}
