"""socket.answers.Answers: waiting for an answer by stamp (what WseConnection.call,
WseClient.call and the broker link share)."""
import gevent
import pytest

from helpers import UNIT
from wse_sync import WSE_ERROR, WseError
from wse_sync.core.options import DEFAULT_RPC_TIMEOUT, OPTIONS
from wse_sync.socket.answers import CLOSED, ERR, OK, Answers, answer_error


def call_in_background(answers, rpc="proc", timeout=5 * UNIT, **kw):
    """A greenlet waiting for a fresh stamp's answer; (stamp, greenlet, what was sent)."""
    stamp = answers.new()
    sent = []
    g = gevent.spawn(answers.wait, stamp, rpc, lambda: sent.append(stamp), timeout, **kw)
    gevent.sleep(0)  # it registers and sends
    assert sent == [stamp] and stamp in answers
    return stamp, g


def test_a_resolved_call_returns_the_value():
    answers = Answers()
    stamp, g = call_in_background(answers)
    assert answers.resolve(stamp, True, {"v": 1})
    assert g.get(timeout=5 * UNIT) == {"v": 1}
    assert len(answers) == 0
    assert not answers.resolve(stamp, True, "twice")  # nobody waits any more
    assert not answers.resolve("unknown", True, 1)


def test_an_error_answer_raises_the_peers_code_and_details():
    answers = Answers()
    stamp, g = call_in_background(answers, "picky")
    answers.resolve(stamp, False, {"code": "app.bad", "details": {"field": "x"}})
    with pytest.raises(WseError) as info:
        g.get(timeout=5 * UNIT)
    assert (info.value.code, info.value.details, info.value.rpc) == (
        "app.bad", {"field": "x"}, "picky")
    # without details: None on the server, {} as the JS client
    assert answer_error("p", {"code": "c"}).details is None
    assert answer_error("p", {"code": "c"}, js_details=True).details == {}
    odd = answer_error("p", "not an error object")
    assert odd.code == WSE_ERROR.RP_EXECUTION_FAILED
    assert odd.details == {"rpc": "p", "error": "not an error object"}


def test_a_timeout_raises_rp_timeout_and_a_late_answer_is_ignored():
    answers = Answers()
    stamp = answers.new()
    with pytest.raises(WseError) as info:
        answers.wait(stamp, "slow", lambda: None, 0.05 * UNIT)
    assert info.value.code == WSE_ERROR.RP_TIMEOUT
    assert info.value.details == {"rpc": "slow", "timeout": 0.05 * UNIT}
    assert info.value.rpc == "slow"
    assert len(answers) == 0
    assert not answers.resolve(stamp, True, "late")  # dropped
    # the JS client's details: {}
    js = Answers(js_details=True)
    with pytest.raises(WseError) as info:
        js.wait(js.new(), "slow", lambda: None, 0.05 * UNIT)
    assert (info.value.code, info.value.details) == (WSE_ERROR.RP_TIMEOUT, {})


def test_grace_extends_the_wait_but_not_the_reported_timeout():
    answers = Answers()
    stamp = answers.new()
    gevent.spawn_later(0.1 * UNIT, answers.resolve, stamp, True, "in the grace")
    assert answers.wait(stamp, "far", lambda: None, 0.05 * UNIT,
                        grace=2 * UNIT) == "in the grace"
    with pytest.raises(WseError) as info:
        answers.wait(answers.new(), "far", lambda: None, 0.02 * UNIT, grace=0.03 * UNIT)
    assert info.value.details == {"rpc": "far", "timeout": 0.02 * UNIT}


def test_fail_all_ends_every_waiting_call_with_rp_disconnect():
    answers = Answers()
    (s1, g1), (_, g2) = call_in_background(answers, "a"), call_in_background(answers, "b")
    answers.fail_all(1001, "going away")
    for g, rpc in ((g1, "a"), (g2, "b")):
        with pytest.raises(WseError) as info:
            g.get(timeout=5 * UNIT)
        assert info.value.code == WSE_ERROR.RP_DISCONNECT
        assert info.value.details == {"rpc": rpc, "disconnected": [1001, "going away"]}
    assert len(answers) == 0
    assert not answers.resolve(s1, True, "after the close")
    js = Answers(js_details=True)
    _, g = call_in_background(js)
    js.fail_all(1000, "bye")
    with pytest.raises(WseError) as info:
        g.get(timeout=5 * UNIT)
    assert info.value.details == {"disconnected": [1000, "bye"]}


def test_an_answer_already_given_is_not_overwritten_by_fail_all():
    answers = Answers()
    stamp, g = call_in_background(answers)
    answers.resolve(stamp, True, "first")
    answers.fail_all(1006, "")
    assert g.get(timeout=5 * UNIT) == "first"


def test_get_gives_the_raw_answer_or_none_and_takes_any_hashable_stamp():
    answers = Answers()
    gevent.spawn_later(0.01 * UNIT, answers.resolve, 7, True, {"body": 1})
    assert answers.get(7, lambda: None, 5 * UNIT) == (OK, {"body": 1})
    gevent.spawn_later(0.01 * UNIT, answers.resolve, 8, False, "no")
    assert answers.get(8, lambda: None, 5 * UNIT) == (ERR, "no")
    gevent.spawn_later(0.01 * UNIT, answers.fail_all, 1000, "")
    assert answers.get(9, lambda: None, 5 * UNIT) == (CLOSED, (1000, ""))
    assert answers.get(10, lambda: None, 0.02 * UNIT) is None
    assert len(answers) == 0


def test_what_send_raises_goes_through_and_the_stamp_is_forgotten():
    answers = Answers()

    def send():
        raise TypeError("not JSON-able")

    with pytest.raises(TypeError):
        answers.wait(answers.new(), "p", send, 5 * UNIT)
    assert len(answers) == 0


def test_a_callers_own_gevent_timeout_is_not_taken_for_rp_timeout():
    answers = Answers()
    outer = gevent.Timeout(0.05 * UNIT)
    with pytest.raises(gevent.Timeout) as info:
        with outer:
            answers.wait(answers.new(), "p", lambda: None, 10 * UNIT)
    assert info.value is outer
    assert len(answers) == 0


def test_stamps_are_ten_characters_and_fresh():
    answers = Answers()
    stamps = {answers.new() for _ in range(1000)}
    assert len(stamps) == 1000 and all(len(s) == 10 for s in stamps)


def test_the_rpc_timeout_default_is_one_constant():
    from wse_sync import WseClient
    from wse_sync.core.config import Config
    assert Config().rpc_timeout == DEFAULT_RPC_TIMEOUT
    assert [o.default for o in OPTIONS if o.name == "rpc_timeout"] == [DEFAULT_RPC_TIMEOUT]
    assert WseClient("ws://127.0.0.1:1/").rpc_timeout == DEFAULT_RPC_TIMEOUT
