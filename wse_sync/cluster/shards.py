"""A worker joined to K broker shards: one BrokerLink per shard, one face.

``ShardedLink`` offers what ``BrokerLink`` offers, so the worker runtime does
not know how many brokers there are. What goes where (core.shards decides
who owns a user):

- a user's join, leave, ``send`` and ``drop_client``: the user's shard only;
  each shard is sent the part of this worker's table it owns;
- ``broadcast``: this worker's home shard (another one while it is away):
  every worker is joined to every shard, so one delivers to all;
- ``send``/``drop``/``call`` on another worker's connection: its user's shard;
- ``server.clients``: each shard is asked about its users, counts add up.

A shard that is away costs only its users: their joins are decided here and
their commands wait in its outbox until it is back, as with one broker.
"""
from __future__ import annotations

from collections import ChainMap
from typing import (Any, Callable, Dict, Hashable, Iterable, List, Mapping, Optional,
                    Sequence, Tuple)

import gevent

from ..core.errors import WseError
from ..core.link import LocalEntry
from ..core.shards import home_shard, merge_stats, merge_users, shard_of
from .curve import ClientKeys
from .link import BrokerLink, LocalPort

__all__ = ["ShardedLink"]


class _ShardPort:
    """The worker's port as one shard's link sees it: only that shard's users."""

    def __init__(self, port: LocalPort, index: int, count: int) -> None:
        self._port = port
        self._index = index
        self._count = count

    def entries(self) -> Iterable[LocalEntry]:
        index, count = self._index, self._count
        return [e for e in self._port.entries() if shard_of(e[1], count) == index]

    def user_count(self) -> int:
        """This worker's users that this shard owns."""
        return len({e[1] for e in self.entries()})

    # everything else is the worker's own
    def deliver(self, scope: str, key: Any, data: Any) -> None:
        self._port.deliver(scope, key, data)

    def drop(self, conn_ids: List[str], cid: Optional[Hashable], has_cid: bool,
             reason: str) -> None:
        self._port.drop(conn_ids, cid, has_cid, reason)

    def user_left(self, cid: Hashable, code: int, reason: str, meta: Any,
                  started: Optional[Callable[[], None]] = None) -> None:
        self._port.user_left(cid, code, reason, meta, started)

    def user_joined(self, cid: Hashable, meta: Any,
                    started: Optional[Callable[[], None]] = None) -> None:
        self._port.user_joined(cid, meta, started)

    def forget(self, cid: Hashable) -> None:
        self._port.forget(cid)

    def call_local(self, conn_id: str, rp: str, payload: Any, timeout: Optional[float]) -> Any:
        return self._port.call_local(conn_id, rp, payload, timeout)

    def error(self, error: WseError) -> None:
        self._port.error(error)

    def metrics_report(self) -> Dict[str, Any]:
        return self._port.metrics_report()


class _ShardedView:
    """The union of the shards' replicas (each holds other users)."""

    def __init__(self, links: List[BrokerLink]) -> None:
        self._links = links

    @property
    def users(self) -> Mapping[Hashable, Dict[str, Tuple[str, Any]]]:
        # (read anew each time: a link swaps in a new view with each snapshot)
        return ChainMap(*[link.view.users for link in self._links])

    def meta_of(self, cid: Hashable) -> Any:
        user = self.users.get(cid)
        return next(iter(user.values()))[1] if user else None


class ShardedLink:
    """Joins one worker runtime to every broker shard (``endpoints`` in shard
    order; ``curves``: each one's CURVE keys, or None)."""

    def __init__(self, port: LocalPort, worker_id: str, endpoints: List[str], ctx: Any,
                 curves: Sequence[Optional[ClientKeys]], **options: Any) -> None:
        count = len(endpoints)
        self._ports = [_ShardPort(port, i, count) for i in range(count)]
        self.links = [BrokerLink(self._ports[i], worker_id, endpoint, ctx, curve=curves[i],
                                 shard=(i, count), **options)
                      for i, endpoint in enumerate(endpoints)]
        self.endpoint = ",".join(endpoints)
        self._home = home_shard(worker_id, count)
        self.view = _ShardedView(self.links)

    def _of(self, cid: Hashable) -> BrokerLink:
        return self.links[shard_of(cid, len(self.links))]

    # -- life ------------------------------------------------------------
    def start(self) -> None:
        for link in self.links:
            link.start()

    def stop(self) -> None:
        for link in self.links:
            link.stop()

    # -- users -------------------------------------------------------------
    def join(self, conn_id: str, cid: Hashable, meta: Any, at: float,
             local: List[Tuple[str, float]], limit: Optional[int]) -> Tuple[bool, List[str]]:
        return self._of(cid).join(conn_id, cid, meta, at, local, limit)

    def leave(self, conn_id: str, cid: Hashable, meta: Any, code: int, reason: str,
              quiet: bool = False) -> None:
        self._of(cid).leave(conn_id, cid, meta, code, reason, quiet)

    def stopping(self) -> None:
        for link in self.links:
            link.stopping()

    @property
    def others_fire(self) -> bool:
        return all(link.others_fire for link in self.links)

    def joined_started(self, conn_id: str, cid: Hashable) -> None:
        self._of(cid).joined_started(conn_id, cid)

    def is_pending(self, conn_id: str) -> bool:
        return any(link.is_pending(conn_id) for link in self.links)

    def send_cid(self, cid: Hashable, data: Any) -> None:
        self._of(cid).send_cid(cid, data)

    def drop_cid(self, cid: Hashable, reason: str) -> None:
        self._of(cid).drop_cid(cid, reason)

    def broadcast(self, data: Any) -> None:
        home = self.links[self._home]
        if home.state != "up":
            home = next((link for link in self.links if link.state == "up"), home)
        home.broadcast(data)

    # -- another worker's connections (their user's shard holds them) -------
    def conn_send(self, conn_id: str, cid: Hashable, data: Any) -> None:
        self._of(cid).conn_send(conn_id, cid, data)

    def conn_drop(self, conn_id: str, cid: Hashable, reason: str) -> None:
        self._of(cid).conn_drop(conn_id, cid, reason)

    def call(self, conn_id: str, cid: Hashable, rp: str, payload: Any, timeout: float) -> Any:
        return self._of(cid).call(conn_id, cid, rp, payload, timeout)

    # -- the cluster ---------------------------------------------------------
    def _each(self, method: str, *args: Any) -> List[Any]:
        """``method(*args)`` of every shard's link at once: their answers (None: none)."""
        jobs = [gevent.spawn(_outcome, getattr(link, method), *args) for link in self.links]
        gevent.joinall(jobs)
        return [g.value[1] if g.value[0] else None for g in jobs]

    def stats(self, full: bool = True, timeout: Optional[float] = None) -> Optional[Dict[str, Any]]:
        answers = self._each("stats", full, timeout)
        if not full:
            return {} if any(a is not None for a in answers) else None
        return merge_stats(answers)

    def lookup(self, cids: Optional[List[Hashable]] = None, count: bool = False,
               timeout: Optional[float] = None) -> Optional[Dict[str, Any]]:
        if cids is None:
            answers = self._each("lookup", None, count, timeout)
            merged = merge_users(answers, count)
            if count and merged is not None and merged.get("partial"):
                # a shard that did not answer holds at least this worker's users of it
                merged["count"] += sum(self._ports[i].user_count()
                                       for i, a in enumerate(answers) if a is None)
            return merged
        by_shard: Dict[int, List[Hashable]] = {}
        for cid in cids:
            by_shard.setdefault(shard_of(cid, len(self.links)), []).append(cid)
        jobs = [gevent.spawn(_outcome, self.links[i].lookup, part, False, timeout)
                for i, part in by_shard.items()]
        gevent.joinall(jobs)
        return merge_users([g.value[1] if g.value[0] else None for g in jobs], False)

    @property
    def shard_states(self) -> List[str]:
        return [link.state for link in self.links]

    @property
    def state(self) -> str:
        """"up" (every shard in sync), "partial" (some are), or the shards'
        common state: "refused" if any refused, else "away" or "joining"."""
        states = self.shard_states
        if all(s == "up" for s in states):
            return "up"
        if "refused" in states:
            return "refused"
        if "up" in states:
            return "partial"
        return "away" if all(s == "away" for s in states) else "joining"

    @property
    def refused(self) -> Optional[str]:
        return next((link.refused for link in self.links if link.refused is not None), None)

    @property
    def rtt(self) -> Optional[float]:
        rtts = [link.rtt for link in self.links if link.rtt is not None]
        return max(rtts) if rtts else None

    @property
    def resent(self) -> int:
        return sum(link.resent for link in self.links)

    @property
    def synced(self) -> bool:
        return all(link.synced for link in self.links)

    @property
    def unconfirmed(self) -> int:
        return sum(link.unconfirmed for link in self.links)

    @property
    def unanswered_leaves(self) -> int:
        return sum(link.unanswered_leaves for link in self.links)


def _outcome(fn: Callable[..., Any], *args: Any) -> Tuple[bool, Any]:
    """(True, what ``fn`` returned) or (False, what it raised): a greenlet that
    raises would have gevent print its traceback."""
    try:
        return True, fn(*args)
    except Exception as exc:  # handed to the caller, who raises or ignores it
        return False, exc
