"""The worker's side of the broker protocol (pure code, the mirror of BrokerCore).

``LinkCore`` keeps what a worker must remember to survive a broker that
restarts or goes silent: the cross-worker commands the broker has not acked
(the outbox, numbered by ``seq``), the leaves it has not answered, the joins
this worker decided alone while the broker was away (*pending*), the broker
incarnation (``epoch``) and a read replica of the map (``MapReplica``).

Every entry point takes the time as ``now`` and returns what to do: the
messages to send to the broker and the effects on the local runtime, as a
``Step``. The shell (``wse_sync.cluster.link``) owns the socket and the
greenlets, and carries the effects out.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import (Any, Callable, Deque, Dict, Hashable, Iterable, List, NamedTuple, Optional,
                    Set, Tuple, Union)

from .errors import WSE_ERROR, WseError
from .messages import Message, table_digest
from .refusals import ThinnedLog

__all__ = ["LinkCore", "MapReplica", "Step", "Join", "Deliver", "Drop", "UserLeft",
           "UserJoined", "Forget", "Answer", "ServeCall", "LocalEntry", "Effect"]

log = logging.getLogger("wse_sync.link")

# a local connection as the broker sees it: (conn_id, cid, meta, joined_at)
LocalEntry = Tuple[str, Hashable, Any, float]

# closed pending connections remembered for their 'joined' verdict
CLOSED_PENDING_MAX = 10000
# hellos whose streamed snapshot may still come (the oldest are given up)
HELLOS_AWAITED = 8
# connections per part of this worker's table (the hello, then ``table`` messages)
TABLE_PART = 2000


class MapReplica:
    """A worker's read replica of the broker's map: cid -> {conn_id: (worker, meta)}."""

    def __init__(self) -> None:
        self.users: Dict[Hashable, Dict[str, Tuple[str, Any]]] = {}
        self._cid_of: Dict[str, Hashable] = {}

    def load(self, entries: List[List[Any]]) -> None:
        self.users.clear()
        self._cid_of.clear()
        self.apply(entries, [])

    def apply(self, add: List[List[Any]], remove: List[str]) -> List[Hashable]:
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


# -- effects on the local runtime -------------------------------------------
class Deliver(NamedTuple):
    """Write ``data`` (a packed frame) to local connections: ``scope`` is
    ``"all"``, ``"cid"`` (``key`` is the user) or ``"conn"`` (``key`` a conn_id)."""
    scope: str
    key: Any
    data: Any


class Drop(NamedTuple):
    """Close these local connections (and every local one of ``cid``) with 1000."""
    conn_ids: List[str]
    cid: Optional[Hashable]
    has_cid: bool
    reason: str


class UserLeft(NamedTuple):
    """The user's last connection anywhere is gone: fire 'left' here, and
    once it has started, confirm ``fire`` to the broker (``fired``), which
    else has a surviving worker fire it if this one goes away first."""
    cid: Hashable
    code: int
    reason: str
    meta: Any
    fire: Optional[str] = None


class UserJoined(NamedTuple):
    """A pending join turned out to be the user's first: fire 'joined' here."""
    conn_id: str
    cid: Hashable
    meta: Any


class Forget(NamedTuple):
    """No connection of ``cid`` is left in the view."""
    cid: Hashable


class Answer(NamedTuple):
    """The broker's answer to request ``req`` (a join or a call) that a greenlet awaits."""
    req: int
    body: Dict[str, Any]


class ServeCall(NamedTuple):
    """Another worker calls a procedure on a local connection."""
    body: Dict[str, Any]


Effect = Union[Deliver, Drop, UserLeft, UserJoined, Forget, Answer, ServeCall]


class Step(NamedTuple):
    out: List[Message]
    effects: List[Effect]


class Join(NamedTuple):
    """How a join goes on: ``req`` to await (its answer comes as an ``Answer``),
    or ``decided`` = (first, evicted conn_ids) when the broker is away."""
    req: Optional[int]
    out: List[Message]
    decided: Optional[Tuple[bool, List[str]]]


# every DIGEST_EVERY-th heartbeat carries the digest of this worker's table,
# which the broker checks against its map (and repairs: core.broker)
DIGEST_EVERY = 5


# cross-worker commands refused: one log line per interval and kind of refusal
_refusals = ThinnedLog(log, logging.ERROR)


def _refusal(code: str, kind: str, why: str) -> WseError:
    _refusals.note(code, "%r refused (%s): %s", kind, code, why)
    return WseError(code, {"kind": kind, "reason": why})


def _evict(local: Iterable[Tuple[str, float]], limit: Optional[int]) -> List[str]:
    """The oldest local connections to close so that one more fits in ``limit``."""
    ordered = sorted(local, key=lambda c: c[1])
    if limit and len(ordered) + 1 > limit:
        return [conn_id for conn_id, _ in ordered[: len(ordered) + 1 - limit]]
    return []


class LinkCore:
    """Decisions of a worker's broker link; no sockets, no greenlets.

    ``entries()`` lists the worker's accepted connections (its table, sent to
    every broker that asks). ``limit`` is the app's conn_per_user.
    """

    def __init__(self, worker_id: str, entries: Callable[[], Iterable[LocalEntry]],
                 limit: Optional[int] = 1, *, pid: int = 0, serves: bool = True,
                 broker_timeout: float = 3.0, outage_buffer: int = 10000,
                 outage_limit: float = 30.0, now: float = 0.0,
                 table_part: int = TABLE_PART, replica: bool = True,
                 shard: Tuple[int, int] = (0, 1)) -> None:
        self.worker_id = worker_id
        # (this broker's shard, how many): told in every hello, checked there
        self.shard = shard
        self.table_part = max(1, table_part)
        # False: no copy of the map here (``view`` stays empty); ask with ``lookup``
        self.replica = replica
        self.entries = entries
        self.limit = limit
        self.pid = pid
        self.serves = serves
        self.broker_timeout = broker_timeout
        self.outage_buffer = outage_buffer
        self.outage_limit = outage_limit
        self.view = MapReplica()
        # the broker incarnation our map comes from (from its snapshot)
        self.epoch: Optional[str] = None
        self.last_broker = now
        self.down_since: Optional[float] = None
        self._ids = 0
        # commands sent again to a broker that lost them (metrics: "resends")
        self.resent = 0
        self._seq = 0
        # cross-worker commands not yet acked: (seq, kind, body, data)
        self._outbox: Deque[Tuple[int, str, Dict[str, Any], Any]] = deque()
        # leaves the broker has not answered: resent to a new broker
        self._unacked: Dict[str, Dict[str, Any]] = {}
        # requests a greenlet awaits (joins and calls)
        self._waiting: Set[int] = set()
        # joins we stopped waiting for: req -> conn_id (their answer may still come)
        self._late_joins: Dict[int, str] = {}
        # accepted without the broker's verdict: conn_id -> (cid, meta)
        self._pending: Dict[str, Tuple[Hashable, Any]] = {}
        # pending connections that closed before the verdict
        self._closed_pending: Dict[str, Tuple[Hashable, Any]] = {}
        # Streamed snapshots (see _snapshot): each hello is numbered (its
        # ``sync``); from a hello on, every change to the view (deltas, this
        # worker's own joins and leaves) is logged, and replayed over the
        # streamed map once its last part is in.
        self._hellos = 0
        self._marks: Dict[int, int] = {}     # hello number -> its place in the log
        self._log: List[Tuple[List[Any], List[str]]] = []
        self._log_base = 0                   # log index of self._log[0]
        self._staging: Optional[List[Any]] = None  # [sync, next part, of, view]
        # why the broker refused this worker (its last word), until a snapshot
        self.refused: Optional[str] = None
        # complete snapshots received (a resync too)
        self.syncs = 0
        self._synced = False
        # the broker answers again after a silence: resume or say hello (handle)
        self._recovering = False
        # joins decided here while the broker was away, since the last hello
        self._decided_since_hello = False
        # lookups of every user whose answer comes in parts: req -> rows so far
        self._listing: Dict[int, List[Any]] = {}
        # heartbeats sent (every DIGEST_EVERY-th carries the table's digest)
        self._beats = 0
        # after ``stopping``: the broker has other workers fire this one's
        # users' 'left' (so a stop need not wait for the answers to its leaves)
        self.others_fire = False

    # -- what the shell may read -----------------------------------------
    @property
    def synced(self) -> bool:
        """True once a broker's snapshot of the map has arrived (all its parts)."""
        return self._synced

    @property
    def unconfirmed(self) -> int:
        """Cross-worker commands the broker has not acked yet."""
        return len(self._outbox)

    def is_pending(self, conn_id: str) -> bool:
        return conn_id in self._pending

    @property
    def unanswered_leaves(self) -> int:
        """Leaves sent that the broker has not answered (their 'left' may still fire)."""
        return len(self._unacked)

    # -- life ---------------------------------------------------------------
    def hello(self, repair: bool = False) -> List[Message]:
        """This worker's table (in parts of ``table_part``: the hello, then ``table``
        messages, to be sent in this order), then every command the broker has
        not acked. ``repair``: asked by a broker whose map of this worker
        disagrees with the table's digest (not a broker that restarted)."""
        table = [[conn_id, cid, meta, at, conn_id in self._pending]
                 for conn_id, cid, meta, at in self.entries()]
        base = self._outbox[0][0] - 1 if self._outbox else self._seq
        self._hellos += 1
        self._marks[self._hellos] = self._log_base + len(self._log)
        while len(self._marks) > HELLOS_AWAITED:
            del self._marks[min(self._marks)]
        self._trim_log()
        self._decided_since_hello = False
        n = self.table_part
        parts = [table[i:i + n] for i in range(0, len(table), n)] or [[]]
        hello: Dict[str, Any] = {"pid": self.pid, "limit": self.limit, "table": parts[0],
                                 "base": base, "serves": self.serves, "sync": self._hellos}
        if not self.replica:
            hello["replica"] = False
        if repair:
            hello["repair"] = True
        if self.shard[1] > 1:
            hello["shard"] = [self.shard[0], self.shard[1]]
        if len(parts) > 1:
            hello["of"] = len(parts)
        out = [Message("hello", hello)]
        out += [Message("table", {"sync": self._hellos, "part": k, "rows": rows})
                for k, rows in enumerate(parts[1:], 1)]
        out += [Message(kind, body, data) for _seq, kind, body, data in self._outbox]
        self.resent += len(self._outbox)
        return out

    def bye(self) -> List[Message]:
        return [Message("bye", {})]

    def stopping(self) -> List[Message]:
        """This worker is about to close its connections and leave: the
        broker has other workers fire its users' 'left'."""
        return [Message("stopping", {})]

    def tick(self, now: float, incoming: bool = False) -> Step:
        """A heartbeat to the broker; notice a broker gone silent. ``incoming``:
        messages from the broker wait unread (this worker is the slow side)."""
        out = []
        if self.down_since is None:
            self._beats += 1
            body: Dict[str, Any] = {}
            if self.serves and self._beats % DIGEST_EVERY == 0:
                body["digest"] = table_digest(c[0] for c in self.entries())
            out.append(Message("hb", body))
        if incoming and self.down_since is None:
            self.last_broker = now
        silent = now - self.last_broker
        if silent > self.broker_timeout and self.down_since is None:
            self.down_since = self.last_broker
            log.error("no word from the broker for %.1fs: it is away; local traffic goes on,"
                      " cross-worker commands wait (at most %d, %.0fs)",
                      silent, self.outage_buffer, self.outage_limit)
        return Step(out, [])

    def received(self, now: float) -> List[Message]:
        """Anything arrived from the broker (call once per socket message).

        After a silence, the message ``handle`` gets next decides: the same
        broker (a heartbeat naming our epoch, or a part of a snapshot we asked
        for) and no join decided here meanwhile: the unacked commands are sent
        again and nothing more; else a hello with the whole table."""
        self.last_broker = now
        if self.down_since is None:
            return []
        log.info("the broker answers again after %.1fs", now - self.down_since)
        self.down_since = None
        self._recovering = True
        return []

    def _resume(self, msg: Message) -> List[Message]:
        body = msg.body
        same = ((msg.kind == "hb" and self.epoch is not None and body.get("epoch") == self.epoch)
                or (msg.kind == "snapshot" and body.get("sync") in self._marks))
        if msg.kind == "reset":
            return []  # it asks for the hello itself
        if same and not self._decided_since_hello:
            self.resent += len(self._outbox)
            return [Message(kind, body, data) for _seq, kind, body, data in self._outbox]
        return self.hello()

    def _view_apply(self, add: List[List[Any]], remove: List[str]) -> List[Hashable]:
        """A change to the view, logged while a snapshot may be on its way."""
        if not self.replica:
            return []
        if self._marks:
            self._log.append((add, remove))
        return self.view.apply(add, remove)

    def _trim_log(self) -> None:
        keep = min(self._marks.values()) if self._marks else self._log_base + len(self._log)
        drop = keep - self._log_base
        if drop > 0:
            del self._log[:drop]
            self._log_base = keep

    # -- joins and leaves -----------------------------------------------------
    def join(self, conn_id: str, cid: Hashable, meta: Any, at: float,
             local: Iterable[Tuple[str, float]], limit: Optional[int]) -> Join:
        """Start a join. ``local``: (conn_id, joined_at) of the user's local connections.

        While the broker is away (or refuses this worker) the join is decided
        here: the connection is pending, first is False, and the broker fires
        the user's 'joined' once the map is whole again (a ``UserJoined``
        effect where it must fire).
        """
        self.limit = limit
        if self.down_since is not None or self.refused is not None:
            self._decided_since_hello = True  # the broker learns of it from a hello
            return Join(None, [], self._decide_locally(conn_id, cid, meta, local, limit))
        self._ids += 1
        req = self._ids
        self._waiting.add(req)
        body = {"req": req, "conn_id": conn_id, "cid": cid, "meta": meta, "limit": limit,
                "at": at}
        return Join(req, [Message("join", body)], None)

    def join_answered(self, req: int, conn_id: str, cid: Hashable, meta: Any,
                      body: Dict[str, Any]) -> Tuple[bool, List[str]]:
        """The broker's ``joined`` answer: (is the user new?, conn_ids to evict here)."""
        self._waiting.discard(req)
        self._view_apply([[conn_id, cid, self.worker_id, meta]], list(body["evicted"]))
        return bool(body["first"]), list(body["evicted"])

    def join_timed_out(self, req: int, conn_id: str, cid: Hashable, meta: Any,
                       local: Iterable[Tuple[str, float]],
                       limit: Optional[int]) -> Tuple[bool, List[str]]:
        """No answer in time: decide here; a late answer still resolves the join."""
        self._waiting.discard(req)
        self._late_joins[req] = conn_id
        return self._decide_locally(conn_id, cid, meta, local, limit)

    def _decide_locally(self, conn_id: str, cid: Hashable, meta: Any,
                        local: Iterable[Tuple[str, float]],
                        limit: Optional[int]) -> Tuple[bool, List[str]]:
        self._pending[conn_id] = (cid, meta)
        return False, _evict(local, limit)

    def leave(self, conn_id: str, cid: Hashable, meta: Any, code: int, reason: str,
              quiet: bool = False) -> List[Message]:
        """An accepted connection closed (``quiet``: closed before its welcome)."""
        self._view_apply([], [conn_id])
        pending = self._pending.pop(conn_id, None)
        body = {"conn_id": conn_id, "cid": cid, "meta": meta, "code": code, "reason": reason,
                "quiet": quiet, "epoch": self.epoch, "pending": pending is not None}
        self._unacked[conn_id] = body
        if pending is not None and len(self._closed_pending) < CLOSED_PENDING_MAX:
            # the broker may still say this user's 'joined' is ours to fire
            self._closed_pending[conn_id] = pending
        return [Message("leave", body)]

    # -- commands and calls ---------------------------------------------------
    @property
    def outbox_full(self) -> bool:
        """``outage_buffer`` commands wait for the broker's ack."""
        return len(self._outbox) >= self.outage_buffer

    def command(self, kind: str, body: Dict[str, Any], data: Any, now: float) -> List[Message]:
        """A cross-worker command: kept until the broker acks it and resent to a
        restarted broker. Raises BROKER_UNAVAILABLE when the broker has been
        away for over ``outage_limit`` s or ``outage_buffer`` commands wait for
        it while it is away, BROKER_BUSY when they wait for a broker that
        answers (it is behind: the shell lets the sender wait for room first)."""
        down = self.down_since
        if down is not None and now - down > self.outage_limit:
            raise _refusal(WSE_ERROR.BROKER_UNAVAILABLE, kind,
                           f"broker away for more than {self.outage_limit:.0f}s")
        if len(self._outbox) >= self.outage_buffer:
            if down is None:
                raise _refusal(WSE_ERROR.BROKER_BUSY, kind,
                               f"{len(self._outbox)} commands wait for the broker's ack (it is"
                               " behind)")
            raise _refusal(WSE_ERROR.BROKER_UNAVAILABLE, kind,
                           f"{len(self._outbox)} commands wait for the broker (away)")
        self._seq += 1
        body["seq"] = self._seq
        self._outbox.append((self._seq, kind, body, data))
        return [Message(kind, body, data)] if down is None else []


    def call(self, conn_id: str, rp: str, payload: Any, timeout: float) -> Tuple[int, List[Message]]:
        """Start a call on a connection held by another worker: (req, messages)."""
        self._ids += 1
        req = self._ids
        self._waiting.add(req)
        body = {"call": req, "conn_id": conn_id, "rp": rp, "payload": payload,
                "timeout": timeout}
        return req, [Message("call", body)]

    def stats(self, report: Dict[str, Any], full: bool) -> Tuple[int, List[Message]]:
        """Send this worker's metrics ``report`` (core.metrics); the broker's answer
        (the cluster's stats when ``full``) comes as an ``Answer`` for the req."""
        self._ids += 1
        req = self._ids
        self._waiting.add(req)
        return req, [Message("stats", {"req": req, "full": full, "report": report})]

    def lookup(self, cids: Optional[List[Hashable]] = None, count: bool = False
               ) -> Tuple[int, List[Message]]:
        """Ask the broker who is connected: these ``cids``, how many users
        (``count``), or every user (neither). The ``Answer`` for the req has
        ``users`` ([[cid, [[conn_id, worker, meta], ...]], ...], the parts of
        an answer about every user put together) or ``count``."""
        self._ids += 1
        req = self._ids
        self._waiting.add(req)
        body: Dict[str, Any] = {"req": req}
        if count:
            body["count"] = True
        elif cids is None:
            body["all"] = True
        else:
            body["cids"] = list(cids)
        return req, [Message("lookup", body)]

    def call_done(self, req: int) -> None:
        """The caller stopped waiting (answered or timed out)."""
        self._waiting.discard(req)
        self._listing.pop(req, None)

    @staticmethod
    def call_result(body: Dict[str, Any], ok: bool, value: Any) -> List[Message]:
        """The answer to a ``ServeCall``."""
        return [Message("result", {"call": body["call"], "origin": body["origin"], "ok": ok,
                                   "value": value})]

    # -- what the broker says -------------------------------------------------
    def handle(self, msg: Message, now: float) -> Step:
        """One message from the broker (after ``received``)."""
        out: List[Message] = []
        effects: List[Effect] = []
        body, kind = msg.body, msg.kind
        if self._recovering:
            self._recovering = False
            out += self._resume(msg)
        if kind == "deliver":
            if body.get("all"):
                effects.append(Deliver("all", None, msg.data))
            elif "cid" in body:
                effects.append(Deliver("cid", body["cid"], msg.data))
            else:
                effects.append(Deliver("conn", body.get("conn_id"), msg.data))
        elif kind == "left":
            if "conn_id" in body and self._unacked.pop(body["conn_id"], None) is None:
                return Step(out, effects)  # the answer to a leave answered before (resent)
            if body.get("last"):
                effects.append(UserLeft(body["cid"], body.get("code", 1005),
                                        body.get("reason", ""), body.get("meta"),
                                        body.get("fire")))
        elif kind in ("joined", "result", "stats"):
            req = body.get("req", body.get("call"))
            if req in self._waiting:
                effects.append(Answer(req, body))
            elif kind == "joined" and req in self._late_joins:
                conn_id = self._late_joins.pop(req)
                effects += self._resolved([conn_id], [conn_id] if body.get("first") else [])
        elif kind == "users":
            req = body.get("req")
            if req in self._waiting:
                answer = self._listed(req, body)
                if answer is not None:
                    effects.append(Answer(req, answer))
        elif kind == "resolved":
            effects += self._resolved(body.get("conns", []), body.get("first", []))
        elif kind == "delta":
            effects += [Forget(cid) for cid in
                        self._view_apply(body.get("add", []), body.get("remove", []))]
        elif kind == "snapshot":
            out += self._snapshot(body)
        elif kind == "drop":
            effects.append(Drop(list(body.get("conns", [])), body.get("cid"), "cid" in body,
                                body.get("reason", "")))
        elif kind == "call":
            effects.append(ServeCall(body))
        elif kind == "reset":
            hello = self.hello(repair=bool(body.get("repair")))
            log.info("broker asked for this worker's table: resent %d connection(s)",
                     sum(len(m.body.get("table", m.body.get("rows", []))) for m in hello
                         if m.kind in ("hello", "table")))
            out += hello
        elif kind == "stopping":
            self.others_fire = bool(body.get("others"))
        elif kind == "refused":
            self._refused(body)
        elif kind in ("hb", "ack"):
            self._acked(int(body.get("ack", body.get("seq", 0))))
        return Step(out, effects)

    def _refused(self, body: Dict[str, Any]) -> None:
        if "shard" in body:
            i, k = (list(body["shard"]) + [0, 0])[:2]
            why = (f"this broker is shard {i}/{k}, but this worker takes it for shard"
                   f" {self.shard[0]}/{self.shard[1]}: every worker needs the same broker"
                   " list, in the same order")
        else:
            why = f"it speaks schema {body.get('version')}"
        if why != self.refused:
            log.error("the broker refused this worker: %s", why)
        self.refused = why

    def _new_epoch(self, epoch: Any) -> List[Message]:
        previous, self.epoch = self.epoch, epoch
        if previous is not None and previous != epoch and self._unacked:
            log.info("new broker: resending %d unanswered leave(s)", len(self._unacked))
            return [Message("leave", leave) for leave in self._unacked.values()]
        return []

    def _snapshot(self, body: Dict[str, Any]) -> List[Message]:
        """A part of the map (``part`` of ``of``, for our hello number ``sync``).

        The rule: the parts hold the map as it was when the broker read our
        hello; the broker sends every delta after that one to us too, after
        part 0. From our hello on, every change to the view is logged (and
        applied to the current view, which stays readable meanwhile); the parts
        fill a new view, and at the last part the log since that hello is
        replayed over it and the new view replaces the old. Replaying changes
        older than the broker's reading of the hello is harmless: each one sets
        or removes one connection, and the map already shows the last of them.
        A part of another hello, or after a lost part, is ignored (a lost part:
        hello again). A snapshot without ``part`` (a broker before streamed
        snapshots) is the whole map."""
        entries = body.get("entries", [])
        if "part" not in body:
            self.view.load(entries)
            self._marks.clear()
            self._trim_log()
            self._staging = None
            self._done_sync()
            return self._new_epoch(body.get("epoch"))
        sync, part, of = body.get("sync"), body.get("part"), body.get("of", 1)
        out: List[Message] = []
        staging = self._staging
        if part == 0:
            if sync not in self._marks:
                return out  # the answer to a hello we no longer wait for
            staging = self._staging = [sync, 0, of, type(self.view)()]
            out += self._new_epoch(body.get("epoch"))
        elif staging is None or staging[0] != sync:
            return out
        elif part != staging[1]:
            log.warning("snapshot part %s of %s came after part %s: asking again", part, of,
                        staging[1] - 1)
            self._staging = None
            return out + self.hello()
        view = staging[3]
        view.apply(entries, [])
        staging[1] += 1
        if staging[1] < staging[2]:
            return out
        for add, remove in self._log[self._marks[sync] - self._log_base:]:
            view.apply(add, remove)
        self.view = view
        for n in [n for n in self._marks if n <= sync]:
            del self._marks[n]
        self._trim_log()
        self._staging = None
        self._done_sync()
        return out

    def _listed(self, req: int, body: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """A part of a ``users`` answer; the whole answer once its last part is in
        (a part missing: the answer never completes, and the caller times out)."""
        if "part" not in body:
            return body
        parts = self._listing.setdefault(req, [])
        if body["part"] != len(parts):
            self._listing.pop(req, None)
            return None
        parts.append(body.get("users", []))
        if len(parts) < body.get("of", 1):
            return None
        del self._listing[req]
        return {"req": req, "users": [row for part in parts for row in part]}

    def _done_sync(self) -> None:
        self.syncs += 1
        self._synced = True
        self.refused = None

    def _acked(self, seq: int) -> None:
        outbox = self._outbox
        while outbox and outbox[0][0] <= seq:
            outbox.popleft()

    def _resolved(self, conn_ids: List[str], first: List[str]) -> List[Effect]:
        """Pending joins decided by the broker: 'joined' fires where it says."""
        effects: List[Effect] = []
        table: Optional[Dict[str, Tuple[Hashable, Any]]] = None
        for conn_id in conn_ids:
            entry = self._pending.pop(conn_id, None) or self._closed_pending.pop(conn_id, None)
            if entry is None and conn_id in first:
                # not pending here: this worker was declared dead and came back,
                # and its users got 'left' meanwhile
                if table is None:
                    table = {c: (cid, meta) for c, cid, meta, _at in self.entries()}
                entry = table.get(conn_id)
            if entry is not None and conn_id in first:  # (a closed one too: its 'left' follows)
                effects.append(UserJoined(conn_id, entry[0], entry[1]))
        return effects
