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
from typing import TYPE_CHECKING, Any, Collection, Dict, Hashable, List, Optional, Union

from ..core.errors import WSE_ERROR, WseError
from ..core.lookup import Conns, LookupCache

if TYPE_CHECKING:  # pragma: no cover
    from ..cluster.link import BrokerLink
    from ..cluster.shards import ShardedLink

__all__ = ["Directory", "ReplicaDirectory", "LookupDirectory", "make_directory"]

log = logging.getLogger("wse_sync.directory")

Link = Union["BrokerLink", "ShardedLink"]


class Directory:
    """The cluster's users as the broker knows them (this worker's included)."""

    def connections(self, cid: Hashable) -> Conns:
        """conn_id -> (worker, meta) of the user's connections ({}: not connected)."""
        raise NotImplementedError

    def has(self, cid: Hashable) -> bool:
        return bool(self.connections(cid))

    def meta_of(self, cid: Hashable, ask: bool = True) -> Any:
        """The user's meta (None: unknown); ``ask=False``: only what is at hand."""
        raise NotImplementedError

    def cids(self) -> List[Hashable]:
        """Every user ([] when the broker does not answer)."""
        raise NotImplementedError

    def users(self) -> Dict[Hashable, Conns]:
        """cid -> its connections, for every user."""
        raise NotImplementedError

    def count(self, local: Collection[Hashable]) -> int:
        """How many users the cluster has; ``local``: this worker's users."""
        raise NotImplementedError

    def follows(self, cid: Hashable) -> bool:
        """True when this directory will see ``cid`` leave the cluster (the
        worker may keep the user's identity until then)."""
        return False

    def changed(self, cid: Hashable) -> None:
        """A connection of ``cid`` came or went here."""


class ReplicaDirectory(Directory):
    """Answers from the link's copy of the broker's map (``cluster_replica``)."""

    def __init__(self, link: Link) -> None:
        self.link = link

    def connections(self, cid: Hashable) -> Conns:
        return self.link.view.users.get(cid, {})

    def has(self, cid: Hashable) -> bool:
        return cid in self.link.view.users

    def meta_of(self, cid: Hashable, ask: bool = True) -> Any:
        return self.link.view.meta_of(cid)

    def cids(self) -> List[Hashable]:
        return list(self.link.view.users)

    def users(self) -> Dict[Hashable, Conns]:
        return {cid: dict(conns) for cid, conns in self.link.view.users.items()}

    def count(self, local: Collection[Hashable]) -> int:
        users = self.link.view.users
        return len(users) + sum(1 for cid in local if cid not in users)

    def follows(self, cid: Hashable) -> bool:
        return cid in self.link.view.users


class LookupDirectory(Directory):
    """Asks the broker, with answers reused for ``cache_ttl`` seconds."""

    def __init__(self, link: Link, cache_ttl: float = 1.0) -> None:
        self.link = link
        self.cache = LookupCache(cache_ttl)
        self._warned = False

    def connections(self, cid: Hashable) -> Conns:
        now = time.monotonic()
        conns = self.cache.get(cid, now)
        if conns is None:
            answer = self._ask(cids=[cid])
            if answer is None:
                return {}
            self.cache.put([cid], answer.get("users", []), now)
            conns = self.cache.get(cid, now) or {}
        return conns

    def meta_of(self, cid: Hashable, ask: bool = True) -> Any:
        if not ask:
            return None
        conns = self.connections(cid)
        return next(iter(conns.values()))[1] if conns else None

    def cids(self) -> List[Hashable]:
        answer = self._ask()
        if answer is None:
            return []
        rows = answer.get("users", [])
        if len(rows) <= self.cache.size:
            self.cache.put([row[0] for row in rows], rows, time.monotonic())
        return [row[0] for row in rows]

    def users(self) -> Dict[Hashable, Conns]:
        answer = self._ask()
        rows = answer.get("users", []) if answer is not None else []
        return {row[0]: {c[0]: (c[1], c[2]) for c in row[1]} for row in rows}

    def count(self, local: Collection[Hashable]) -> int:
        now = time.monotonic()
        count = self.cache.count(now)
        if count is None:
            answer = self._ask(count=True)
            if answer is None:
                return len(local)
            count = int(answer.get("count", 0))
            self.cache.put_count(count, now)
        return max(len(local), count)

    def changed(self, cid: Hashable) -> None:
        self.cache.forget(cid)

    def _ask(self, cids: Optional[List[Hashable]] = None,
             count: bool = False) -> Optional[Dict[str, Any]]:
        answer = self.link.lookup(cids, count)
        if answer is not None and "refused" in answer:  # (this key's role: not a worker's)
            raise WseError(WSE_ERROR.NOT_ALLOWED, {"reason": answer["refused"]})
        if answer is None and not self._warned:
            self._warned = True
            log.warning("server.clients: the broker did not answer a lookup; only this"
                        " worker's users are seen until it does (logged once)")
        elif answer is not None:
            self._warned = False
        return answer


def make_directory(link: Link, replica: bool, cache_ttl: float) -> Directory:
    """The directory the ``cluster_replica`` option asks for."""
    return ReplicaDirectory(link) if replica else LookupDirectory(link, cache_ttl)
