"""Who is connected in the whole cluster: what ``server.clients`` reads.

Two ways, chosen by the ``cluster_replica`` option:

- **lookup** (the default): a worker holds only its own connections and asks
  the broker about anyone else. ``cid in server.clients`` and
  ``server.clients[cid]`` for a user with no connection here are a round trip
  to the broker, unless the same user was asked about in the last
  ``clients_cache`` seconds; ``len()`` is a round trip (cached the same way);
  iterating asks for every user (in parts: a long round trip in a big
  cluster). Without the broker, only this worker's users are seen.
- **replica**: the worker keeps a copy of the broker's map (a snapshot, then
  deltas) and answers from memory, about 450 bytes per user of the cluster.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Dict, Hashable, List, Optional, Union

from ..core.lookup import Conns, LookupCache

if TYPE_CHECKING:  # pragma: no cover
    from ..cluster.link import BrokerLink
    from ..cluster.shards import ShardedLink

__all__ = ["Directory"]

log = logging.getLogger("wse_sync.directory")


class Directory:
    """The cluster's users as the broker knows them (this worker's included)."""

    def __init__(self, link: Union["BrokerLink", "ShardedLink"], replica: bool,
                 cache_ttl: float = 1.0) -> None:
        self.link = link
        self.replica = replica
        self.cache = LookupCache(cache_ttl)
        self._warned = False

    def connections(self, cid: Hashable) -> Conns:
        """conn_id -> (worker, meta) of the user's connections ({}: not connected)."""
        if self.replica:
            return self.link.view.users.get(cid, {})
        now = time.monotonic()
        conns = self.cache.get(cid, now)
        if conns is None:
            answer = self._ask(cids=[cid])
            if answer is None:
                return {}
            self.cache.put([cid], answer.get("users", []), now)
            conns = self.cache.get(cid, now) or {}
        return conns

    def has(self, cid: Hashable) -> bool:
        if self.replica:
            return cid in self.link.view.users
        return bool(self.connections(cid))

    def meta_of(self, cid: Hashable) -> Any:
        if self.replica:
            return self.link.view.meta_of(cid)
        conns = self.connections(cid)
        return next(iter(conns.values()))[1] if conns else None

    def cids(self) -> List[Hashable]:
        """Every user (a round trip without a replica; [] without the broker)."""
        if self.replica:
            return list(self.link.view.users)
        answer = self._ask()
        if answer is None:
            return []
        rows = answer.get("users", [])
        if len(rows) <= self.cache.size:
            self.cache.put([row[0] for row in rows], rows, time.monotonic())
        return [row[0] for row in rows]

    def users(self) -> Dict[Hashable, Conns]:
        """cid -> its connections, for every user."""
        if self.replica:
            return {cid: dict(conns) for cid, conns in self.link.view.users.items()}
        answer = self._ask()
        rows = answer.get("users", []) if answer is not None else []
        return {row[0]: {c[0]: (c[1], c[2]) for c in row[1]} for row in rows}

    def count(self) -> Optional[int]:
        """How many users (None: the broker did not answer)."""
        if self.replica:
            return len(self.link.view.users)
        now = time.monotonic()
        count = self.cache.count(now)
        if count is None:
            answer = self._ask(count=True)
            if answer is None:
                return None
            count = int(answer.get("count", 0))
            self.cache.put_count(count, now)
        return count

    def changed(self, cid: Hashable) -> None:
        """A connection of ``cid`` came or went here: drop what was cached."""
        if not self.replica:
            self.cache.forget(cid)

    def _ask(self, cids: Optional[List[Hashable]] = None,
             count: bool = False) -> Optional[Dict[str, Any]]:
        answer = self.link.lookup(cids, count)
        if answer is None and not self._warned:
            self._warned = True
            log.warning("server.clients: the broker did not answer a lookup; only this"
                        " worker's users are seen until it does (logged once)")
        elif answer is not None:
            self._warned = False
        return answer
