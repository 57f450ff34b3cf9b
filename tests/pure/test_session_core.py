"""The wse session state machine, pure: messages and runtime events in, decisions out."""
import pytest

from wse_sync.core.session import (ACCEPTED, AWAIT_HI, CHALLENGE_ANSWER, CHALLENGED, CLOSED,
                                   DECIDING, DISPATCH, IGNORE, QUEST, READY, RESOLVE_CALL, RPC,
                                   START_AUTH, TRANSITIONS, VIOLATION, SessionCore)
from wse_sync.core.protocol import WseJSON

TYPES = WseJSON().internal_types
HI = ("~wse:hi", {"identity": "u", "meta": {}}, None)


def core_in(state_path=()):
    core = SessionCore(TYPES)
    for step in state_path:
        if isinstance(step, tuple):
            assert core.message(*step).action != VIOLATION
        else:
            assert core.fire(step)
    return core


def test_the_happy_path_without_challenge():
    core = SessionCore(TYPES)
    assert core.state == AWAIT_HI and core.authenticating
    assert core.message(*HI).action == START_AUTH
    assert core.state == DECIDING
    assert core.fire(ACCEPTED)
    assert core.state == READY and not core.authenticating
    assert core.message("chat", "hi", None).action == DISPATCH
    assert core.message("add", [1, 2], "abcdefghij").action == RPC
    assert core.message("~wse:response", 3, "abcdefghij").action == RESOLVE_CALL
    assert core.message("~wse:response-err", {}, "abcdefghij").action == RESOLVE_CALL
    # internal types without a stamp are plain messages after the welcome
    assert core.message("~wse:hi", {}, None).action == DISPATCH
    assert core.message("~wse:response", 1, None).action == DISPATCH
    core.close()
    assert core.state == CLOSED


def test_the_challenge_path():
    core = core_in([HI, QUEST])
    assert core.state == CHALLENGED
    decision = core.message("chat", 1, None)  # anything but the answer
    assert decision.action == VIOLATION and "CHALLENGED" in decision.reason
    assert core.message("~wse:challenge", "solution", None).action == CHALLENGE_ANSWER
    assert core.state == DECIDING
    assert core.fire(ACCEPTED) and core.state == READY


@pytest.mark.parametrize("message", [
    ("chat", 1, None), ("~wse:challenge", 1, None), ("rpc", 1, "abcdefghij"),
    ("~wse:response", 1, "abcdefghij")])
def test_before_hi_anything_else_is_a_violation(message):
    core = SessionCore(TYPES)
    assert core.message(*message).action == VIOLATION
    assert core.state == AWAIT_HI


def test_while_deciding_messages_are_ignored():
    core = core_in([HI])
    for message in (HI, ("chat", 1, None), ("rpc", 1, "abcdefghij")):
        assert core.message(*message).action == IGNORE
    assert core.state == DECIDING


@pytest.mark.parametrize("message, reason", [
    (("x", 1, 5), "stamp"), (("x", 1, ""), "stamp"), ((["x"], 1, None), "type must be a string"),
    ((None, 1, None), "needs a type"), (("", 1, None), "needs a type"),
    (("~wse:hi", "not a dict", None), "identity, meta"),
    (("~wse:hi", {"meta": [1]}, None), "identity, meta")])
def test_malformed_messages_are_violations_with_a_reason(message, reason):
    decision = SessionCore(TYPES).message(*message)
    assert decision.action == VIOLATION and reason in decision.reason


def test_a_runtime_event_out_of_place_is_refused():
    core = SessionCore(TYPES)
    assert not core.fire(ACCEPTED) and core.state == AWAIT_HI
    core = core_in([HI, ACCEPTED])
    assert not core.fire(QUEST) and core.state == READY


def test_custom_protocols_may_use_non_string_internal_types():
    types = dict(TYPES, hi=1, challenge=2, welcome=3, response=4, response_error=5)
    core = SessionCore(types)
    assert core.message(1, {"identity": "u"}, None).action == START_AUTH
    assert core.fire(ACCEPTED)
    assert core.message(4, "r", "abcdefghij").action == RESOLVE_CALL
    assert core.message(7, "x", None).action == VIOLATION  # not one of its own


def test_every_transition_lands_in_a_known_state():
    states = {AWAIT_HI, DECIDING, CHALLENGED, READY, CLOSED}
    for (state, _event), (_action, next_state) in TRANSITIONS.items():
        assert state in states and next_state in states
