"""The broker's answers about users, kept for a short while (pure code).

A worker without a replica of the map asks the broker who is connected
(``lookup``); ``LookupCache`` keeps each answer, a "no such user" too, for
``ttl`` seconds, for at most ``size`` users (the oldest answers go first).
"""
from __future__ import annotations

from typing import Any, Dict, Hashable, Iterable, List, Optional, Tuple

__all__ = ["LookupCache", "Conns"]

# conn_id -> (worker, meta) of one user
Conns = Dict[str, Tuple[str, Any]]


class LookupCache:
    def __init__(self, ttl: float = 1.0, size: int = 10000) -> None:
        self.ttl = ttl
        self.size = max(1, size)
        self._users: Dict[Hashable, Tuple[float, Conns]] = {}
        self._count: Optional[Tuple[float, int]] = None

    def __len__(self) -> int:
        return len(self._users)

    def get(self, cid: Hashable, now: float) -> Optional[Conns]:
        """The user's connections as last answered ({} for none), or None when
        the answer is older than ``ttl`` (or there is none): ask."""
        hit = self._users.get(cid)
        if hit is None or now - hit[0] >= self.ttl:
            return None
        return hit[1]

    def put(self, asked: Iterable[Hashable], rows: List[List[Any]], now: float) -> None:
        """Keep the answer to a lookup of ``asked``: ``rows`` are
        [cid, [[conn_id, worker, meta], ...]] of those that are connected."""
        found = {row[0]: {c[0]: (c[1], c[2]) for c in row[1]} for row in rows}
        for cid in asked:
            self._users.pop(cid, None)
            self._users[cid] = (now, found.get(cid, {}))
        while len(self._users) > self.size:
            del self._users[next(iter(self._users))]

    def forget(self, cid: Hashable) -> None:
        """This worker saw the user change (its own connection came or went)."""
        self._users.pop(cid, None)
        self._count = None

    def count(self, now: float) -> Optional[int]:
        if self._count is None or now - self._count[0] >= self.ttl:
            return None
        return self._count[1]

    def put_count(self, count: int, now: float) -> None:
        self._count = (now, count)
