"""The broker: the authoritative user map and the fan-out of commands.

``BrokerCore`` is pure: ``handle(sender, message, now, role, key)`` and
``tick(now)`` return the messages to send as ``(worker_id, Message)`` pairs.
``wse_sync.cluster.broker.Broker`` runs it on a ZeroMQ ROUTER socket.

Every message is checked before it changes anything (``core.checks``: the
sender's role, the shape and size of the body), and so is what it claims:

- a routing identity belongs to the first key that spoke with it (a peer
  cannot take over a worker's identity, e.g. to say ``bye`` in its name);
- a ``join`` may not take a conn_id another worker holds, nor may a
  worker's table (``hello``);
- a ``leave`` names a connection the sender holds (or one the map does not
  hold at all: evicted, or known to an earlier broker);
- a ``result`` answers a call the broker routed to the sender.

A refused message changes nothing and gets no answer (but a ``hello`` for
another shard is answered ``refused``, so the worker can say why it stays
out); it is counted (``refused.<what>``) and logged once per sender and kind
of refusal.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, List, Optional, Set, Tuple

from .checks import READS_MAP, ROLE_CLIENT, ROLE_WORKER, Refusal, check
from .errors import WSE_ERROR, WSE_REASON
from .lefts import PendingLefts
from .refusals import ThinnedLog
from .messages import KINDS, Message, table_digest
from .registry import ConnEntry, Registry
from .shards import Shard, shard_of

# the counter of each kind received
_IN = {kind: "in." + kind for kind in KINDS}

__all__ = ["BrokerCore", "HEARTBEAT", "WORKER_TIMEOUT", "SYNC_WINDOW", "Out", "ROLE_WORKER",
           "ROLE_CLIENT"]

log = logging.getLogger("wse_sync.broker")

# seconds between heartbeats, and of silence after which a worker is dead
HEARTBEAT = 1.0
WORKER_TIMEOUT = 3.0
# seconds a restarted broker holds routed commands while the workers resend
# their tables (``sync_window``; a fresh cluster's broker uses 0)
SYNC_WINDOW = 2.5
# messages held per unknown worker until it resends its table
LIMBO_MAX = 10000
# kinds that route by the map or decide joined/left (held while the map is rebuilt)
HELD_WHILE_SYNCING = frozenset({"send", "bcast", "drop_cid", "conn_send", "conn_drop", "call",
                                "join", "leave", "lookup"})
# kinds that change neither the sender's standing nor the sync state:
# handle_all carries a run of them out without asking again who the sender is
STEADY_KINDS = HELD_WHILE_SYNCING | {"result", "hb", "fired"}

# a worker's commands are acked at least every ACK_EVERY seqs (and with each heartbeat)
ACK_EVERY = 256
# connections per ``snapshot`` part: a hello's map goes out in parts of this
# size between other work (``pump``), never all at once
SNAPSHOT_CHUNK = 2000
# routing identities remembered with the key that owns them, and refusals
# logged (once per sender and kind); the oldest are forgotten beyond these
OWNERS_MAX = 100000
LOGGED_MAX = 10000

Out = List[Tuple[str, Message]]

# unconfirmed 'joined' events kept per worker (beyond: not tracked)
UNJOINED_MAX = 100000

# map repairs: one log line per interval, with the counts
_repairs = ThinnedLog(log)


@dataclass
class _Stream:
    """A snapshot on its way to one worker: the map as it was at its hello."""
    entries: List[ConnEntry]
    sync: int
    of: int
    part: int = 1  # the next part to send (part 0 went with the hello's answer)


@dataclass
class _Listing:
    """The answer to a ``lookup`` of every user, on its way in parts."""
    cids: List[Hashable]
    req: Any
    of: int
    part: int = 0


@dataclass
class _Upload:
    """A worker's table arriving in parts: its hello, then ``table`` messages."""
    sync: Optional[int]
    of: int
    # its connections the map held when the hello came; what no part names is gone
    before: Set[str]
    last: float            # when the latest part came
    revived: bool = False  # declared dead before: every 'joined' is decided again
    restart: bool = False  # part of rebuilding the map after a broker restart
    part: int = 1          # the next part expected
    seen: Set[str] = field(default_factory=set)
    pending: List[str] = field(default_factory=list)


@dataclass
class WorkerInfo:
    worker_id: str
    pid: int = 0
    last_seen: float = 0.0
    # the worker's conn_per_user (the app's setting; all workers share it)
    limit: Optional[int] = None
    # highest command seq carried out, and the last one acked to the worker
    acked: int = 0
    ack_sent: int = 0
    # False for a member without sockets (connect_cluster): never gets 'left'
    serves: bool = True
    # what its key allows (core.checks): "worker", or "client" for a connect_cluster() key
    role: str = ROLE_WORKER
    # its last metrics report (core.metrics), shown to every worker's /metrics
    report: Optional[Dict[str, Any]] = None
    # False: it keeps no replica of the map (no snapshot, no delta; it asks: lookup)
    replica: bool = True
    # how its last table digest differed from the map (count, xor), if it did
    mismatch: Optional[Tuple[int, int]] = None
    # it said it is stopping: its users' 'left' goes to other workers
    stopping: bool = False
    # connections whose user's 'joined' it was told to fire and has not yet
    # confirmed started: if it dies now, that user gets no 'left' either
    unjoined: Dict[str, Hashable] = field(default_factory=dict)


class BrokerCore:
    """Decisions of the broker; no sockets."""

    def __init__(self, worker_timeout: float = WORKER_TIMEOUT, epoch: Optional[str] = None,
                 limbo_max: int = LIMBO_MAX, sync_window: float = 0.0,
                 snapshot_chunk: int = SNAPSHOT_CHUNK, shard: Shard = (0, 1)) -> None:
        self.registry = Registry()
        # (this broker's index, how many shards): it owns the users of that shard
        self.shard = shard
        self.workers: Dict[str, WorkerInfo] = {}
        self.worker_timeout = worker_timeout
        self.counters: Counter[str] = Counter()
        # this broker incarnation; a leave naming another epoch was sent to a
        # broker that died, and the map has been rebuilt since
        self.epoch = epoch or os.urandom(6).hex()
        # messages of workers we do not know yet, held until their hello
        self.limbo: Dict[str, Tuple[float, List[Message]]] = {}
        self.limbo_max = limbo_max
        # acked seq of workers declared dead, in case they come back
        self._graveyard: Dict[str, int] = {}
        # After a restart the map is rebuilt from the workers' tables: commands
        # that route by the map wait until every live worker had time to send
        # its table (a heartbeat or two), then run in arrival order. The window
        # opens when a worker shows it knew an earlier broker (a message before
        # its hello, or a hello with connections or commands): never on a fresh
        # cluster.
        self.sync_window = sync_window
        self._sync_until: Optional[float] = None
        self._deferred: List[Tuple[str, Message]] = []
        # users whose 'joined' has fired and whose 'left' has not
        self.announced: Set[Hashable] = set()
        # connections accepted while their worker could not reach us: their
        # user's 'joined' is decided once the map is whole again
        self._pending: Dict[str, None] = {}
        # server -> client calls on their way: (origin, call id) -> holder worker
        self._calls: Dict[Tuple[str, Any], str] = {}
        # routing identity -> the CURVE key that first spoke with it
        self._owners: Dict[str, str] = {}
        # (sender, refusal) pairs already logged
        self._logged: Dict[Tuple[str, str], None] = {}
        # snapshots being streamed (worker -> what is left of it), sent by pump()
        self.snapshot_chunk = max(1, snapshot_chunk)
        self._streams: Dict[str, _Stream] = {}
        # answers to lookups of every user, sent in parts by pump()
        self._listings: Dict[Tuple[str, Any], _Listing] = {}
        # tables still arriving in parts (worker -> its upload)
        self._uploads: Dict[str, _Upload] = {}
        # 'left' events handed from stopping workers to others (round-robin)
        self._handed = 0
        # 'left' events not yet started, and 'joined' answers held behind them
        self.lefts = PendingLefts(self.counters)
        # the worker -> broker kinds this core carries out
        self._handlers: Dict[str, Callable[[str, Dict[str, Any], Any, float], Out]] = {
            "table": self._on_table, "hb": self._on_hb, "stopping": self._on_stopping,
            "bye": self._on_bye, "join": self._on_join, "leave": self._on_leave,
            "fired": self._on_fired, "send": self._on_send, "bcast": self._on_bcast,
            "drop_cid": self._on_drop_cid, "conn_send": self._on_conn_send,
            "conn_drop": self._on_conn_drop, "call": self._on_call, "result": self._on_result,
            "lookup": self._on_lookup,
        }
        # when tick() last ran: a longer gap means this broker was not listening
        self._last_tick: Optional[float] = None

    # -- entry points -------------------------------------------------
    def handle(self, sender: str, msg: Message, now: float, role: str = ROLE_WORKER,
               key: Optional[str] = None) -> Out:
        """One message from ``sender`` (its routing identity). ``role`` is what
        the sender's key allows (``core.checks``); ``key`` identifies that key
        (None on a link without CURVE)."""
        self.counters[_IN[msg.kind]] += 1
        out: Out = []
        if key is not None and not self._owned_by(sender, key):
            if sender in self.workers:
                # the ROUTER lets one link per identity in: the worker's own link is
                # down, and its identity now reaches another key; route nothing more to it
                log.warning("worker %s is unreachable (another key holds its routing identity):"
                            " removing its connections", sender)
                return self.remove_worker(sender)
            return []
        refusal = check(msg, role)
        if refusal is not None:
            self._refuse(sender, refusal.what, "%s", refusal.why, kind=msg.kind)
            return self._refusal_answer(sender, msg, refusal)
        if msg.kind == "stats":
            return [(sender, self._stats(sender, msg.body))]
        info = self.workers.get(sender)
        if info is not None and info.role != role:
            # its key moved to the other directory (reloaded): it starts again
            log.warning("%s now speaks with a %s key: removing it until it says hello again",
                        sender, role)
            out += self.remove_worker(sender)
            info = None
        if msg.kind == "hello":
            if not self._same_shards(sender, msg.body):
                return [(sender, Message("refused", {"shard": list(self.shard)}))]
            try:
                out += self._hello(sender, msg.body, now, role)
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                self._refuse(sender, "dropped.malformed", "%r", exc, kind="hello")
                return []
            _, held = self.limbo.pop(sender, (0.0, []))
            for m in held:
                if "seq" in m.body:
                    continue  # a command: the worker resends it after its hello
                out += self._process(sender, m, now)
            return out
        if info is None:
            # A worker we do not know (we restarted, or it was declared dead):
            # hold its messages until it has resent its table.
            if sender not in self.limbo:
                self._restarted(now)
                out.append((sender, Message("reset", {})))
            since, held = self.limbo.setdefault(sender, (now, []))
            if msg.kind not in ("hb", "table"):  # a table part belongs to a lost hello
                if len(held) < self.limbo_max:
                    held.append(msg)
                else:
                    self.counters["dropped.limbo-full"] += 1
            return out
        info.last_seen = now
        return self._process(sender, msg, now)

    def handle_all(self, sender: str, messages: List[Message], now: float,
                   role: str = ROLE_WORKER, key: Optional[str] = None) -> Out:
        """``handle`` of each of one peer's messages, in order. What depends only
        on the sender (its key, its standing, the sync state) is looked up once
        for a run of STEADY_KINDS, and again after any other kind."""
        out: Out = []
        steady: Optional[WorkerInfo] = None
        counters = self.counters
        for msg in messages:
            kind = msg.kind
            if steady is None or kind not in STEADY_KINDS:
                out += self.handle(sender, msg, now, role, key)
                steady = self._steady(sender, now, role, key)
                continue
            counters[_IN[kind]] += 1
            refusal = check(msg, role)
            if refusal is not None:
                self._refuse(sender, refusal.what, "%s", refusal.why, kind=kind)
                out += self._refusal_answer(sender, msg, refusal)
                continue
            steady.last_seen = now
            out += self._carry_out(sender, msg, now)
        return out

    def _steady(self, sender: str, now: float, role: str, key: Optional[str]
                ) -> Optional[WorkerInfo]:
        """The sender's WorkerInfo when ``handle`` would carry its next steady
        message straight out (no other check): known, same key and role, no
        sync under way; else None."""
        info = self.workers.get(sender)
        if (info is None or info.role != role or self._deferred or self._syncing(now)
                or (key is not None and self._owners.get(sender) != key)):
            return None
        return info

    def _same_shards(self, sender: str, body: Dict[str, Any]) -> bool:
        """A worker's hello names the shard it thinks this broker is: a worker
        with another broker list would place users where no other worker looks."""
        said = tuple(body.get("shard", (0, 1)))
        if said == self.shard:
            return True
        self._refuse(sender, "refused.shard", "it takes this broker for shard %d/%d, but this is"
                     " shard %d/%d (every worker needs the same broker list, in the same order,"
                     " and each broker its --shard)", said[0], said[1], *self.shard,
                     kind="hello")
        return False

    @staticmethod
    def _refusal_answer(sender: str, msg: Message, refusal: Refusal) -> Out:
        """A lookup its key may not make is answered at once, saying so (the
        asker would otherwise wait out its timeout); other refusals get none."""
        req = msg.body.get("req") if msg.kind == "lookup" else None
        if refusal.what != "refused.role" or type(req) is not int:
            return []
        return [(sender, Message("users", {"req": req, "refused": refusal.why}))]

    def owner(self, sender: str) -> Optional[str]:
        """The key ``sender``'s name is bound to (None: no key spoke as it yet)."""
        return self._owners.get(sender)

    def identity_taken(self, identity: str, key: str) -> None:
        """Count and log (once) a link that spoke in a member's name with another key."""
        self._refuse(identity, "refused.identity-taken",
                     "its member name belongs to another key (this one is %s)", key[:12])

    def _owned_by(self, sender: str, key: str) -> bool:
        """A routing identity stays with the first key that used it."""
        owner = self._owners.get(sender)
        if owner is None:
            if len(self._owners) >= OWNERS_MAX:
                del self._owners[next(iter(self._owners))]
            self._owners[sender] = key
            return True
        if owner == key:
            return True
        self._refuse(sender, "refused.identity-taken",
                     "its routing identity belongs to another key (this one is %s)", key[:12])
        return False

    def _refuse(self, sender: str, what: str, fmt: str, *args: Any, kind: str = "") -> None:
        """Count a refused message; log it once per sender and kind of refusal."""
        self.counters[what] += 1
        if (sender, what) in self._logged:
            return
        if len(self._logged) >= LOGGED_MAX:
            del self._logged[next(iter(self._logged))]
        self._logged[(sender, what)] = None
        log.warning("%s %s from %r: " + fmt + " (counted as %r; logged once per peer)",
                    what.split(".")[0], f"a {kind!r} message" if kind else "a message", sender,
                    *args, what)

    def _syncing(self, now: float) -> bool:
        """The map is being rebuilt after a restart: within the sync window, and
        until every table begun within it is complete."""
        if self._sync_until is None:
            return False
        return now < self._sync_until or (bool(self._uploads)
                                          and any(u.restart for u in self._uploads.values()))

    def _restarted(self, now: float) -> None:
        """A worker shows it knew an earlier broker: open the sync window (once)."""
        if self._sync_until is None:
            self._sync_until = now + self.sync_window

    def _process(self, sender: str, msg: Message, now: float) -> Out:
        if msg.kind in HELD_WHILE_SYNCING and (self._deferred or self._syncing(now)):
            self._deferred.append((sender, msg))
            return []
        return self._carry_out(sender, msg, now)

    def _carry_out(self, sender: str, msg: Message, now: float) -> Out:
        out: Out = []
        seq = msg.body.get("seq")
        info = self.workers.get(sender)
        if seq is not None and info is not None:
            if not isinstance(seq, int) or seq <= info.acked:
                self.counters["dropped.duplicate"] += 1
                return out
            info.acked = seq
            if seq - info.ack_sent >= ACK_EVERY:
                info.ack_sent = seq
                out.append((sender, Message("ack", {"seq": seq})))
        handler = self._handlers.get(msg.kind)
        if handler is None:
            self._refuse(sender, "dropped.unexpected", "not a worker->broker kind", kind=msg.kind)
            return out
        try:
            out += handler(sender, msg.body, msg.data, now)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            self._refuse(sender, "dropped.malformed", "%r", exc, kind=msg.kind)
        return out

    def tick(self, now: float) -> Out:
        """Heartbeats out, dead workers removed.

        A worker is dead after ``worker_timeout`` of silence *while this broker
        listens*: when the ticks were held up (one long message, e.g. a big
        table, kept the loop busy), the gap is credited to every worker, whose
        heartbeats wait in the socket meanwhile. A worker a snapshot is still
        streamed to is not timed out.
        """
        out: Out = []
        last, self._last_tick = self._last_tick, now
        if last is not None and now - last > self.worker_timeout / 2:
            stall = now - last
            self.counters["stalls"] += 1
            for w in self.workers.values():
                w.last_seen = min(now, w.last_seen + stall)
        if self._deferred and not self._syncing(now):
            deferred, self._deferred = self._deferred, []
            log.info("map rebuilt from %d worker table(s): carrying out %d held command(s)",
                     len(self.workers), len(deferred))
            for sender, msg in deferred:
                out += self._carry_out(sender, msg, now)
        out += self.lefts.expired(now)
        # after the held leaves: a pending connection that is gone gets no 'joined'
        if self._pending and not self._syncing(now):
            out += self._resolve_pending()
        for sender, (since, held) in list(self.limbo.items()):
            if now - since > 3 * self.worker_timeout:
                del self.limbo[sender]
                self.counters["dropped.limbo-expired"] += len(held)
                if held:
                    log.warning("dropped %d message(s) of %r: it never sent its table",
                                len(held), sender)
        for sender, upload in list(self._uploads.items()):
            if now - upload.last > self.worker_timeout:
                # its next part was lost (or the worker died mid-table): hello again
                del self._uploads[sender]
                self.counters["dropped.table-incomplete"] += 1
                log.warning("worker %s: table part %d of %d never came: asking for its hello"
                            " again", sender, upload.part, upload.of)
                out.append((sender, Message("reset", {})))
        for w in list(self.workers.values()):
            if w.worker_id in self._streams:
                w.last_seen = max(w.last_seen, now - self.worker_timeout / 2)
            if now - w.last_seen > self.worker_timeout:
                log.warning("worker %s (pid %s) silent for %.1fs: removing its connections",
                            w.worker_id, w.pid, now - w.last_seen)
                out += self.remove_worker(w.worker_id)
            else:
                w.ack_sent = w.acked
                out.append((w.worker_id, Message("hb", {"ack": w.acked, "epoch": self.epoch})))
        return out

    @property
    def streaming(self) -> bool:
        """Snapshot or listing parts wait to be sent (call ``pump``)."""
        return bool(self._streams or self._listings)

    def pump(self, parts: int = 1) -> Out:
        """The next ``parts`` snapshot parts, one worker after the other. The
        shell calls this between reading messages, so a snapshot of any size
        never holds up heartbeats, joins or routing."""
        out: Out = []
        while parts > 0 and self._streams:
            for worker_id in list(self._streams):
                if parts <= 0:
                    break
                stream = self._streams[worker_id]
                out.append((worker_id, self._part(stream)))
                parts -= 1
                if stream.part >= stream.of:
                    del self._streams[worker_id]
        while parts > 0 and self._listings:
            key = next(iter(self._listings))
            listing = self._listings[key]
            out.append((key[0], self._listing_part(listing)))
            parts -= 1
            if listing.part >= listing.of:
                del self._listings[key]
        return out

    def _part(self, stream: _Stream) -> Message:
        n = self.snapshot_chunk
        i = stream.part
        stream.part += 1
        chunk = [e.to_list() for e in stream.entries[i * n:(i + 1) * n]]
        if stream.part >= stream.of:
            stream.entries = []
        return Message("snapshot", {"entries": chunk, "epoch": self.epoch, "sync": stream.sync,
                                    "part": i, "of": stream.of})

    def remove_worker(self, worker_id: str) -> Out:
        self._streams.pop(worker_id, None)
        for key in [k for k in self._listings if k[0] == worker_id]:
            del self._listings[key]
        self._uploads.pop(worker_id, None)
        info = self.workers.pop(worker_id, None)
        unjoined: Set[Hashable] = set()
        if info is not None:
            self._graveyard[worker_id] = info.acked
            unjoined = set(info.unjoined.values())
        unfired, released = self.lefts.drop_worker(worker_id)
        self.counters["workers.removed"] += 1
        outcomes = self.registry.drop_worker(worker_id)
        out_calls: Out = []
        for (origin, call), holder in list(self._calls.items()):
            if holder == worker_id or origin == worker_id:
                del self._calls[(origin, call)]
                if holder == worker_id and origin in self.workers:
                    out_calls.append((origin, Message("result", {"call": call, "ok": False,
                        "value": {"code": WSE_ERROR.RP_DISCONNECT,
                                  "details": {"disconnected": [1006, "wse.worker-died"]}}})))
        out = out_calls + released + self._delta([], [o.entry.conn_id for o in outcomes])
        survivors = self._survivors()
        for o in outcomes:
            self._pending.pop(o.entry.conn_id, None)
        for i, o in enumerate(outcomes):
            announced = o.entry.cid in self.announced
            if o.last:
                self.announced.discard(o.entry.cid)
            if o.last and o.entry.cid in unjoined:
                # its 'joined' never started there: no 'left' either
                self.counters["left.never-joined"] += 1
                announced = False
            if o.last and announced and survivors:
                # 'left' fires in one surviving worker, spread round-robin
                target = survivors[i % len(survivors)]
                left = {"cid": o.entry.cid, "code": 1006, "reason": "wse.worker-died",
                        "meta": o.entry.meta, "last": True, "fire": o.entry.conn_id}
                self._expect_fired(target, left)
                out.append((target, Message("left", left)))
        # 'left' events the gone worker was told to fire and never started
        # (it died, or stopped with handlers still waiting): a survivor fires
        # them, unless the user is back (then its new 'joined' has fired)
        for i, left in enumerate(unfired):
            cid = left["cid"]
            if cid in unjoined:
                # its 'joined' never started there either: neither fires
                self.counters["left.never-joined"] += 1
                continue
            if cid in self.registry.users or cid in self.announced:
                self.counters["left.superseded"] += 1
                continue
            if not survivors:
                self.counters["left.lost"] += 1
                continue
            target = survivors[i % len(survivors)]
            left = {k: v for k, v in left.items() if k != "conn_id"}
            self._expect_fired(target, left)
            self.counters["left.refired"] += 1
            out.append((target, Message("left", left)))
        if unfired:
            log.info("worker %s had %d 'left' event(s) not yet started: fired elsewhere",
                     worker_id, len(unfired))
        return out

    def stats(self) -> Dict[str, Any]:
        """The map's figures, per worker too, with each worker's last metrics report."""
        return {
            "users": len(self.registry.users),
            "connections": len(self.registry.conns),
            "workers": {w: {"pid": i.pid, "connections": self.registry.count_of_worker(w),
                            "role": i.role,
                            "serves": i.serves}
                        for w, i in self.workers.items()},
            "reports": {w: i.report for w, i in self.workers.items() if i.report is not None},
            "counters": dict(self.counters),
        }

    def _stats(self, sender: str, body: Dict[str, Any]) -> Message:
        """``{}``: the stats. A worker's ``{req, report, full}``: keep its report;
        answer ``req`` with the stats when ``full``, else with nothing more."""
        info = self.workers.get(sender)
        if info is not None and "report" in body:
            info.report = body["report"]
        if "req" not in body:
            return Message("stats", self.stats())
        answer = self.stats() if body.get("full") else {}
        answer["req"] = body["req"]
        return Message("stats", answer)

    # -- worker -> broker kinds --------------------------------------
    def _hello(self, sender: str, body: Dict[str, Any], now: float, role: str) -> Out:
        """A worker (re)attaches: its table's first part (of ``of``; the others
        come as ``table`` messages), then the map streamed back once the last
        part is in."""
        # parse everything before changing anything (core.checks has seen the types)
        pid = int(body.get("pid", 0))
        base = int(body.get("base", 0))
        limit = body.get("limit")
        if limit is not None and not isinstance(limit, int):
            raise TypeError("limit must be an int or null")
        of = int(body.get("of", 1))
        table = body.get("table", [])
        if (table or base or of > 1) and not body.get("repair"):
            self._restarted(now)
        info = self.workers.get(sender)
        if info is None:
            info = WorkerInfo(sender, acked=self._graveyard.get(sender, 0))
        # declared dead, yet alive (its loop was blocked): its users got 'left'
        # then, so their 'joined' is decided again
        revived = self._graveyard.pop(sender, None) is not None
        # commands after ``base`` are resent right after this hello
        info.acked = max(info.acked, base)
        info.pid = pid
        info.limit = limit
        info.role = role
        # a client key serves no sockets whatever it says
        info.serves = bool(body.get("serves", True)) and role == ROLE_WORKER
        # (a client key reads no map: its snapshot is empty, it gets no deltas)
        info.replica = bool(body.get("replica", True)) and role in READS_MAP
        info.last_seen = now
        self.workers[sender] = info
        self._streams.pop(sender, None)
        upload = _Upload(body.get("sync"), max(1, of),
                         {e.conn_id for e in self.registry.entries_of_worker(sender)}, now,
                         revived=revived)
        upload.restart = self._syncing(now)
        out = self._table_part(sender, upload, table)
        if upload.part >= upload.of:
            self._uploads.pop(sender, None)
            out += self._table_done(sender, upload, now)
        else:
            self._uploads[sender] = upload
        return out

    def _on_table(self, sender: str, body: Dict[str, Any], data: Any, now: float) -> Out:
        upload = self._uploads.get(sender)
        if upload is None or body.get("sync") != upload.sync:
            self.counters["dropped.stale-table"] += 1  # the rest of a hello given up
            return []
        if body["part"] != upload.part:
            del self._uploads[sender]
            log.warning("worker %s: table part %s came after part %s: asking for its hello again",
                        sender, body["part"], upload.part - 1)
            return [(sender, Message("reset", {}))]
        upload.part += 1
        upload.last = now
        out = self._table_part(sender, upload, body.get("rows", []))
        if upload.part >= upload.of:
            del self._uploads[sender]
            out += self._table_done(sender, upload, now)
        return out

    def _table_part(self, sender: str, upload: _Upload, table: List[List[Any]]) -> Out:
        """One part of a worker's table into the map; deltas to the others."""
        taken = [c for c in table if self._held_elsewhere(str(c[0]), sender)]
        if taken:
            self._refuse(sender, "refused.conn-taken",
                         "%d connection(s) of its table are held by other workers (e.g. %r):"
                         " left out", len(taken), str(taken[0][0])[:32], kind="hello")
            self.counters["refused.conn-taken"] += len(taken) - 1
            table = [c for c in table if not self._held_elsewhere(str(c[0]), sender)]
        entries = [ConnEntry(str(c[0]), c[1], sender, c[2], float(c[3])) for c in table]
        if upload.revived:
            pending = {e.conn_id for e in entries}
        else:
            pending = {str(c[0]) for c in table if len(c) > 4 and c[4]}
        _new_users, evicted = self.registry.add_table(sender, entries,
                                                      self.workers[sender].limit)
        upload.seen.update(e.conn_id for e in entries)
        for e in entries:
            if e.conn_id in pending:
                upload.pending.append(e.conn_id)
            elif e.conn_id in self.registry.conns:
                self.announced.add(e.cid)  # its 'joined' fired before
        added = [e.to_list() for e in entries if e.conn_id not in upload.before]
        out = self._delta(added, [e.conn_id for e in evicted], skip=sender)
        return out + self._drops(evicted, WSE_REASON.CLIENTS_CONCURRENCY)

    def _table_done(self, sender: str, upload: _Upload, now: float) -> Out:
        """The last part is in: what the table did not name is gone; the map
        goes back to the worker; its pending joins are decided."""
        gone = []
        for conn_id in upload.before - upload.seen:
            entry = self.registry.conns.get(conn_id)
            if entry is not None and entry.worker == sender:
                self.registry.leave(conn_id)
                gone.append(conn_id)
        log.info("worker %s (pid %s) attached with %d connections", sender,
                 self.workers[sender].pid, len(upload.seen))
        out: Out = [(sender, self._snapshot(sender, upload.sync))]
        out += self._delta([], gone, skip=sender)
        for conn_id in upload.pending:
            if conn_id in self.registry.conns:
                self._pending[conn_id] = None
        if upload.pending and not self._syncing(now):
            out += self._resolve_pending()
        return out

    def _snapshot(self, sender: str, sync: Optional[int]) -> Message:
        """The map for a worker that said hello: its first part now, the rest
        streamed by ``pump``. Parts hold the map as it is now; every delta from
        now on goes to this worker too, after this part (the worker applies the
        deltas that arrive during the stream once it has the last part).

        A worker whose hello has no ``sync`` (before streamed snapshots) gets
        the whole map in one message."""
        if not self.workers[sender].replica:
            # no replica: the epoch and the end of the sync, and no entries
            body: Dict[str, Any] = {"entries": [], "epoch": self.epoch}
            if sync is not None:
                body.update(sync=sync, part=0, of=1)
            return Message("snapshot", body)
        if sync is None:
            return Message("snapshot", {"entries": self.registry.snapshot(), "epoch": self.epoch})
        entries = list(self.registry.conns.values())
        of = max(1, -(-len(entries) // self.snapshot_chunk))
        stream = _Stream(entries, sync, of, part=0)
        first = self._part(stream)
        if of > 1:
            self._streams[sender] = stream
        return first

    def _resolve_pending(self) -> Out:
        """Fire 'joined' (in one worker) for users that only pending connections
        brought in, now that every worker's table is in."""
        pending, self._pending = list(self._pending), {}
        by_user: Dict[Any, List[ConnEntry]] = {}
        for conn_id in pending:
            entry = self.registry.conns.get(conn_id)
            if entry is not None:
                by_user.setdefault(entry.cid, []).append(entry)
        first: Dict[str, List[str]] = {}
        for cid, entries in by_user.items():
            if cid not in self.announced:
                self.announced.add(cid)
                oldest = min(entries, key=ConnEntry.order)
                first.setdefault(oldest.worker, []).append(oldest.conn_id)
        conns: Dict[str, List[str]] = {}
        for entries in by_user.values():
            for e in entries:
                conns.setdefault(e.worker, []).append(e.conn_id)
        return [(w, Message("resolved", {"conns": ids, "first": first.get(w, [])}))
                for w, ids in conns.items()]

    def _on_hb(self, sender: str, body: Dict[str, Any], data: Any, now: float) -> Out:
        """A heartbeat; some carry the digest of the worker's table: a map
        that differs from it the same way twice in a row (not a join or
        leave in flight) is repaired from the worker's table."""
        digest = body.get("digest")
        info = self.workers.get(sender)
        if digest is None or info is None or not info.serves or sender in self._uploads:
            return []
        held = self.registry.entries_of_worker(sender)
        if digest[0] == len(held):
            info.mismatch = None
            return []
        mine = table_digest(e.conn_id for e in held)
        diff = (digest[0] - mine[0], digest[1] ^ mine[1])
        if info.mismatch != diff:
            info.mismatch = diff
            return []
        info.mismatch = None
        self.counters["map.repaired"] += 1
        _repairs.note("repair", "the map of worker %s differs from its table (%+d"
                      " connection(s)): asking for its table", sender, diff[0])
        return [(sender, Message("reset", {"repair": True}))]

    def _survivors(self) -> List[str]:
        """Workers that fire events for others: serving and not stopping."""
        return [w for w, i in self.workers.items() if i.serves and not i.stopping]

    def _on_stopping(self, sender: str, body: Dict[str, Any], data: Any, now: float) -> Out:
        info = self.workers.get(sender)
        if info is None:
            return []
        info.stopping = True
        others = bool(self._survivors())
        log.info("worker %s is stopping: its users' 'left' fires %s", sender,
                 "on the others" if others else "there (no other worker serves)")
        return [(sender, Message("stopping", {"others": others}))]

    def _on_bye(self, sender: str, body: Dict[str, Any], data: Any, now: float) -> Out:
        log.info("worker %s leaves the cluster", sender)
        return self.remove_worker(sender)

    def _held_elsewhere(self, conn_id: str, sender: str) -> bool:
        entry = self.registry.conns.get(conn_id)
        return entry is not None and entry.worker != sender

    def _on_join(self, sender: str, body: Dict[str, Any], data: Any, now: float) -> Out:
        if self.shard[1] > 1 and shard_of(body["cid"], self.shard[1]) != self.shard[0]:
            self._refuse(sender, "refused.shard", "user %r belongs to shard %d of %d",
                         str(body["cid"])[:32], shard_of(body["cid"], self.shard[1]),
                         self.shard[1], kind="join")
            return []
        if self._held_elsewhere(body["conn_id"], sender):
            self._refuse(sender, "refused.conn-taken", "connection %r is held by worker %r",
                         body["conn_id"][:32], self.registry.conns[body["conn_id"]].worker,
                         kind="join")
            return []
        limit = body.get("limit")
        res = self.registry.join(body["conn_id"], body["cid"], sender, body.get("meta"),
                                 limit, float(body.get("at", now)))
        entry = self.registry.conns[body["conn_id"]]
        if res.first:
            self.announced.add(entry.cid)
            info = self.workers.get(sender)
            if info is not None and len(info.unjoined) < UNJOINED_MAX:
                info.unjoined[entry.conn_id] = entry.cid
        answer = Message("joined", {"req": body["req"], "first": res.first,
                                    "evicted": [e.conn_id for e in res.evicted]})
        out: Out = []
        if res.first and self.lefts.waiting(entry.cid):
            # its 'left' has not started where it was sent: 'joined' after it
            self.lefts.hold(entry.cid, sender, answer, now)
        else:
            out.append((sender, answer))
        out += self._delta([entry.to_list()], [e.conn_id for e in res.evicted], skip=sender)
        out += self._drops(res.evicted, WSE_REASON.CLIENTS_CONCURRENCY, skip=sender)
        return out

    def _on_leave(self, sender: str, body: Dict[str, Any], data: Any, now: float) -> Out:
        """Every leave is answered ("left" with ``last``), so the worker can resend
        the unanswered ones after a broker restart."""
        conn_id = body["conn_id"]
        if self._held_elsewhere(conn_id, sender):
            self._refuse(sender, "refused.not-holder", "connection %r is held by worker %r",
                         conn_id[:32], self.registry.conns[conn_id].worker, kind="leave")
            return []
        res = self.registry.leave(conn_id)
        if body.get("quiet"):  # (closed before its welcome: no 'joined' will start)
            quiet_info = self.workers.get(sender)
            if quiet_info is not None:
                quiet_info.unjoined.pop(conn_id, None)
        out: Out = []
        self._pending.pop(conn_id, None)
        if res is not None:
            out += self._delta([], [conn_id], skip=sender)
            cid, meta = res.entry.cid, res.entry.meta
            # 'left' only for a user whose 'joined' fired
            last = res.last and cid in self.announced
            if res.last:
                self.announced.discard(cid)
        else:
            # Not in the map: evicted or dropped here (no 'left'), or known only
            # to a previous broker, whose map was rebuilt without it.
            cid, meta = body.get("cid"), body.get("meta")
            last = (body.get("epoch") not in (None, self.epoch) and not body.get("pending")
                    and cid not in self.registry.users)
        left = {"conn_id": conn_id, "last": bool(last) and not body.get("quiet"), "cid": cid,
                "code": body.get("code", 1005), "reason": body.get("reason", ""), "meta": meta}
        info = self.workers.get(sender)
        if (left["last"] and info is not None and info.stopping
                and conn_id not in info.unjoined):
            # a stopping worker may leave before it runs the event: a worker
            # that stays fires it (its 'joined' started, or it would not be due)
            survivors = self._survivors()
            if survivors:
                self._handed += 1
                target = survivors[self._handed % len(survivors)]
                handed = {k: v for k, v in left.items() if k != "conn_id"}
                handed["fire"] = conn_id
                self._expect_fired(target, handed)
                out.append((target, Message("left", handed)))
                left["last"] = False  # (the answer to the leave, not to be fired there)
        if left["last"]:
            left["fire"] = conn_id
            self._expect_fired(sender, left)
        out.append((sender, Message("left", left)))
        return out

    def _expect_fired(self, worker_id: str, left: Dict[str, Any]) -> None:
        """Remember a 'left' until the worker says it started it."""
        if worker_id in self.workers:
            self.lefts.expect(worker_id, left)

    def _on_fired(self, sender: str, body: Dict[str, Any], data: Any, now: float) -> Out:
        info = self.workers.get(sender)
        if info is not None:
            for conn_id in body.get("joined", ()):
                info.unjoined.pop(conn_id, None)
        return self.lefts.confirm(sender, body["ids"])

    def _on_send(self, sender: str, body: Dict[str, Any], data: Any, now: float) -> Out:
        cid = body["cid"]
        msg = Message("deliver", {"cid": cid}, data)
        return self._routed([(w, msg) for w in self.registry.workers_of(cid) if w != sender])

    def _on_bcast(self, sender: str, body: Dict[str, Any], data: Any, now: float) -> Out:
        msg = Message("deliver", {"all": True}, data)
        # a member without sockets (connect_cluster) has nobody to deliver to
        return self._routed([(w, msg) for w, i in self.workers.items()
                             if w != sender and i.serves])

    def _on_drop_cid(self, sender: str, body: Dict[str, Any], data: Any, now: float) -> Out:
        cid = body["cid"]
        msg = Message("drop", {"cid": cid, "reason": body.get("reason", "")})
        return self._routed([(w, msg) for w in self.registry.workers_of(cid) if w != sender])

    def _on_conn_send(self, sender: str, body: Dict[str, Any], data: Any, now: float) -> Out:
        entry = self.registry.conns.get(body["conn_id"])
        if entry is None:
            self.counters["dropped.unknown-conn"] += 1
            return []
        return self._routed([(entry.worker, Message("deliver", {"conn_id": entry.conn_id}, data))])

    def _on_conn_drop(self, sender: str, body: Dict[str, Any], data: Any, now: float) -> Out:
        entry = self.registry.conns.get(body["conn_id"])
        if entry is None:
            return []
        return self._routed([(entry.worker, Message("drop", {
            "conns": [entry.conn_id], "reason": body.get("reason", "")}))])

    def _on_call(self, sender: str, body: Dict[str, Any], data: Any, now: float) -> Out:
        entry = self.registry.conns.get(body["conn_id"])
        if entry is None or entry.worker not in self.workers:
            return [(sender, Message("result", {"call": body["call"], "ok": False, "value": {
                "code": WSE_ERROR.CONNECTION_NOT_READY,
                "details": {"conn_id": body["conn_id"]}}}))]
        fwd = dict(body, origin=sender)
        self._calls[(sender, body["call"])] = entry.worker
        return self._routed([(entry.worker, Message("call", fwd))])

    def _on_result(self, sender: str, body: Dict[str, Any], data: Any, now: float) -> Out:
        origin, call = body["origin"], body["call"]
        holder = self._calls.get((origin, call))
        if holder is None:
            # answered already, its origin or holder died, or routed by an earlier
            # broker: the caller times out (or has had RP_DISCONNECT)
            self.counters["dropped.unknown-call"] += 1
            log.debug("dropped a result from %r for call %r of %r: not on its way",
                      sender, call, origin)
            return []
        if holder != sender:
            self._refuse(sender, "refused.not-holder", "call %r of %r was routed to %r",
                         call, origin, holder, kind="result")
            return []
        del self._calls[(origin, call)]
        body = dict(body)
        del body["origin"]
        return self._routed([(origin, Message("result", body))])

    # -- helpers -------------------------------------------------------
    def _on_lookup(self, sender: str, body: Dict[str, Any], data: Any, now: float) -> Out:
        """Who is connected: ``cids`` (those of them that are), ``count`` (how
        many users), or ``all`` (every user, in parts of ``snapshot_chunk``)."""
        req = body["req"]
        if body.get("count"):
            return [(sender, Message("users", {"req": req, "count": len(self.registry.users)}))]
        if body.get("all"):
            listing = _Listing(list(self.registry.users), req,
                               max(1, -(-len(self.registry.users) // self.snapshot_chunk)))
            first = self._listing_part(listing)
            if listing.part < listing.of:
                self._listings[(sender, req)] = listing
            return [(sender, first)]
        users = self.registry.users
        found = [self._user_row(cid) for cid in body.get("cids", []) if cid in users]
        return [(sender, Message("users", {"req": req, "users": found}))]

    def _user_row(self, cid: Hashable) -> List[Any]:
        """[cid, [[conn_id, worker, meta], ...]] of a user in the map."""
        return [cid, [[e.conn_id, e.worker, e.meta] for e in self.registry.users[cid].values()]]

    def _listing_part(self, listing: _Listing) -> Message:
        n, i = self.snapshot_chunk, listing.part
        listing.part += 1
        users = self.registry.users
        rows = [self._user_row(cid) for cid in listing.cids[i * n:(i + 1) * n] if cid in users]
        if listing.part >= listing.of:
            listing.cids = []
        return Message("users", {"req": listing.req, "users": rows, "part": i, "of": listing.of})

    def _routed(self, out: Out) -> Out:
        self.counters["routed"] += len(out)
        return out

    def _delta(self, add: List[List[Any]], remove: List[str], skip: Optional[str] = None) -> Out:
        """The change to every replica (but ``skip``'s), in messages of at most
        ``snapshot_chunk`` added and 10 × that many removed connections."""
        out: Out = []
        n = self.snapshot_chunk
        targets = [w for w, info in self.workers.items() if w != skip and info.replica]
        while add or remove:
            msg = Message("delta", {"add": add[:n], "remove": remove[:10 * n]})
            add, remove = add[n:], remove[10 * n:]
            out += [(w, msg) for w in targets]
        return out

    def _drops(self, entries: List[ConnEntry], reason: str, skip: Optional[str] = None) -> Out:
        by_worker: Dict[str, List[str]] = {}
        for e in entries:
            by_worker.setdefault(e.worker, []).append(e.conn_id)
        return [(w, Message("drop", {"conns": ids, "reason": reason}))
                for w, ids in by_worker.items() if w != skip]
