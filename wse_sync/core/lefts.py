"""'left' events on their way, for the broker (pure).

A worker told to fire a user's 'left' confirms once the event has started
(``fired``). Until then the broker keeps it, so that:

- when that worker goes (killed, or stopped before it ran its handlers), a
  surviving worker fires it instead (``drop_worker`` hands them back);
- a new connection of the same user, welcomed elsewhere meanwhile, has its
  'joined' wait until the 'left' has started (``hold``): the application sees
  'left' then 'joined', in this order, for one user, across workers. The wait
  is bounded (``hold_for``): a worker too slow to start an event does not hold
  a welcome longer than that.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Dict, Hashable, List, Tuple

from .messages import Message

__all__ = ["PendingLefts", "UNFIRED_MAX", "JOIN_HOLD"]

# unconfirmed 'left' events kept per worker; beyond it the oldest is forgotten
UNFIRED_MAX = 100000
# seconds a 'joined' answer waits at most for the user's unconfirmed 'left'
JOIN_HOLD = 2.0

Out = List[Tuple[str, Message]]


class PendingLefts:
    """Unconfirmed 'left' events by worker, and 'joined' answers held behind them."""

    def __init__(self, counters: "Counter[str]", hold_for: float = JOIN_HOLD,
                 max_per_worker: int = UNFIRED_MAX) -> None:
        self.counters = counters
        self.hold_for = hold_for
        self.max_per_worker = max_per_worker
        self._by_worker: Dict[str, Dict[str, Dict[str, Any]]] = {}
        self._per_user: Dict[Hashable, int] = {}
        self._held: Dict[Hashable, List[Tuple[float, str, Message]]] = {}

    def unfired_of(self, worker_id: str) -> Dict[str, Dict[str, Any]]:
        """fire id -> the 'left' body, for ``worker_id``."""
        return dict(self._by_worker.get(worker_id, {}))

    def waiting(self, cid: Hashable) -> bool:
        """A 'left' of ``cid`` has not started yet somewhere."""
        return cid in self._per_user

    def expect(self, worker_id: str, left: Dict[str, Any]) -> None:
        """``worker_id`` was told to fire ``left`` (with its ``fire`` id)."""
        mine = self._by_worker.setdefault(worker_id, {})
        if len(mine) >= self.max_per_worker:
            old = mine.pop(next(iter(mine)))
            self._less(old["cid"])
            self.counters["left.unconfirmed-forgotten"] += 1
        if left["fire"] in mine:
            self._less(mine[left["fire"]]["cid"])
        mine[left["fire"]] = left
        self._per_user[left["cid"]] = self._per_user.get(left["cid"], 0) + 1

    def confirm(self, worker_id: str, fire_ids: List[str]) -> Out:
        """The worker started these; returns the 'joined' answers they held."""
        mine = self._by_worker.get(worker_id)
        out: Out = []
        if mine is None:
            return out
        for fire_id in fire_ids:
            left = mine.pop(fire_id, None)
            if left is not None:
                out += self._less(left["cid"])
        return out

    def drop_worker(self, worker_id: str) -> Tuple[List[Dict[str, Any]], Out]:
        """The worker is gone: its unconfirmed 'left' events (for a survivor to
        fire), and the answers they held (its own held answers are dropped)."""
        mine = self._by_worker.pop(worker_id, {})
        for cid in list(self._held):
            kept = [h for h in self._held[cid] if h[1] != worker_id]
            if kept:
                self._held[cid] = kept
            else:
                del self._held[cid]
        out: Out = []
        for left in mine.values():
            out += self._less(left["cid"])
        return list(mine.values()), out

    def hold(self, cid: Hashable, worker_id: str, answer: Message, now: float) -> None:
        """Send ``answer`` to ``worker_id`` once ``cid``'s 'left' has started."""
        self._held.setdefault(cid, []).append((now, worker_id, answer))
        self.counters["joined.held"] += 1

    def expired(self, now: float) -> Out:
        """Held answers past ``hold_for``: they go now."""
        out: Out = []
        for cid in list(self._held):
            held = self._held[cid]
            due = [h for h in held if now - h[0] >= self.hold_for]
            if not due:
                continue
            self.counters["joined.hold-expired"] += len(due)
            out += [(w, m) for _t, w, m in due]
            rest = [h for h in held if now - h[0] < self.hold_for]
            if rest:
                self._held[cid] = rest
            else:
                del self._held[cid]
        return out

    def _less(self, cid: Hashable) -> Out:
        n = self._per_user.get(cid, 0) - 1
        if n > 0:
            self._per_user[cid] = n
            return []
        self._per_user.pop(cid, None)
        return [(w, m) for _t, w, m in self._held.pop(cid, [])]
