"""The active broker's journal and its passive peer's copy (pure code): the
Clone pattern's sequenced updates after a snapshot.

The active broker numbers every input its core takes (one member's batch of
messages, a tick) in a ``Journal`` and sends each record to its passive
peer, which feeds them in order to a core of its own and drops that core's
outputs: ``BrokerCore`` is deterministic (time comes in as an argument, its
incarnation epoch with the snapshot), so the same inputs in the same order
make the same map, acks and pending calls.

A passive broker that starts, or that cannot continue (a record missing and
no longer kept), asks for a snapshot: the active core's state as of a seq,
then every record after it. ``Copy`` says where the passive stands and what
it must ask for; the records themselves are opaque here.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Deque, List, NamedTuple, Optional, Tuple

__all__ = ["Journal", "Copy", "Offer", "APPLY", "SKIP", "RESEND", "SNAPSHOT"]

# what the passive does with a record it is offered
APPLY = "apply"        # the next one: feed it to the copy
SKIP = "skip"          # had it already (a resend, or older than the snapshot)
RESEND = "resend"      # one is missing: ask the active for the records from ``since``
SNAPSHOT = "snapshot"  # no copy yet: ask for a snapshot


class Offer(NamedTuple):
    action: str
    since: int = 0     # for RESEND: the first seq wanted


class Journal:
    """The active side: records numbered from 1, the last ``keep`` of them
    kept for a peer that asks again, and how far the peer has confirmed."""

    def __init__(self, keep: int = 100000) -> None:
        self.keep = keep
        self.seq = 0
        self.confirmed = 0
        self._log: Deque[Tuple[int, Any]] = deque()

    def record(self, entry: Any) -> int:
        """Number ``entry`` (the next seq) and keep it."""
        self.seq += 1
        self._log.append((self.seq, entry))
        if len(self._log) > self.keep:
            self._log.popleft()
        return self.seq

    def since(self, seq: int) -> Optional[List[Tuple[int, Any]]]:
        """The records from ``seq`` on; None when some of them are no longer
        kept (the peer needs a snapshot)."""
        if seq > self.seq:
            return []
        if not self._log or self._log[0][0] > seq:
            return None
        first = self._log[0][0]
        return list(self._log)[seq - first:]

    def confirm(self, seq: int) -> None:
        """The peer has applied every record up to ``seq``."""
        self.confirmed = max(self.confirmed, min(seq, self.seq))

    @property
    def behind(self) -> int:
        """Records the peer has not confirmed."""
        return self.seq - self.confirmed


class Copy:
    """The passive side: the seq its copy stands at (None: no copy)."""

    def __init__(self) -> None:
        self.seq: Optional[int] = None
        # the resend asked for and not yet answered (asked once per gap)
        self._asked: Optional[int] = None

    @property
    def live(self) -> bool:
        return self.seq is not None

    def installed(self, seq: int) -> None:
        """A snapshot as of ``seq`` replaced the copy."""
        self.seq = seq
        self._asked = None

    def lost(self) -> None:
        """The copy can no longer follow (the active has no records that old,
        or it changed): a snapshot is needed."""
        self.seq = None
        self._asked = None

    def stalled(self) -> None:
        """The resend asked for did not come in time: the next record asks again."""
        self._asked = None

    def offer(self, seq: int) -> Offer:
        """Record ``seq`` arrived: what to do with it. APPLY means the caller
        applies it, then the copy stands at ``seq``."""
        if self.seq is None:
            return Offer(SNAPSHOT)
        if seq <= self.seq:
            return Offer(SKIP)
        if seq == self.seq + 1:
            self.seq = seq
            self._asked = None
            return Offer(APPLY)
        if self._asked == self.seq + 1:
            return Offer(SKIP)  # (asked already: the resend will come in order)
        self._asked = self.seq + 1
        return Offer(RESEND, self.seq + 1)
