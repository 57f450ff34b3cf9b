"""Which broker of a shard's pair is active (pure code): Binary Star with epochs.

Each shard may run two brokers, a *primary* and a *backup* (their configured
roles). At any time one should be ``ACTIVE`` (it serves the workers) and the
other ``PASSIVE`` (it keeps a copy of the map and refuses workers, sending
them to its peer). The brokers beat to each other every ``heartbeat``
seconds, saying their state and epoch; a peer not heard for ``peer_timeout``
is *silent*.

The rules (``TRANSITIONS``; the next state is set in one place, ``Pair._go``):

- **At start** the primary becomes active as soon as it hears its peer (or a
  worker asks it after the peer stayed silent for ``peer_timeout``); the
  backup waits for an active peer and becomes passive. A peer that is
  already active makes either one passive.
- **Failover needs a silent peer and a worker's request** (Binary Star's
  rule): a passive broker becomes active only when a worker asks it while its
  peer is silent. So when the two brokers lose each other but both still
  reach the workers, the workers stay with the active one (it answers them),
  nobody asks the passive, and exactly one stays active.
- **Epochs fence the past.** Every takeover starts a new epoch (one more than
  any the broker has seen, from its peer or from a worker). Brokers stamp
  what they send with their epoch and workers say the highest they have
  seen, so a broker that was active, then frozen or cut off, learns at the
  first word from its peer or from a worker that a later epoch exists: it
  stops serving and becomes passive (and copies the map again). Two active
  brokers that hear each other settle on the higher epoch; on equal epochs
  the primary stays.
- A passive broker whose peer restarts (heard ``STARTING``) takes over: it
  holds the copy, the restarted one holds nothing. Two passive brokers: the
  primary takes over.

``Pair`` only decides; the broker process carries the action out (serve,
refuse with a redirect, start or stop serving, copy the map).
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Tuple

__all__ = ["Pair", "Verdict", "TRANSITIONS", "PRIMARY", "BACKUP",
           "STARTING", "ACTIVE", "PASSIVE",
           "PEER_STARTING", "PEER_ACTIVE", "PEER_PASSIVE", "WORKER",
           "SERVE", "REFUSE", "TAKE_OVER", "STAND_DOWN", "NOTHING"]

# configured roles
PRIMARY, BACKUP = "primary", "backup"
# states
STARTING, ACTIVE, PASSIVE = "starting", "active", "passive"
# events: what the peer says it is, or a worker's request
PEER_STARTING, PEER_ACTIVE, PEER_PASSIVE = "peer-starting", "peer-active", "peer-passive"
WORKER = "worker"
_PEER_EVENTS = {STARTING: PEER_STARTING, ACTIVE: PEER_ACTIVE, PASSIVE: PEER_PASSIVE}

# actions for the broker process
SERVE = "serve"            # carry the worker's request out
REFUSE = "refuse"          # answer the worker: not here, the peer serves (and the epoch)
TAKE_OVER = "take-over"    # become active (a new epoch), then serve what asked
STAND_DOWN = "stand-down"  # stop serving, send the workers to the peer, copy its map
NOTHING = "nothing"


class Verdict(NamedTuple):
    """What the broker must do, and the epoch it now holds."""
    action: str
    epoch: int


class _Ctx(NamedTuple):
    """What a rule may look at (besides the broker's own state)."""
    epoch: int              # the epoch the event carries (the peer's, or the worker's)
    peer_silent: bool       # the peer has not been heard for peer_timeout
    primary: bool           # this broker's configured role is primary


# A rule gives (action, next state) from the context.
_Rule = Callable[[_Ctx, int], Tuple[str, str]]


def _fenced_or(rule: _Rule) -> _Rule:
    """An active broker that hears of a later epoch stands down first."""
    def fenced(ctx: _Ctx, mine: int) -> Tuple[str, str]:
        if ctx.epoch > mine:
            return STAND_DOWN, PASSIVE
        return rule(ctx, mine)
    return fenced


def _stay(state: str) -> _Rule:
    return lambda ctx, mine: (NOTHING, state)


def _starting_peer_starting(ctx: _Ctx, mine: int) -> Tuple[str, str]:
    return (TAKE_OVER, ACTIVE) if ctx.primary else (NOTHING, STARTING)


def _request_when_silent(state: str) -> _Rule:
    """A worker asks a broker that does not serve: it takes over only when
    its peer is silent; else the worker is sent to the peer."""
    def rule(ctx: _Ctx, mine: int) -> Tuple[str, str]:
        return (TAKE_OVER, ACTIVE) if ctx.peer_silent else (REFUSE, state)
    return rule


def _active_meets_active(ctx: _Ctx, mine: int) -> Tuple[str, str]:
    # (a later peer epoch was handled by _fenced_or) equal epochs: the primary stays
    if ctx.epoch == mine and not ctx.primary:
        return STAND_DOWN, PASSIVE
    return NOTHING, ACTIVE


def _active_serves(ctx: _Ctx, mine: int) -> Tuple[str, str]:
    return SERVE, ACTIVE


def _passive_meets_passive(ctx: _Ctx, mine: int) -> Tuple[str, str]:
    return (TAKE_OVER, ACTIVE) if ctx.primary else (NOTHING, PASSIVE)


TRANSITIONS: Dict[Tuple[str, str], _Rule] = {
    (STARTING, PEER_STARTING): _starting_peer_starting,
    (STARTING, PEER_ACTIVE): lambda ctx, mine: (NOTHING, PASSIVE),
    # (a passive peer takes over when it hears this one start: wait for it)
    (STARTING, PEER_PASSIVE): _stay(STARTING),
    (STARTING, WORKER): _request_when_silent(STARTING),
    (ACTIVE, PEER_STARTING): _fenced_or(_stay(ACTIVE)),
    (ACTIVE, PEER_ACTIVE): _fenced_or(_active_meets_active),
    (ACTIVE, PEER_PASSIVE): _fenced_or(_stay(ACTIVE)),
    (ACTIVE, WORKER): _fenced_or(_active_serves),
    (PASSIVE, PEER_STARTING): lambda ctx, mine: (TAKE_OVER, ACTIVE),
    (PASSIVE, PEER_ACTIVE): _stay(PASSIVE),
    (PASSIVE, PEER_PASSIVE): _passive_meets_passive,
    (PASSIVE, WORKER): _request_when_silent(PASSIVE),
}


class Pair:
    """One broker's view of its pair: its state, epoch and the peer's liveness.

    ``role`` is PRIMARY or BACKUP; ``now`` a monotonic clock reading. A lone
    broker (no peer configured) is not a Pair: it is always active.
    """

    def __init__(self, role: str, now: float, peer_timeout: float = 0.6,
                 epoch: int = 0) -> None:
        if role not in (PRIMARY, BACKUP):
            raise ValueError(f"role must be {PRIMARY!r} or {BACKUP!r}, not {role!r}")
        self.role = role
        self.state = STARTING
        self.epoch = epoch
        self.peer_timeout = peer_timeout
        # the peer counts as silent until first heard, peer_timeout after start
        self._peer_heard = now
        self.peer_state: Optional[str] = None
        self.takeovers = 0

    @property
    def serving(self) -> bool:
        return self.state == ACTIVE

    def peer_silent(self, now: float) -> bool:
        return now - self._peer_heard > self.peer_timeout

    def heard_peer(self, state: str, epoch: int, now: float) -> Verdict:
        """The peer's beat (or any message of it) said ``state`` and ``epoch``."""
        if state not in _PEER_EVENTS:
            raise ValueError(f"unknown peer state {state!r}")
        self._peer_heard = now
        self.peer_state = state
        return self._go(_PEER_EVENTS[state], epoch, now)

    def request(self, worker_epoch: int, now: float) -> Verdict:
        """A worker's message, saying the highest epoch it has seen."""
        return self._go(WORKER, worker_epoch, now)

    def _go(self, event: str, epoch: int, now: float) -> Verdict:
        ctx = _Ctx(epoch, self.peer_silent(now), self.role == PRIMARY)
        action, state = TRANSITIONS[(self.state, event)](ctx, self.epoch)
        if action == TAKE_OVER:
            self.epoch = max(self.epoch, epoch) + 1
            self.takeovers += 1
        elif action == STAND_DOWN or (event == PEER_ACTIVE and state == PASSIVE):
            self.epoch = max(self.epoch, epoch)  # (the term the peer serves)
        self.state = state
        return Verdict(action, self.epoch)
