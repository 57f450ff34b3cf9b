"""The authoritative map of connected users and its rules (pure code).

The broker owns one ``Registry``. Everything the cluster must agree on is
decided here: whether a join makes a user new, which connections a join
evicts (``conn_per_user``), whether a leave was the user's last, and what a
dead worker or a worker's resent table changes.

Rules:

- a user exists while they have at least one connection in the map;
- connections of a user are ordered by ``(joined_at, seq)``; a join that
  takes the user over ``limit`` evicts the oldest ones, which leave the map
  at once (their later LEAVE is ignored, so no ``left`` fires for them);
- a leave of an unknown connection changes nothing;
- a worker's table replaces everything the map held for that worker (it may
  come in parts: ``add_table`` for each, then ``leave`` for what is gone).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Hashable, Iterable, List, Optional, Tuple

__all__ = ["ConnEntry", "JoinOutcome", "LeaveOutcome", "Registry"]


@dataclass
class ConnEntry:
    conn_id: str
    cid: Hashable
    worker: str
    meta: Any = None
    joined_at: float = 0.0
    seq: int = 0

    def order(self) -> Tuple[float, int]:
        return (self.joined_at, self.seq)

    def to_list(self) -> List[Any]:
        return [self.conn_id, self.cid, self.worker, self.meta, self.joined_at]


@dataclass
class JoinOutcome:
    # the user had no connection before this one
    first: bool
    # connections removed to respect the limit, oldest first
    evicted: List[ConnEntry] = field(default_factory=list)


@dataclass
class LeaveOutcome:
    entry: ConnEntry
    # it was the user's last connection
    last: bool


class Registry:
    """cid -> {conn_id -> ConnEntry}, plus an index by conn_id and by worker."""

    def __init__(self) -> None:
        self.users: Dict[Hashable, Dict[str, ConnEntry]] = {}
        self.conns: Dict[str, ConnEntry] = {}
        self._by_worker: Dict[str, Dict[str, ConnEntry]] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self.users)

    def join(
        self, conn_id: str, cid: Hashable, worker: str, meta: Any = None,
        limit: Optional[int] = None, joined_at: float = 0.0,
    ) -> JoinOutcome:
        """Add a connection; evict the user's oldest ones beyond ``limit``."""
        if conn_id in self.conns:
            self._remove(self.conns[conn_id])
        self._seq += 1
        entry = ConnEntry(conn_id, cid, worker, meta, joined_at, self._seq)
        user = self.users.get(cid)
        first = user is None
        if user is None:
            user = self.users[cid] = {}
        user[conn_id] = entry
        self.conns[conn_id] = entry
        held = self._by_worker.get(worker)
        if held is None:
            held = self._by_worker[worker] = {}
        held[conn_id] = entry
        evicted: List[ConnEntry] = []
        if limit is not None and limit > 0 and len(user) > limit:
            others = sorted((e for e in user.values() if e is not entry), key=ConnEntry.order)
            evicted = others[: len(user) - limit]
            for old in evicted:
                self._remove(old)
        return JoinOutcome(first, evicted)

    def leave(self, conn_id: str) -> Optional[LeaveOutcome]:
        """Remove a connection; None when the map did not hold it."""
        entry = self.conns.get(conn_id)
        if entry is None:
            return None
        last = self._remove(entry)
        return LeaveOutcome(entry, last)

    def drop_worker(self, worker: str) -> List[LeaveOutcome]:
        """Remove every connection of ``worker`` (it died)."""
        outcomes: List[LeaveOutcome] = []
        for e in self.entries_of_worker(worker):
            outcome = self.leave(e.conn_id)
            if outcome is not None:  # always: the entry is in the map
                outcomes.append(outcome)
        return outcomes

    def sync_worker(
        self, worker: str, entries: Iterable[ConnEntry], limit: Optional[int] = None
    ) -> Tuple[List[Hashable], List[LeaveOutcome], List[ConnEntry]]:
        """Replace what the map holds for ``worker`` with its own table.

        Returns ``(new_users, gone, evicted)``: users that appeared, leaves of
        connections the worker no longer has, and connections over ``limit``
        that must now be closed (oldest first).
        """
        entries = list(entries)
        keep = {e.conn_id for e in entries}
        gone: List[LeaveOutcome] = []
        for e in self.entries_of_worker(worker):
            if e.conn_id not in keep:
                outcome = self.leave(e.conn_id)
                if outcome is not None:  # always: the entry is in the map
                    gone.append(outcome)
        new_users, evicted = self.add_table(worker, entries, limit)
        return new_users, gone, evicted

    def add_table(
        self, worker: str, entries: Iterable[ConnEntry], limit: Optional[int] = None
    ) -> Tuple[List[Hashable], List[ConnEntry]]:
        """Add (or refresh) part of ``worker``'s table; nothing is removed but
        connections over ``limit`` (oldest first), which are returned with the
        users that appeared."""
        new_users: List[Hashable] = []
        touched: Dict[Hashable, None] = {}
        for e in sorted(entries, key=ConnEntry.order):
            if e.cid not in self.users:
                new_users.append(e.cid)
            self.join(e.conn_id, e.cid, worker, e.meta, None, e.joined_at)
            touched[e.cid] = None
        evicted: List[ConnEntry] = []
        if limit is not None and limit > 0:
            for cid in touched:
                user = self.users.get(cid, {})
                if len(user) > limit:
                    ordered = sorted(user.values(), key=ConnEntry.order)
                    for old in ordered[: len(user) - limit]:
                        self._remove(old)
                        evicted.append(old)
        return new_users, evicted

    def entries_of_worker(self, worker: str) -> List[ConnEntry]:
        return list(self._by_worker.get(worker, {}).values())

    def count_of_worker(self, worker: str) -> int:
        return len(self._by_worker.get(worker, ()))

    def workers_of(self, cid: Hashable) -> List[str]:
        """Workers holding at least one connection of ``cid`` (stable order)."""
        user = self.users.get(cid)
        if not user:
            return []
        if len(user) == 1:
            return [e.worker for e in user.values()]
        return list(dict.fromkeys(e.worker for e in user.values()))

    def workers(self) -> List[str]:
        return [w for w, held in self._by_worker.items() if held]

    def snapshot(self) -> List[List[Any]]:
        """All entries as JSON-able lists, in join order."""
        return [e.to_list() for e in sorted(self.conns.values(), key=ConnEntry.order)]

    def _remove(self, entry: ConnEntry) -> bool:
        """Drop one entry; True when it was the user's last."""
        del self.conns[entry.conn_id]
        held = self._by_worker.get(entry.worker)
        if held is not None:
            held.pop(entry.conn_id, None)
            if not held:
                del self._by_worker[entry.worker]
        user = self.users.get(entry.cid)
        if user is None:
            return True
        user.pop(entry.conn_id, None)
        if not user:
            del self.users[entry.cid]
            return True
        return False
