"""The map sharded by cid across K brokers: the pure rules, then real brokers
(`wse-sync broker --shard I/K`) and workers joined to all of them
(`--broker EP0,EP1`), a shard killed and restarted included.

Where each user is is decided, not hoped for: every serve runs one worker on
its own port, and the users are picked by the shard their cid hashes to.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections import defaultdict
from typing import Dict, Iterator, List

import pytest

from helpers import UNIT, ServerProcess, broker_stats, serve_process, wait_for
from wse_sync import WseClient, connect_cluster
from wse_sync.core.broker import BrokerCore
from wse_sync.core.checks import ROLE_WORKER
from wse_sync.core.link import LinkCore
from wse_sync.core.messages import Message
from wse_sync.core.shards import (home_shard, merge_stats, merge_users, parse_shard, shard_of,
                                  split_endpoints)

APP = "tests/apps/cluster_app.py:server"


def users_of(shard: int, count: int, n: int, prefix: str) -> List[str]:
    """The first ``n`` cids ``prefix<i>`` that shard ``shard`` of ``count`` owns."""
    out: List[str] = []
    i = 0
    while len(out) < n:
        cid = f"{prefix}{i}"
        if shard_of(cid, count) == shard:
            out.append(cid)
        i += 1
    return out


# -- the pure rules ---------------------------------------------------------------
def test_a_cid_has_one_shard_whatever_the_process():
    # crc32 of the cid's JSON: fixed values, not Python's per-process hash()
    cids = ("alice", "bob", 42, "42", "org/7", "é")
    other = subprocess.run(
        [sys.executable, "-c", "from wse_sync.core.shards import shard_of;"
         f"print([shard_of(c, 4) for c in {cids!r}])"],
        capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHONHASHSEED": "7"})
    assert other.stdout.strip() == str([shard_of(c, 4) for c in cids]), other.stderr
    import zlib
    # ujson's text: "/" escaped, non-ASCII as \u escapes
    assert shard_of("org/7", 4) == zlib.crc32(b'"org\\/7"') % 4
    assert shard_of("é", 4) == zlib.crc32(b'"\\u00e9"') % 4
    # keys a dict takes for one user share a shard
    for a, b in ((True, 1), (False, 0), (5.0, 5), (-3.0, -3)):
        assert all(shard_of(a, k) == shard_of(b, k) for k in range(2, 9)), (a, b)
    assert shard_of("alice", 4) == zlib.crc32(b'"alice"') % 4
    assert shard_of(42, 4) == zlib.crc32(b"42") % 4
    assert shard_of("42", 4) == zlib.crc32(b'"42"') % 4
    assert shard_of("anyone", 1) == 0 and home_shard("w1", 1) == 0
    spread = defaultdict(int)
    for i in range(20000):
        spread[shard_of(f"user-{i}", 4)] += 1
    assert sorted(spread) == [0, 1, 2, 3]
    assert all(4500 < n < 5500 for n in spread.values()), spread


def test_shard_and_endpoint_lists_are_checked():
    assert parse_shard("0/4") == (0, 4) and parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "1/0"):
        with pytest.raises(ValueError):
            parse_shard(bad)
    assert split_endpoints("ipc:///a, ipc:///b") == ["ipc:///a", "ipc:///b"]
    with pytest.raises(ValueError):
        split_endpoints("ipc:///a,,ipc:///b")
    with pytest.raises(ValueError):
        split_endpoints("ipc:///a,ipc:///a")


def test_answers_of_the_shards_add_up():
    a = {"users": [["u0", [["c1", "w1", None]]]]}
    b = {"users": [["u1", [["c2", "w2", None]]]]}
    assert merge_users([a, b], False) == {"users": a["users"] + b["users"]}
    assert merge_users([{"count": 2}, {"count": 3}], True) == {"count": 5}
    assert merge_users([{"count": 2}, None], True) == {"count": 2, "partial": True}
    assert merge_users([None, None], True) is None
    s0 = {"users": 1, "connections": 2, "counters": {"in.join": 2},
          "workers": {"w1": {"pid": 1, "connections": 2, "role": "worker", "serves": True}},
          "reports": {"w1": {"x": 1}}}
    s1 = {"users": 3, "connections": 3, "counters": {"in.join": 3, "routed": 1},
          "workers": {"w1": {"pid": 1, "connections": 1, "role": "worker", "serves": True},
                      "w2": {"pid": 2, "connections": 2, "role": "worker", "serves": True}},
          "reports": {"w2": {"x": 2}}}
    merged = merge_stats([s0, s1])
    assert (merged["users"], merged["connections"]) == (4, 5)
    assert merged["counters"] == {"in.join": 5, "routed": 1}
    assert {w: r["connections"] for w, r in merged["workers"].items()} == {"w1": 3, "w2": 2}
    assert merged["reports"] == {"w1": {"x": 1}, "w2": {"x": 2}}
    assert merge_stats([None, None]) is None


def _hello(core: BrokerCore, sender: str, shard) -> list:
    body = {"pid": 1, "table": [], "sync": 1}
    if shard is not None:
        body["shard"] = shard
    return core.handle(sender, Message("hello", body), 0.0, ROLE_WORKER)


def test_a_broker_refuses_a_worker_with_another_shard_list():
    core = BrokerCore(shard=(1, 2))
    # a worker that takes it for a single broker, or for shard 0, or of 4
    for i, said in enumerate((None, [0, 2], [1, 4])):
        out = _hello(core, f"w{i}", said)
        assert [(w, m.kind, m.body) for w, m in out] == [(f"w{i}", "refused", {"shard": [1, 2]})]
    assert core.counters["refused.shard"] == 3 and not core.workers
    out = _hello(core, "good", [1, 2])
    assert [m.kind for _w, m in out] == ["snapshot"]
    # a join of a user another shard owns is refused; its own users join
    mine, theirs = users_of(1, 2, 1, "j")[0], users_of(0, 2, 1, "j")[0]
    for req, cid in ((1, theirs), (2, mine)):
        core.handle("good", Message("join", {"req": req, "conn_id": f"c{req}", "cid": cid,
                                             "limit": 1, "at": 1.0}), 0.0, ROLE_WORKER)
    assert core.counters["refused.shard"] == 4
    assert list(core.registry.users) == [mine]
    # a malformed shard is a malformed hello
    assert core.handle("bad", Message("hello", {"pid": 1, "shard": [2, 2]}), 0.0,
                       ROLE_WORKER) == []
    assert core.counters["dropped.malformed"] == 1


def test_a_refused_worker_says_why_once_and_gets_in_when_the_broker_is_right(caplog):
    link = LinkCore("w1", lambda: [], 1, shard=(0, 2))

    def say_hello(broker: BrokerCore) -> None:
        for m in link.hello():
            for _w, answer in broker.handle("w1", m, 0.0, ROLE_WORKER):
                link.handle(answer, 0.0)
    wrong = BrokerCore(shard=(1, 2))
    with caplog.at_level("ERROR", logger="wse_sync.link"):
        say_hello(wrong)
        say_hello(wrong)
    assert link.refused is not None and "shard 1/2" in link.refused and "0/2" in link.refused
    assert [r.getMessage() for r in caplog.records].count(
        f"the broker refused this worker: {link.refused}") == 1
    assert not link.synced
    # a join is decided here at once (pending), as while a broker is away
    step = link.join("c1", "u1", None, 1.0, [], 1)
    assert step.req is None and step.decided == (False, []) and link.is_pending("c1")
    say_hello(BrokerCore(shard=(0, 2)))
    assert link.synced and link.refused is None
    step = link.join("c2", "u2", None, 2.0, [], 1)
    assert step.req is not None and step.decided is None


# -- real brokers and workers ---------------------------------------------------------
@contextlib.contextmanager
def shard_brokers(tmp_path, count: int) -> Iterator[List[ServerProcess]]:
    procs: List[ServerProcess] = []
    try:
        for i in range(count):
            procs.append(start_broker(f"ipc://{tmp_path}/shard{i}", i, count))
        yield procs
    finally:
        for p in procs:
            p.stop()


def start_broker(endpoint: str, index: int, count: int) -> ServerProcess:
    p = ServerProcess(["broker", "--bind", endpoint, "--shard", f"{index}/{count}",
                       "--sync-window", "1"])
    p.endpoint = endpoint
    p.wait_line(rf"broker listening on .* as shard {index}/{count}")
    return p


def connect(url: str, identity: str) -> WseClient:
    c = WseClient(url, rpc_timeout=10 * UNIT)
    c.got = defaultdict(list)
    for t in ("ev", "msg"):
        c.channel.on(t, lambda p, t=t, c=c: c.got[t].append(p))
    c.pid = c.connect(identity)["pid"]
    return c


def health(port: int) -> tuple:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5 * UNIT) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def gauges(port: int, labelled: bool = False) -> Dict[str, float]:
    """The samples of a serve's /metrics (unlabelled ones unless ``labelled``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5 * UNIT) as r:
        lines = r.read().decode().splitlines()
    return {name: float(value) for name, value in
            (line.rsplit(" ", 1) for line in lines if line and not line.startswith("#"))
            if labelled or "{" not in name}


def shard_users(broker: ServerProcess) -> Dict[str, int]:
    """worker pid -> connections this shard holds for it, and the user count."""
    stats = broker_stats(broker.endpoint)
    assert stats is not None, broker.stderr
    rows = {str(info["pid"]): info["connections"] for info in stats["workers"].values()
            if info["role"] == "worker"}
    return dict(rows, users=stats["users"])


def expected(where: Dict[str, int], shard: int, count: int) -> Dict[str, int]:
    """What shard_users shows for users ``where`` = {cid: worker pid} (one connection each)."""
    out: Dict[str, int] = {str(pid): 0 for pid in where.values()}
    mine = [cid for cid in where if shard_of(cid, count) == shard]
    for cid in mine:
        out[str(where[cid])] += 1
    return dict(out, users=len(mine))


@pytest.mark.parametrize("replica", [False, True], ids=["lookup", "replica"])
def test_two_shards_carry_users_sends_events_and_conn_per_user(tmp_path, monkeypatch, replica):
    monkeypatch.setenv("WSE_TEST_CPU", "1")
    with shard_brokers(tmp_path, 2) as brokers:
        both = ",".join(b.endpoint for b in brokers)
        extra = ["--broker", both, "--cluster-replica", "true" if replica else "false"]
        with serve_process(APP, 1, extra) as s1, serve_process(APP, 1, extra) as s2:
            (u0, v0, o1), (u1, v1, o2) = users_of(0, 2, 3, "sh"), users_of(1, 2, 3, "sh")
            c = {u0: connect(s1.url, u0), u1: connect(s1.url, u1), o1: connect(s1.url, o1),
                 v0: connect(s2.url, v0), v1: connect(s2.url, v1), o2: connect(s2.url, o2)}
            p1, p2 = c[u0].pid, c[v0].pid
            assert p1 != p2 and {c[u].pid for u in (u1, o1)} == {p1}
            assert {c[u].pid for u in (v1, o2)} == {p2}
            where = {cid: cl.pid for cid, cl in c.items()}
            # each shard holds its own users
            for i, broker in enumerate(brokers):
                wait_for(lambda b=broker, i=i: shard_users(b) == expected(where, i, 2))
            # sends cross workers through the user's shard; a broadcast reaches all
            for target in (v0, v1):
                c[u0].call("send", {"cid": target, "type": "msg", "payload": f"to {target}"})
                wait_for(lambda t=target: c[t].got["msg"] == [f"to {t}"])
            c[v1].call("broadcast", {"type": "msg", "payload": "all"})
            for cl in c.values():
                wait_for(lambda cl=cl: "all" in cl.got["msg"])
            # server.clients asks both shards (or reads both replicas)
            listing = wait_for(lambda: (lambda r: r if len(r) == len(c) else None)(
                c[u0].call("clients")))
            assert sorted(listing) == sorted(c)
            # `wse-sync stats` over the shards: their sum, and each answer
            out = subprocess.run([sys.executable, "-m", "wse_sync", "stats", "--broker", both],
                                 capture_output=True, text=True, timeout=30 * UNIT)
            assert out.returncode == 0, out.stderr
            summed = json.loads(out.stdout)
            assert summed["users"] == len(c) and len(summed["shards"]) == 2
            assert [a["users"] for a in summed["shards"]] == [3, 3]
            # a connect_cluster() handle joined to both shards
            with connect_cluster(both, timeout=10 * UNIT) as handle:
                assert sorted(handle.clients) == sorted(c)
                handle.send(v0, "msg", "from a handle")
                handle.broadcast("msg", "handle to all")
                handle.flush()
            # the send goes through v0's shard and the broadcast through the
            # handle's home shard: two brokers, so either may arrive first
            wait_for(lambda: sorted(c[v0].got["msg"][-2:]) == ["from a handle",
                                                                "handle to all"])
            for cl in c.values():
                wait_for(lambda cl=cl: "handle to all" in cl.got["msg"])
            # a call on a connection another worker holds (through its user's shard)
            c[v1].register("whoami", lambda p: ["v1", p])
            answers = c[u0].call("call_conn", {"cid": v1, "rp": "whoami", "payload": 7})
            assert [a[:2] for a in answers.values()] == [["ok", ["v1", 7]]]
            # a send on that connection object (conn_send, the same shard)
            c[u0].call("send_conns", {"cid": v1, "type": "msg", "count": 1})
            wait_for(lambda: c[v1].got["msg"][-1:] == [0])
            # ... and no other shard was asked about that connection
            for broker in brokers:
                assert not broker_stats(broker.endpoint)["counters"].get("dropped.unknown-conn")
            # conn_per_user=1 across workers: the user's shard evicts the older
            again = connect(s2.url, u1)
            wait_for(lambda: c[u1].close_status is not None)
            assert c[u1].close_status[0] == 1000
            where[u1] = p2
            wait_for(lambda: shard_users(brokers[1]) == expected(where, 1, 2))
            # drop_client through the shard
            c[v1].call("drop_client", {"cid": u0})
            wait_for(lambda: c[u0].close_status is not None)
            del where[u0]
            wait_for(lambda: shard_users(brokers[0]) == expected(where, 0, 2))

            def events() -> list:
                return c[o1].call("events") + c[o2].call("events")
            # each user joined once; u1's eviction was no 'left' (it is still here)
            left = wait_for(lambda: [e[1] for e in events() if e[0] == "left"] or None)
            assert left == [u0]
            assert sorted(e[1] for e in events() if e[0] == "joined") == sorted(c)
            for cl in (*c.values(), again):
                cl.close()
            for sp in (s1, s2):
                assert "Traceback" not in sp.stderr
        for broker in brokers:
            assert "Traceback" not in broker.stderr


def test_a_shard_that_dies_costs_only_its_users(tmp_path):
    with shard_brokers(tmp_path, 2) as brokers:
        both = ",".join(b.endpoint for b in brokers)
        with serve_process(APP, 1, ["--broker", both]) as s1, \
                serve_process(APP, 1, ["--broker", both]) as s2:
            (a0, b0), (a1, b1, late) = users_of(0, 2, 2, "d"), users_of(1, 2, 3, "d")
            c = {a0: connect(s1.url, a0), a1: connect(s1.url, a1),
                 b0: connect(s2.url, b0), b1: connect(s2.url, b1)}
            for broker in brokers:
                wait_for(lambda b=broker: shard_users(b)["users"] == 2)
            assert health(s1.port)[1]["shards"] == ["up", "up"]
            # shard 1 dies
            dead = brokers[1]
            dead.stop(signal.SIGKILL)
            status, body = wait_for(lambda: (lambda h: h if h[1]["broker"] == "partial"
                                             else None)(health(s1.port)), timeout=10 * UNIT)
            assert status == 200 and body["shards"] == ["up", "away"], body
            # shard 0's users are served as before
            c[a0].call("send", {"cid": b0, "type": "msg", "payload": "still here"})
            wait_for(lambda: c[b0].got["msg"] == ["still here"])
            c[a1].call("broadcast", {"type": "msg", "payload": "all"})
            for cl in c.values():
                wait_for(lambda cl=cl: "all" in cl.got["msg"])
            # len() and iteration agree: the live shard's users and this worker's
            assert c[a0].call("count") == len(c[a0].call("clients")) == 3
            # /metrics shows what the live shard knows: its users, every worker
            wait_for(lambda: gauges(s1.port).get("wse_users") == 2
                     and gauges(s1.port).get("wse_workers") == 2, timeout=10 * UNIT)
            shard_up = {k: v for k, v in gauges(s1.port, labelled=True).items()
                        if k.startswith("wse_broker_shard_up")}
            assert shard_up == {'wse_broker_shard_up{shard="0"}': 1.0,
                                'wse_broker_shard_up{shard="1"}': 0.0}, shard_up
            # a connect_cluster() handle joins with one shard away, and sends
            with connect_cluster(both, timeout=10 * UNIT) as handle:
                handle.send(b0, "msg", "from a handle")
                wait_for(lambda: c[b0].got["msg"][-1:] == ["from a handle"])
            # shard 1's users: a send waits in the outbox, a new user is let in
            c[a0].call("send", {"cid": b1, "type": "msg", "payload": "later"})
            newcomer = connect(s2.url, late)
            assert c[b1].got["msg"] == ["all"]
            # shard 1 comes back on the same endpoint: the workers resend their
            # part of the map and the waiting send
            brokers[1] = start_broker(dead.endpoint, 1, 2)
            wait_for(lambda: c[b1].got["msg"] == ["all", "later"], timeout=15 * UNIT)
            wait_for(lambda: shard_users(brokers[1]) == {
                str(c[a1].pid): 1, str(c[b1].pid): 2, "users": 3}, timeout=15 * UNIT)
            wait_for(lambda: health(s2.port)[1]["shards"] == ["up", "up"], timeout=10 * UNIT)
            # nobody left; the newcomer joined once (decided when its shard came back)
            events = wait_for(lambda: (lambda e: e if [x[1] for x in e if x[0] == "joined"
                                                       ].count(late) == 1 else None)(
                c[a0].call("events") + c[b0].call("events")), timeout=10 * UNIT)
            assert not [e for e in events if e[0] == "left"], events
            assert sorted(e[1] for e in events if e[0] == "joined") == sorted([*c, late])
            assert shard_users(brokers[0])["users"] == 2
            for cl in (*c.values(), newcomer):
                cl.close()
            for sp in (s1, s2):
                assert "Traceback" not in sp.stderr


def test_a_killed_worker_costs_each_shard_its_users_once(tmp_path):
    with shard_brokers(tmp_path, 2) as brokers:
        both = ",".join(b.endpoint for b in brokers)
        with serve_process(APP, 1, ["--broker", both]) as victim_sp, \
                serve_process(APP, 1, ["--broker", both]) as survivor_sp:
            doomed = users_of(0, 2, 2, "k") + users_of(1, 2, 2, "k")
            safe = users_of(0, 2, 1, "s") + users_of(1, 2, 1, "s")
            c = {u: connect(victim_sp.url, u) for u in doomed}
            c.update({u: connect(survivor_sp.url, u) for u in safe})
            victim = c[doomed[0]].pid
            for broker in brokers:
                wait_for(lambda b=broker: shard_users(b)["users"] == 3)
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: all(c[u].close_status for u in doomed), timeout=5 * UNIT)
            # each shard removes the dead worker's connections (3 s without a heartbeat)
            for broker in brokers:
                wait_for(lambda b=broker: shard_users(b)["users"] == 1, timeout=15 * UNIT)
            # 'left' once per user of the dead worker, each from its own shard;
            # the survivors' users stay
            watcher = c[safe[0]]
            left = wait_for(lambda: (lambda e: e if len(e) >= len(doomed) else None)(
                [e for e in watcher.got["ev"] if e[0] == "left"]), timeout=15 * UNIT)
            watcher.call("pid")  # one more round trip for a duplicate to show up
            assert sorted(e[1] for e in watcher.got["ev"] if e[0] == "left") == sorted(doomed)
            assert {(e[3], e[4]) for e in left} == {(1006, "wse.worker-died")}, left
            assert all(c[u].close_status is None for u in safe)
            for u in safe:
                c[u].close()
            assert "Traceback" not in survivor_sp.stderr
    for broker in brokers:
        assert "Traceback" not in broker.stderr


def test_a_worker_with_another_broker_list_is_refused(tmp_path):
    with shard_brokers(tmp_path, 2) as brokers:
        # the shards listed the other way round
        swapped = ",".join(b.endpoint for b in reversed(brokers))
        with serve_process(APP, 1, ["--broker", swapped]) as sp:
            for broker in brokers:
                broker.wait_line(r"refused\.shard")
            wait_for(lambda: health(sp.port)[1]["shards"] == ["refused", "refused"])
            status, body = health(sp.port)
            assert status == 503 and body["broker"] == "refused", body
            for i, j in ((1, 0), (0, 1)):
                sp.wait_line(rf"the broker refused this worker: this broker is shard {i}/2,"
                             rf" but this worker takes it for shard {j}/2")
            assert "Traceback" not in sp.stderr
    for broker in brokers:
        assert "Traceback" not in broker.stderr
