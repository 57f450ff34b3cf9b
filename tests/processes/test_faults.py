"""Faults with real processes: SIGKILL a worker, SIGKILL the broker, SIGHUP roll.

Each test starts `wse-sync serve tests/apps/cluster_app.py:server` workers
around one broker and checks the outcome the README's "What happens when..."
promises. The kills run two single-worker serves on their own ports around
the first one's broker (helpers.serve_cluster), so the users of the killed
worker are known by construction; the rolling restart is about one serve's
shared socket and places its clients with helpers.spread_clients.
"""
import os
import signal
import time

import gevent
import gevent.event
import pytest

from helpers import UNIT, broker_of, broker_stats, serve_cluster, serve_process, spread_clients, wait_for
from wse_sync import WSE_ERROR, WSE_STATUS, WseClient, WseError

APP = "tests/apps/cluster_app.py:server"
pytestmark = pytest.mark.timeout(120)


def clients_on(sp, first, n=2):
    """``n`` clients (users u<first>...) of the serve ``sp``: all on its one worker."""
    out = []
    for i in range(first, first + n):
        c = WseClient(sp.url)
        assert c.connect(f"u{i}")["pid"] == sp.worker_pid
        out.append(c)
    return out


def observer(sp, name="observer"):
    """A client on the worker of ``sp`` that records the app's joined/left broadcasts."""
    c = WseClient(sp.url)
    seen = []
    c.channel.on("ev", seen.append)
    assert c.connect(name)["pid"] == sp.worker_pid
    return c, seen


def test_worker_killed(monkeypatch):
    monkeypatch.setenv("WSE_TEST_CPU", "3")
    with serve_cluster(APP, 2) as (survivor_sp, victim_sp):
        endpoint = survivor_sp.broker
        victim, survivor = victim_sp.worker_pid, survivor_sp.worker_pid
        doomed, safe = clients_on(victim_sp, 0), clients_on(survivor_sp, 2)
        watcher = safe[0]
        obs, seen = observer(survivor_sp)
        # a call from the survivor towards a client on the victim, left hanging
        hang = doomed[0]
        reached = gevent.event.Event()

        def hang_forever(payload):
            reached.set()
            gevent.sleep(60)

        hang.register("hang", hang_forever)
        pending = gevent.spawn(watcher.call, "call_conn",
                               {"cid": hang.identity, "rp": "hang", "timeout": 30}, 40)
        assert reached.wait(10 * UNIT)
        total = len(doomed) + len(safe) + 1
        wait_for(lambda: (broker_stats(endpoint) or {}).get("connections") == total)
        os.kill(victim, signal.SIGKILL)
        # the victim's clients see their sockets close; nobody else does
        wait_for(lambda: all(c.close_status for c in doomed), timeout=5 * UNIT)
        assert all(c.close_status[0] == 1006 for c in doomed)
        # the in-flight call fails with RP_DISCONNECT, well before its 30 s timeout
        result = pending.get(timeout=10 * UNIT)
        assert list(result.values())[0][:2] == ["err", WSE_ERROR.RP_DISCONNECT]
        # the broker drops the dead worker's connections (3 s heartbeat timeout)
        wait_for(lambda: (broker_stats(endpoint) or {}).get("connections")
                 == total - len(doomed), timeout=10 * UNIT)
        # 'left' fired exactly once per user of the dead worker, on a survivor
        def lefts():
            return [e for e in seen if e[0] == "left"]

        wait_for(lambda: len(lefts()) >= len(doomed), timeout=10 * UNIT)
        # give a duplicate one more round trip through the cluster to show up
        obs.call("pid")
        lefts = lefts()
        assert sorted(e[1] for e in lefts) == sorted(c.identity for c in doomed)
        assert all(e[2] != victim and e[3] == 1006 for e in lefts)
        # everyone else is still served
        assert all(c.status == WSE_STATUS.READY for c in safe)
        assert watcher.call("pid") == survivor
        # a replacement worker serves new connections on the victim's port
        victim_sp.wait_line(r"worker \d+ serving", count=2)
        pids = {WseClient(victim_sp.url).connect(f"late{i}")["pid"] for i in range(3)}
        assert victim not in pids and survivor not in pids and len(pids) == 1


def test_broker_killed(monkeypatch):
    monkeypatch.setenv("WSE_TEST_CPU", "3")
    with serve_cluster(APP, 2) as sps:
        broker_pid, endpoint = sps[0].broker_pid, sps[0].broker
        side_a, side_b = clients_on(sps[0], 0), clients_on(sps[1], 2)
        pid_a, pid_b = sps[0].worker_pid, sps[1].worker_pid
        a, b = side_a[0], side_b[0]
        got = []
        b.channel.on("hello", got.append)
        clients = side_a + side_b
        wait_for(lambda: (broker_stats(endpoint) or {}).get("connections") == len(clients))
        os.kill(broker_pid, signal.SIGKILL)
        # local traffic goes on
        assert a.call("pid") == pid_a and b.call("pid") == pid_b
        # a cross-worker send issued during the outage arrives after the resync
        a.call("send", {"cid": b.identity, "type": "hello", "payload": "during"})
        sps[0].wait_line(r"broker started", count=2)
        wait_for(lambda: got == ["during"], timeout=15 * UNIT)
        # the map is rebuilt (from both serves' workers) and equals reality
        stats = wait_for(lambda: (s := broker_stats(endpoint)) and
                         s["connections"] == len(clients) and s, timeout=10 * UNIT)
        assert stats["users"] == len(clients)
        assert sorted(w["pid"] for w in stats["workers"].values()) == sorted([pid_a, pid_b])
        # no client connection was lost, and no joined/left fired because of it
        assert all(c.status == WSE_STATUS.READY and c.close_status is None for c in clients)
        events = a.call("events") + b.call("events")
        assert sorted(e[1] for e in events if e[0] == "joined") == sorted(
            c.identity for c in clients)
        assert [e for e in events if e[0] == "left"] == []
        # and the cluster works as before
        c_new = WseClient(sps[0].url)
        c_new.connect("newcomer")
        wait_for(lambda: "newcomer" in a.call("clients") and "newcomer" in b.call("clients"))


def test_rolling_restart_never_refuses(monkeypatch):
    monkeypatch.setenv("WSE_TEST_CPU", "3")
    with serve_process(APP, workers=2) as sp:
        _, endpoint = broker_of(sp)
        by_pid = spread_clients(sp.url, 2, 2, reconnect=True)
        old = set(by_pid)
        clients = [c for cs in by_pid.values() for c in cs]
        try:
            statuses = {id(c): [] for c in clients}
            closes = []
            for c in clients:
                c.when.updated(statuses[id(c)].append)  # (replays READY at once)
                c.when.closed(lambda code, reason: closes.append(code))
            sp.proc.send_signal(signal.SIGHUP)
            sp.wait_line(r"rolling restart done", timeout=60 * UNIT)
            # every client came back, to a new worker; none was refused or went offline
            def on_new_worker(c):
                try:
                    return c.status == WSE_STATUS.READY and c.call("pid") not in old
                except WseError:  # closed by the roll while we asked
                    return False

            wait_for(lambda: all(on_new_worker(c) for c in clients), timeout=20 * UNIT)
            # OFFLINE only on the way to RE_CONNECTING (as the JS client reports a
            # close), and one reconnect each: no attempt failed
            assert all(seq == [WSE_STATUS.READY, WSE_STATUS.OFFLINE, WSE_STATUS.RE_CONNECTING,
                               WSE_STATUS.READY] for seq in statuses.values()), statuses
            assert closes == [1012] * len(clients)
            stats = wait_for(lambda: (s := broker_stats(endpoint)) and
                             s["connections"] == len(clients) and s, timeout=10 * UNIT)
            assert len(stats["workers"]) == 2
        finally:
            # (reconnecting clients left open would keep trying for the rest of the run)
            for c in clients:
                c.close()


def test_left_fires_for_users_who_left_just_before_their_worker_died(monkeypatch):
    """The victim sent a user's last leave and the broker answered 'left'
    there, but the victim dies before it runs it: a survivor fires it (and the
    'left' of the user still connected there)."""
    monkeypatch.setenv("WSE_TEST_CPU", "3")
    with serve_cluster(APP, 2) as (survivor_sp, victim_sp):
        endpoint = survivor_sp.broker
        obs, seen = observer(survivor_sp)
        control = clients_on(victim_sp, 100, n=1)[0]
        leaving = clients_on(victim_sp, 0, n=3)
        wait_for(lambda: (broker_stats(endpoint) or {}).get("connections") == 5)
        # once only `control` is left there, the victim's loop stands still
        assert control.call("freeze_when_alone", {"alone": 1, "seconds": 30}) is True
        # the first two leave while the victim runs: it fires their 'left' itself
        # (waited for: a 'left' the victim has started but not yet broadcast when
        # the last one's handler freezes it is lost with the kill: the documented
        # residual, not what this test is about)
        for c in leaving[:2]:
            c.close()
        wait_for(lambda: sorted(e[1] for e in seen if e[0] == "left")
                 == sorted(c.identity for c in leaving[:2]), timeout=10 * UNIT)
        leaving[2].close()
        # the leaves reached the broker (and its 'left' answers the victim)
        wait_for(lambda: (broker_stats(endpoint) or {}).get("connections") == 2,
                 timeout=10 * UNIT)
        os.kill(victim_sp.worker_pid, signal.SIGKILL)
        expected = sorted(c.identity for c in leaving + [control])

        def lefts():
            return sorted(e[1] for e in seen if e[0] == "left")

        wait_for(lambda: len(lefts()) >= len(expected), timeout=15 * UNIT)
        obs.call("pid")  # one more round trip for a duplicate to show up
        assert lefts() == expected
        # and nothing else: one 'joined' each, from before
        assert sorted(e[1] for e in seen if e[0] == "joined") == sorted(expected + ["observer"])


def test_a_busy_worker_is_not_declared_dead_a_hung_one_is():
    """Busy: 40,000 greenlets taking turns for 6 s (a turn of the loop takes
    seconds) keep the worker in the cluster. Hung: a loop held by one
    greenlet for 8 s is declared dead within the stated bound (3 heartbeats),
    its users get 'left', and it comes back afterwards."""
    with serve_cluster(APP, 2) as (survivor_sp, busy_sp):
        endpoint = survivor_sp.broker
        obs, seen = observer(survivor_sp)
        busy = clients_on(busy_sp, 0, n=2)
        wait_for(lambda: (broker_stats(endpoint) or {}).get("connections") == 3)
        assert busy[0].call("storm", {"greenlets": 40000, "seconds": 6}) is True
        stats = []
        deadline = time.monotonic() + 7 * UNIT
        while time.monotonic() < deadline:
            stats.append((broker_stats(endpoint) or {}).get("connections"))
            gevent.sleep(0.5)
        assert set(stats) == {3}, stats
        assert (broker_stats(endpoint) or {}).get("counters", {}).get("workers.removed", 0) == 0
        # hung: the loop stands still 8 s (no greenlet yields)
        assert busy[0].call("freeze_when_alone", {"alone": 99, "seconds": 8}) is True
        frozen_at = time.monotonic()
        busy[1].close()  # its 'disconnected' handler holds the loop
        wait_for(lambda: (broker_stats(endpoint) or {}).get("connections") == 1,
                 timeout=10 * UNIT, interval=0.1)
        assert time.monotonic() - frozen_at < 3 + 2 * UNIT  # 3 s of silence, then removed
        wait_for(lambda: {"u0", "u1"} <= {e[1] for e in seen if e[0] == "left"},
                 timeout=10 * UNIT)
        # the loop moves again: the worker says hello, its user is back in the map
        wait_for(lambda: (broker_stats(endpoint) or {}).get("connections") == 2,
                 timeout=20 * UNIT, interval=0.2)
