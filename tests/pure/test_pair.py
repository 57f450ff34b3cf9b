"""core.pair: which broker of a pair is active, in memory (no sockets).

Two Pair objects stand for the two brokers of a shard; tests deliver their
beats to each other (or not: a kill, a freeze, a partition) and worker
requests to either, with a clock they set."""
import pytest

from wse_sync.core.pair import (ACTIVE, BACKUP, NOTHING, PASSIVE, PRIMARY, REFUSE, SERVE,
                                STAND_DOWN, STARTING, TAKE_OVER, TRANSITIONS, WORKER, Pair,
                                PEER_ACTIVE, PEER_PASSIVE, PEER_STARTING)

T = 0.6  # peer_timeout


def beat(src: Pair, dst: Pair, now: float):
    """``dst`` hears ``src``'s beat."""
    return dst.heard_peer(src.state, src.epoch, now)


def exchange(a: Pair, b: Pair, now: float) -> None:
    beat(a, b, now)
    beat(b, a, now)


def started():
    p, b = Pair(PRIMARY, 0.0, T), Pair(BACKUP, 0.0, T)
    exchange(p, b, 0.1)   # the primary hears a starting backup: it takes the first epoch
    exchange(p, b, 0.2)   # the backup hears an active primary: passive
    assert (p.state, p.epoch, b.state, b.epoch) == (ACTIVE, 1, PASSIVE, 1)
    return p, b


def test_every_state_answers_every_event():
    assert set(TRANSITIONS) == {(s, e) for s in (STARTING, ACTIVE, PASSIVE)
                                for e in (PEER_STARTING, PEER_ACTIVE, PEER_PASSIVE, WORKER)}
    with pytest.raises(ValueError):
        Pair("leader", 0.0)


def test_the_primary_becomes_active_and_the_backup_passive_at_start():
    p, b = started()
    assert p.request(0, 0.3) == (SERVE, 1)          # a new worker (epoch 0) is served
    assert b.request(1, 0.3) == (REFUSE, 1)         # the passive sends it to its peer
    # a backup that starts alone waits; workers asking it are sent away until the
    # primary has been silent for the timeout, then it serves
    lone = Pair(BACKUP, 10.0, T)
    assert lone.request(0, 10.2).action == REFUSE and lone.state == STARTING
    assert lone.request(0, 10.7) == (TAKE_OVER, 1) and lone.serving


def test_failover_needs_a_silent_peer_and_a_worker_request():
    p, b = started()
    exchange(p, b, 1.0)
    # the primary dies (kill -9: no more beats). Silence alone changes nothing ...
    assert b.state == PASSIVE and b.peer_silent(1.7)
    # ... a worker asking before the timeout is sent back, after it the backup takes over
    assert b.request(1, 1.5) == (REFUSE, 1)
    assert b.request(1, 1.7) == (TAKE_OVER, 2) and b.serving and b.takeovers == 1
    assert b.request(2, 1.8) == (SERVE, 2)


def test_a_frozen_or_cut_off_active_is_fenced_by_the_next_epoch():
    p, b = started()
    exchange(p, b, 1.0)
    b.request(1, 1.7)                 # SIGSTOP on the primary: the backup took over (epoch 2)
    # the primary wakes up still "active" at epoch 1: the first word it hears of epoch 2
    # makes it stand down, whether from a worker ...
    assert p.request(2, 5.0) == (STAND_DOWN, 2) and p.state == PASSIVE
    # ... or from its peer
    p2, b2 = started()
    exchange(p2, b2, 1.0)
    b2.request(1, 1.7)
    assert beat(b2, p2, 5.0) == (STAND_DOWN, 2) and p2.state == PASSIVE
    # a worker still on epoch 1 that reaches the old primary is refused, not served
    assert p2.request(1, 5.1) == (REFUSE, 2)
    # and the new active, hearing its peer passive, stays
    assert beat(p2, b2, 5.2).action == NOTHING and b2.serving


def test_a_partition_of_the_pair_leaves_exactly_one_active():
    p, b = started()
    now = 1.0
    exchange(p, b, now)
    # the two cannot hear each other; every worker still reaches both and stays with the
    # one that answers it (the active): nobody asks the passive, which stays passive
    for _ in range(20):
        now += 0.5
        assert p.request(1, now) == (SERVE, 1)
    assert b.peer_silent(now) and b.state == PASSIVE and p.serving
    # a worker that lost its own way to the active asks the passive: it takes over
    # (epoch 2); when the pair hears each other again, the old active stands down
    assert b.request(1, now) == (TAKE_OVER, 2)
    assert beat(b, p, now + 1) == (STAND_DOWN, 2)
    assert (p.state, b.state) == (PASSIVE, ACTIVE)


def test_two_brokers_that_started_apart_settle_on_one():
    p, b = Pair(PRIMARY, 0.0, T), Pair(BACKUP, 0.0, T)
    # the pair link is down from the start; workers reach both after the timeout
    assert p.request(0, 1.0) == (TAKE_OVER, 1)
    assert b.request(0, 1.0) == (TAKE_OVER, 1)
    # equal epochs when they meet: the primary stays
    assert beat(p, b, 2.0) == (STAND_DOWN, 1)
    assert beat(b, p, 2.0).action == NOTHING
    assert (p.state, b.state) == (ACTIVE, PASSIVE)
    # a later epoch wins over the primary's role
    p, b = Pair(PRIMARY, 0.0, T), Pair(BACKUP, 0.0, T)
    p.request(0, 1.0)
    b.request(4, 1.0)                 # its workers had seen epoch 4 (an earlier life)
    assert (p.epoch, b.epoch) == (1, 5)
    assert beat(b, p, 2.0) == (STAND_DOWN, 5) and beat(p, b, 2.0).action == NOTHING


def test_a_backup_that_restarts_while_the_primary_serves_comes_back_passive():
    p, b = started()
    exchange(p, b, 1.0)
    b = Pair(BACKUP, 2.0, T)                        # restarted: no state, epoch 0
    assert beat(b, p, 2.1).action == NOTHING and p.serving   # (the active keeps serving)
    assert beat(p, b, 2.1) == (NOTHING, 1) and b.state == PASSIVE
    assert p.request(1, 2.2) == (SERVE, 1)


def test_a_passive_broker_takes_over_when_its_peer_restarts():
    p, b = started()
    exchange(p, b, 1.0)
    p = Pair(PRIMARY, 2.0, T)                       # the active restarted: it holds nothing
    assert beat(p, b, 2.1) == (TAKE_OVER, 2) and b.serving   # the passive holds the copy
    assert beat(b, p, 2.1) == (NOTHING, 2) and p.state == PASSIVE
    # two passives (both stood down): the primary takes over
    x, y = Pair(PRIMARY, 0.0, T), Pair(BACKUP, 0.0, T)
    x.state = y.state = PASSIVE
    assert beat(y, x, 0.1) == (TAKE_OVER, 1) and beat(x, y, 0.1).action == NOTHING
    assert y.state == PASSIVE


def test_a_restarted_lone_broker_starts_after_the_epoch_its_workers_saw():
    b = Pair(PRIMARY, 0.0, T)                       # restarted, no peer answering
    assert b.request(7, 1.0) == (TAKE_OVER, 8)      # the workers had seen epoch 7
    with pytest.raises(ValueError):
        b.heard_peer("leader", 1, 1.0)
