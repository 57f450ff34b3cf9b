"""What a client message means, and when: one connection's wse state machine (pure).

Everything that affects the state lives here. ``TRANSITIONS`` maps
(state, event) to (action, next state); the next state is set in one place,
``SessionCore._go``. Events are the kinds of well-formed client messages
(``HI``, ``CHALLENGE``, ``RESPONSE``, ``CALL``, ``CHANNEL``) and what the
runtime reports (``QUEST`` sent, ``ACCEPTED`` welcome sent, ``CLOSED``).
Handlers, greenlets and sockets stay in the runtime (``wse_sync.socket.session``),
which carries the returned action out.

States: ``AWAIT_HI`` -> (hi) -> ``DECIDING`` (challenge generator or identify
running) <-> ``CHALLENGED`` (quest sent, answer awaited) -> ``READY``
(welcome sent) -> ``CLOSED``.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple, Union

__all__ = [
    "SessionCore", "Decision", "TRANSITIONS",
    "AWAIT_HI", "DECIDING", "CHALLENGED", "READY", "CLOSED",
    "HI", "CHALLENGE", "RESPONSE", "CALL", "CHANNEL", "QUEST", "ACCEPTED",
    "START_AUTH", "CHALLENGE_ANSWER", "RESOLVE_CALL", "RPC", "DISPATCH", "IGNORE", "VIOLATION",
]

# states (plain strings: they are dict keys on the hot path)
AWAIT_HI, DECIDING, CHALLENGED, READY, CLOSED = (
    "AWAIT_HI", "DECIDING", "CHALLENGED", "READY", "CLOSED")

# events: kinds of a well-formed client message ...
HI, CHALLENGE, RESPONSE, CALL, CHANNEL = "hi", "challenge", "response", "call", "channel"
# ... and what the runtime did
QUEST, ACCEPTED = "quest", "accepted"
_MESSAGES = (HI, CHALLENGE, RESPONSE, CALL, CHANNEL)

# actions for the runtime
START_AUTH = "start_auth"              # run the challenge generator / identify
CHALLENGE_ANSWER = "challenge_answer"  # hand the payload to the waiting generator
RESOLVE_CALL = "resolve_call"          # an answer to a server -> client call
RPC = "rpc"                            # run the procedure, answer with the stamp
DISPATCH = "channel"                   # a channel message for its handlers
IGNORE = "ignore"
VIOLATION = "violation"                # error event + close 1000 wse.protocol-error

TRANSITIONS: Dict[Tuple[str, str], Tuple[Optional[str], str]] = {
    (AWAIT_HI, HI): (START_AUTH, DECIDING),
    # while identify (or the generator) decides, client messages are ignored
    **{(DECIDING, k): (IGNORE, DECIDING) for k in _MESSAGES},
    (DECIDING, QUEST): (None, CHALLENGED),
    (DECIDING, ACCEPTED): (None, READY),
    # once challenged, anything but the answer is a protocol error (as in the reference)
    (CHALLENGED, CHALLENGE): (CHALLENGE_ANSWER, DECIDING),
    (READY, RESPONSE): (RESOLVE_CALL, READY),
    (READY, CALL): (RPC, READY),
    (READY, CHANNEL): (DISPATCH, READY),
    # after the welcome, internal types without a stamp are plain messages
    (READY, HI): (DISPATCH, READY),
    (READY, CHALLENGE): (DISPATCH, READY),
}


class Decision(NamedTuple):
    """What to do with one client message: an action, and why when it is VIOLATION."""

    action: str
    reason: str = ""


_IGNORE = Decision(IGNORE)
_DECISIONS = {action: Decision(action) for action in
              (START_AUTH, CHALLENGE_ANSWER, RESOLVE_CALL, RPC, DISPATCH, IGNORE)}


class SessionCore:
    """The state of one connection's wse session.

    ``internal_types`` is the protocol's mapping (``hi``, ``challenge``,
    ``response``, ``response_error``, ...); a custom protocol may use
    non-string values for them.
    """

    __slots__ = ("state", "_hi", "_challenge", "_response", "_response_err", "_own")

    def __init__(self, internal_types: Mapping[str, Any]) -> None:
        self.state = AWAIT_HI
        self._hi = internal_types["hi"]
        self._challenge = internal_types["challenge"]
        self._response = internal_types["response"]
        self._response_err = internal_types["response_error"]
        self._own = frozenset(v for v in internal_types.values() if not isinstance(v, str))

    @property
    def authenticating(self) -> bool:
        """True until the welcome (the auth deadlines apply)."""
        return self.state in (AWAIT_HI, DECIDING, CHALLENGED)

    def message(self, type_: Any, payload: Any, stamp: Any) -> Decision:
        """Decide what the unpacked message ``[type_, payload, stamp]`` means now."""
        kind = self._classify(type_, stamp)
        if isinstance(kind, Decision):
            return kind
        rule = TRANSITIONS.get((self.state, kind))
        if rule is None:
            return Decision(VIOLATION, f"{type_!r} is not allowed in state {self.state}")
        action, next_state = rule
        if action == START_AUTH and not _valid_hi(payload):
            return Decision(VIOLATION, "~wse:hi payload must be {identity, meta}")
        self._go(next_state)
        return _DECISIONS[action] if action is not None else _IGNORE

    def fire(self, event: str) -> bool:
        """The runtime did ``event`` (QUEST, ACCEPTED); False when not allowed now."""
        rule = TRANSITIONS.get((self.state, event))
        if rule is None:
            return False
        self._go(rule[1])
        return True

    def close(self) -> None:
        """The connection is over (from any state)."""
        self._go(CLOSED)

    def _go(self, state: str) -> None:
        self.state = state

    def _classify(self, type_: Any, stamp: Any) -> Union[str, Decision]:
        if stamp is not None and (stamp.__class__ is not str or not stamp):
            return Decision(VIOLATION, "the stamp must be null or a non-empty string")
        if type_.__class__ is not str and type_ is not None and not self._is_own(type_):
            return Decision(VIOLATION, "the type must be a string")
        if not type_:
            return Decision(VIOLATION, "a message needs a type")
        if type_ == self._response or type_ == self._response_err:
            return RESPONSE if stamp is not None else CHANNEL
        if stamp is not None:
            return CALL
        if type_ == self._hi:
            return HI
        if type_ == self._challenge:
            return CHALLENGE
        return CHANNEL

    def _is_own(self, type_: Any) -> bool:
        try:
            return type_ in self._own
        except TypeError:  # unhashable
            return False


def _valid_hi(payload: Any) -> bool:
    return isinstance(payload, dict) and isinstance(payload.get("meta", {}), (dict, type(None)))
