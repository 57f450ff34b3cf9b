"""Cluster-wide semantics with real processes: `wse-sync serve --workers 2`,
an external broker, and `wse-sync stats`.

Every test checks, by the worker pid each welcome reveals, that the
connections it relies on really live in different worker processes. Where
they go is decided, not hoped for: on the shared port of one serve, the
connection is made while its worker is the only one running
(helpers.only_worker); the concurrent-connections test runs two serves on
their own ports around one broker (helpers.serve_cluster).
The app is tests/apps/cluster_app.py (its RPCs act from inside a worker).
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from typing import Callable, Dict, List

import gevent
import pytest
import zmq
from gevent.event import Event

from helpers import (UNIT, RawWS, ServerProcess, free_port, only_worker, serve_cluster,
                     serve_process, wait_for, workers_of)
from wse_sync import WseClient
from wse_sync.core.errors import WSE_ERROR, WSE_REASON
from wse_sync.core.protocol import WseJSON

APP = "tests/apps/cluster_app.py:server"
# message types the test clients record (payloads in arrival order)
TYPES = ("ev", "msg", "mark", "n", "captured")


# -- helpers -----------------------------------------------------------------
def connect(url: str, identity: str) -> WseClient:
    """A connected client; ``.pid`` is its worker, ``.got[type]`` its messages."""
    c = WseClient(url, rpc_timeout=10 * UNIT)
    c.got = defaultdict(list)
    for t in TYPES:
        c.channel.on(t, lambda p, t=t, c=c: c.got[t].append(p))
    c.pid = c.connect(identity)["pid"]
    return c


def connect_on(url: str, identity: str, pid: int, pids: List[int]) -> WseClient:
    """``identity`` connected to worker ``pid`` of the serve at ``url`` (the
    only one of ``pids`` running while it connects)."""
    with only_worker(pid, pids):
        c = connect(url, identity)
    assert c.pid == pid, (c.pid, pid)
    return c


def connect_where(url: str, identity: str, pid_ok: Callable[[int], bool]) -> WseClient:
    """``identity`` connected to a worker whose pid ``pid_ok`` accepts."""
    pids = workers_of(url, 2)
    wanted = [p for p in pids if pid_ok(p)]
    assert wanted, f"no worker of {pids} is wanted"
    return connect_on(url, identity, wanted[0], pids)


def observers(url: str, prefix: str, n_workers: int = 2) -> Dict[int, WseClient]:
    """One client (user ``prefix<i>``) in each worker: {pid: client}."""
    pids = workers_of(url, n_workers)
    return {pid: connect_on(url, f"{prefix}{i}", pid, pids) for i, pid in enumerate(pids)}


def _boom(payload):
    raise ValueError("kaboom")


def closed(c: WseClient) -> tuple:
    wait_for(lambda: c.close_status is not None)
    return c.close_status


def user_events(c: WseClient, cid: str) -> List[list]:
    return [e for e in c.got["ev"] if e[1] == cid]


def barrier(obs: Dict[int, WseClient], tag: str) -> None:
    """A broadcast from every worker, seen by every observer: what those
    workers broadcast before it has arrived by now."""
    for pid, o in obs.items():
        o.call("broadcast", {"type": "mark", "payload": [tag, pid]})
    for o in obs.values():
        wait_for(lambda o=o: all([tag, pid] in o.got["mark"] for pid in obs))


def all_events(obs: Dict[int, WseClient], cid) -> List[list]:
    """The `events` list of every worker, for one user; each item ends with the pid asked."""
    out = []
    for pid, o in obs.items():
        for e in o.call("events"):
            if e[1] == cid:
                assert e[2] == pid, e  # a worker reports its own events
                out.append(e)
    return out


def close_all(*clients: WseClient) -> None:
    for c in clients:
        if c.close_status is None:
            c.close()


def cli_stats(endpoint: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "wse_sync", "stats", "--broker", endpoint],
                         capture_output=True, text=True, timeout=20 * UNIT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


# -- conn_per_user ---------------------------------------------------------
@pytest.mark.parametrize("limit", [1, 2])
def test_conn_per_user_closes_the_oldest_wherever_it_lives(monkeypatch, limit):
    monkeypatch.setenv("WSE_TEST_CPU", str(limit))
    with serve_process(APP, workers=2) as sp:
        live: List[WseClient] = []  # oldest first
        pids = workers_of(sp.url, 2)
        crossed = 0
        # `limit` connections on one worker, then `limit` on the other...: each
        # new connection beyond the limit evicts one held by the other worker
        for i in range(limit + 2):
            c = connect_on(sp.url, "cpu", pids[(i // limit) % 2], pids)
            c.register("whoami", lambda p, i=i: i)
            c.index = i
            live.append(c)
            if len(live) > limit:
                old = live.pop(0)
                assert closed(old) == (1000, WSE_REASON.CLIENTS_CONCURRENCY)
                assert all(k.ready for k in live), "a newer connection was closed"
                assert old.pid != c.pid
                crossed += 1
        assert crossed == 2, "never evicted a connection held by the other worker"
        # the cluster holds exactly the newest `limit` connections, seen from both workers
        obs = observers(sp.url, "cpu-obs")
        for o in obs.values():
            answers = wait_for(lambda o=o: (lambda r: r if len(r) == limit else None)(
                o.call("call_conn", {"cid": "cpu", "rp": "whoami"})))
            assert sorted(v[1] for v in answers.values()) == [k.index for k in live]
        assert all(k.ready for k in live)
        # one user all along: joined once, never left
        events = all_events(obs, "cpu")
        assert [e[0] for e in events] == ["joined"], events
        close_all(*live, *obs.values())


# -- joined / left ---------------------------------------------------------
def test_joined_and_left_fire_once_in_one_worker():
    with serve_process(APP, workers=2) as sp:
        obs = observers(sp.url, "jl-obs")
        a1 = connect(sp.url, "jl")
        a2 = connect_where(sp.url, "jl", lambda p: p != a1.pid)
        for o in obs.values():
            wait_for(lambda o=o: user_events(o, "jl"))
        a1.close()
        assert closed(a1)[0] == 1000
        # the cluster has seen a1 go (both replicas) before a2 closes
        for o in obs.values():
            wait_for(lambda o=o: len(o.call("clients").get("jl", ())) == 1)
        assert a2.ready
        a2.close()
        for o in obs.values():
            wait_for(lambda o=o: len(user_events(o, "jl")) >= 2)
        barrier(obs, "jl-done")
        expected = [["joined", "jl", a1.pid],
                    ["left", "jl", a2.pid, 1000, WSE_REASON.BY_CLIENT]]
        for o in obs.values():
            assert user_events(o, "jl") == expected
        assert sorted(all_events(obs, "jl")) == sorted(expected)
        close_all(*obs.values())


def test_joined_and_left_once_for_concurrent_connections_in_both_workers(monkeypatch):
    """A new user's connections authenticating at the same moment in both
    workers: one joined; all of them closing at once: one left.

    Two single-worker serves on their own ports around one broker: four
    sockets to each, so the race always spans both workers."""
    monkeypatch.setenv("WSE_TEST_CPU", "20")
    proto = WseJSON()

    def welcome_pid(ws: RawWS) -> int:
        while True:
            ev = ws.recv(10 * UNIT)
            assert ev[0] == "text", ev
            type_, payload, _ = proto.unpack(ev[1])
            if type_ == "~wse:welcome":
                return payload["pid"]

    with serve_cluster(APP, 2) as sps:
        obs = {sp.worker_pid: connect(sp.url, f"race-obs{i}") for i, sp in enumerate(sps)}
        assert sorted(o.pid for o in obs.values()) == sorted(obs)
        for attempt in range(3):
            cid = f"race{attempt}"
            # upgraded sockets, four in each worker, then the same new identity
            # sent on all of them at once
            socks = [RawWS(sps[i % 2].url) for i in range(8)]
            assert all(ws.status == 101 for ws in socks)
            hi = proto.pack("~wse:hi", {"identity": cid, "meta": {}})
            for ws in socks:
                ws.send_text(hi)
            pids = [welcome_pid(ws) for ws in socks]
            assert pids == [sps[i % 2].worker_pid for i in range(8)], pids
            for o in obs.values():
                wait_for(lambda o=o, cid=cid: user_events(o, cid))
            for ws in socks:
                ws.close(1000, "")
            for ws in socks:
                assert ws.recv_until_close(10 * UNIT)[0] in ("close", "eof")
                ws.shutdown()
            for o in obs.values():
                wait_for(lambda o=o, cid=cid: len(user_events(o, cid)) >= 2)
            barrier(obs, cid)
            for o in obs.values():
                evs = user_events(o, cid)
                assert [e[0] for e in evs] == ["joined", "left"], evs
                assert evs[1][3] == 1000
            events = all_events(obs, cid)
            assert sorted(e[0] for e in events) == ["joined", "left"], events
        close_all(*obs.values())


# -- send / broadcast / drop_client -----------------------------------------
def test_send_broadcast_and_drop_client_reach_every_worker():
    with serve_process(APP, workers=2) as sp:
        obs = observers(sp.url, "sbd-obs")
        d1 = connect(sp.url, "dev")
        d2 = connect_where(sp.url, "dev", lambda p: p != d1.pid)
        devices = [d1, d2]
        everyone = [*obs.values(), d1, d2]
        # server.send(cid) and WseIdentity.send, issued from each worker
        for pid, o in obs.items():
            o.call("send", {"cid": "dev", "type": "msg", "payload": ["send", pid]})
            wait_for(lambda o=o: "dev" in o.call("clients"))
            o.call("ident_send", {"cid": "dev", "type": "msg", "payload": ["ident", pid]})
        expected = sorted([kind, pid] for kind in ("send", "ident") for pid in obs)
        for d in devices:
            wait_for(lambda d=d: len(d.got["msg"]) >= 4)
        # broadcast from each worker: every connection once
        for pid, o in obs.items():
            o.call("broadcast", {"type": "msg", "payload": ["bcast", pid]})
        for c in everyone:
            wait_for(lambda c=c: sum(m[0] == "bcast" for m in c.got["msg"]) >= 2)
        barrier(obs, "sent")
        for d in devices:
            assert sorted(m for m in d.got["msg"] if m[0] != "bcast") == expected
        for c in everyone:
            assert sorted(m for m in c.got["msg"] if m[0] == "bcast") == sorted(
                ["bcast", pid] for pid in obs), c.got["msg"]
        # drop_client from the worker of d1: both devices close, one left
        obs[d1.pid].call("drop_client", {"cid": "dev", "reason": "bye"})
        assert closed(d1) == (1000, "bye")
        assert closed(d2) == (1000, "bye")
        for o in obs.values():
            wait_for(lambda o=o: any(e[0] == "left" for e in user_events(o, "dev")))
        barrier(obs, "dropped")
        for o in obs.values():
            lefts = [e for e in user_events(o, "dev") if e[0] == "left"]
            assert lefts in ([["left", "dev", d1.pid, 1000, "bye"]],
                             [["left", "dev", d2.pid, 1000, "bye"]]), lefts
        events = all_events(obs, "dev")
        assert sorted(e[0] for e in events) == ["joined", "left"], events
        for o in obs.values():
            wait_for(lambda o=o: "dev" not in o.call("clients"))
        close_all(*obs.values())


# -- server.clients and remote connections -------------------------------------
@pytest.mark.parametrize("replica", [False, True], ids=["lookup", "replica"])
def test_clients_lists_the_cluster_and_remote_connections_work(replica):
    extra = ["--cluster-replica", "true"] if replica else []
    with serve_process(APP, workers=2, extra=extra) as sp:
        obs = observers(sp.url, "cl-obs")
        pa, pb = list(obs)
        m1 = connect(sp.url, "multi")
        m2 = connect_where(sp.url, "multi", lambda p: p != m1.pid)
        solo = connect(sp.url, "solo")
        release = Event()
        for name, c in (("m1", m1), ("m2", m2), ("solo", solo)):
            c.register("whoami", lambda p, name=name, c=c: [name, c.pid, p])
            c.register("boom", _boom)
            c.register("slow", lambda p: release.wait(20 * UNIT) and "late")

        def listing(o):
            r = o.call("clients")
            ok = len(r.get("multi", ())) == 2 and len(r.get("solo", ())) == 1
            return r if ok and all(c.identity in r for c in obs.values()) else None

        # every worker lists every user with all of their connections
        seen = {pid: wait_for(lambda o=o: listing(o), timeout=2 * UNIT)
                for pid, o in obs.items()}
        assert seen[pa] == seen[pb]

        for pid, o in obs.items():
            # call: a result from each device, local and remote
            res = o.call("call_conn", {"cid": "multi", "rp": "whoami", "payload": pid})
            assert sorted(res) == seen[pid]["multi"]
            assert sorted(v[1][0] for v in res.values()) == ["m1", "m2"], res
            assert all(v[0] == "ok" and v[1][2] == pid for v in res.values()), res
            remote_id = next(k for k, v in res.items() if v[1][1] != pid)
            local_id = next(k for k, v in res.items() if v[1][1] == pid)
            remote = m1 if m1.pid != pid else m2

            res = o.call("call_conn", {"cid": "multi", "rp": "nope"})
            assert res[remote_id][:2] == ["err", WSE_ERROR.RP_NOT_REGISTERED], res
            assert res[local_id][:2] == ["err", WSE_ERROR.RP_NOT_REGISTERED], res

            res = o.call("call_conn", {"cid": "multi", "rp": "boom", "payload": 7})
            for k in (remote_id, local_id):
                kind, code, details = res[k]
                assert (kind, code) == ("err", WSE_ERROR.RP_EXECUTION_FAILED), res
                assert details["origin"]["name"] == "ValueError"
                assert details["origin"]["message"] == "kaboom"
                assert details["rpc"] == "boom" and details["payload"] == 7

            res = o.call("call_conn", {"cid": "multi", "rp": "slow", "timeout": 0.3})
            assert res[remote_id][:2] == ["err", WSE_ERROR.RP_TIMEOUT], res
            assert res[local_id][:2] == ["err", WSE_ERROR.RP_TIMEOUT], res

            # send on a remote connection object
            before = len(remote.got["n"])
            o.call("send_conns", {"cid": "multi", "type": "n", "count": 1})
            wait_for(lambda r=remote, n=before: len(r.got["n"]) > n)
        release.set()

        # drop of a remote connection: only that device closes
        o = obs[m1.pid]
        remote_id = next(k for k, v in o.call("call_conn", {"cid": "multi", "rp": "whoami"}).items()
                         if v[1][0] == "m2")
        o.call("drop_conn", {"cid": "multi", "conn_id": remote_id, "reason": "out"})
        assert closed(m2) == (1000, "out")
        assert m1.ready
        wait_for(lambda: o.call("clients")["multi"] == [k for k in seen[pa]["multi"]
                                                        if k != remote_id])
        close_all(m1, solo, *obs.values())


def test_calls_on_a_remote_connection_that_vanishes_end_promptly():
    with serve_process(APP, workers=2) as sp:
        obs = observers(sp.url, "van-obs")
        v1 = connect(sp.url, "v1")
        o = next(c for pid, c in obs.items() if pid != v1.pid)  # v1 is remote for o
        # (1) the device goes away while the call is in flight
        v1.register("vanish", lambda p: v1.close() or "too late")
        wait_for(lambda: "v1" in o.call("clients"))
        res = o.call("call_conn", {"cid": "v1", "rp": "vanish", "timeout": 60})
        [(conn_id, answer)] = res.items()
        assert answer[0] == "err" and answer[1] in (
            WSE_ERROR.RP_DISCONNECT, WSE_ERROR.CONNECTION_NOT_READY), res
        # (2) a connection object kept after its device went away
        v2 = connect_where(sp.url, "v2", lambda p: p != o.pid)
        wait_for(lambda: "v2" in o.call("clients"))
        [conn_id] = o.call("clients")["v2"]
        job = gevent.spawn(o.call, "call_stale",
                           {"cid": "v2", "conn_id": conn_id, "rp": "whoami", "timeout": 60})
        wait_for(lambda: o.got["captured"] == [conn_id])
        v2.close()
        answer = job.get(timeout=15 * UNIT)
        assert answer[0] == "err" and answer[1] in (
            WSE_ERROR.RP_DISCONNECT, WSE_ERROR.CONNECTION_NOT_READY), answer
        close_all(*obs.values())


# -- ordering ------------------------------------------------------------------
def test_messages_to_a_remote_connection_arrive_in_order():
    with serve_process(APP, workers=2) as sp:
        obs = observers(sp.url, "ord-obs")
        for pid, o in obs.items():
            dev = connect_where(sp.url, f"ord-{pid}", lambda p, pid=pid: p != pid)
            wait_for(lambda o=o, cid=f"ord-{pid}": cid in o.call("clients"))
            o.call("send_conns", {"cid": f"ord-{pid}", "type": "n", "count": 500})
            wait_for(lambda dev=dev: len(dev.got["n"]) >= 500, timeout=15 * UNIT)
            assert dev.got["n"] == list(range(500))
            close_all(dev)
        close_all(*obs.values())


# -- the broker's input --------------------------------------------------------
def test_broker_survives_bad_input_and_counts_it():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    broker = ServerProcess(["broker", "--bind", endpoint, "--insecure"])
    ctx = zmq.Context()
    socks = []
    try:
        broker.wait_line(r"broker listening")

        def dealer(identity: bytes) -> zmq.Socket:
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.IDENTITY, identity)
            s.connect(endpoint)
            socks.append(s)
            return s

        def recv(s: zmq.Socket) -> list:
            assert s.poll(10_000 * UNIT), "no answer from the broker:\n" + broker.stderr
            return s.recv_multipart()

        junk = dealer(b"junk-peer")
        garbage = [
            [b"garbage"],
            [b"wse1", b"hb"],
            [b"wse1", b"hb", b"{}", b"t"],
            [b"wse1", b"\xff\xfe", b"{}"],
            [b"wse1", b"hb", b"{not json"],
            [b"wse1", b"hb", b"[1, 2]"],
            [b"wse1", b"send", b"{}", b"x", b"data"],
            [b"wse1", b"send", b"{}", b"t", b"\xff\xfe"],
            [b"wse1", b"frobnicate", b"{}"],      # unknown kind
        ]
        for frames in garbage:
            junk.send_multipart(frames)
        junk.send_multipart([b"wse9", b"hello", b"{}"])  # another schema version
        assert recv(junk)[:2] == [b"wse1", b"refused"]
        # a worker that attached, then sends schema-valid nonsense: dropped, counted
        odd = dealer(b"odd-worker")
        odd.send_multipart([b"wse1", b"hello", b'{"pid": 0, "table": []}'])
        assert recv(odd)[:2] == [b"wse1", b"snapshot"]
        odd.send_multipart([b"wse1", b"join", b"{}"])       # no fields
        odd.send_multipart([b"wse1", b"snapshot", b"{}"])   # a broker->worker kind
        # hellos whose bodies are wrong
        bad_hellos = [b'{"pid": "not-a-pid"}', b'{"pid": 1, "table": [["conn-only"]]}']
        for body in bad_hellos:
            junk.send_multipart([b"wse1", b"hello", body])
        # the broker still answers (on the same pipe, so after the above)
        junk.send_multipart([b"wse1", b"stats", b"{}"])
        frames = recv(junk)
        assert frames[:2] == [b"wse1", b"stats"]
        assert broker.proc.poll() is None
        # a clear log line: an error naming both schema versions
        line = broker.wait_line(r"wse9")[0]
        assert "ERROR" in line and "wse1" in line, line
        stats = cli_stats(endpoint)
        drops = {k: v for k, v in stats["counters"].items() if k.startswith("dropped")}
        assert sum(drops.values()) == len(garbage) + 1 + 2 + len(bad_hellos), stats["counters"]
        assert broker.proc.poll() is None, broker.stderr
        assert broker.stop() == 0, broker.stderr
    finally:
        for s in socks:
            s.close(0)
        ctx.term()
        broker.stop()


# -- an external broker shared by two `serve` commands ---------------------------
def test_two_serves_on_one_external_broker_and_stats():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    broker = ServerProcess(["broker", "--bind", endpoint, "--insecure"])
    try:
        broker.wait_line(r"broker listening")
        extra = ["--broker", endpoint]
        with serve_process(APP, workers=1, extra=extra) as sa, \
                serve_process(APP, workers=1, extra=extra) as sb:
            assert sa.port != sb.port
            a = connect(sa.url, "ua")
            b = connect(sb.url, "ub")
            assert a.pid != b.pid
            for src, dst, cid in ((b, a, "ua"), (a, b, "ub")):
                src.call("send", {"cid": cid, "type": "msg", "payload": ["from", src.pid]})
                wait_for(lambda dst=dst, src=src: dst.got["msg"] == [["from", src.pid]])
            for c in (a, b):
                wait_for(lambda c=c: {"ua", "ub"} <= set(c.call("clients")), timeout=2 * UNIT)
                assert len(c.call("clients")) == 2
            stats = cli_stats(endpoint)
            assert stats["users"] == 2 and stats["connections"] == 2, stats
            per_pid = {w["pid"]: w["connections"] for w in stats["workers"].values()}
            assert per_pid == {a.pid: 1, b.pid: 1}, stats
            assert stats["counters"].get("in.join") == 2, stats
            close_all(a, b)
            wait_for(lambda: cli_stats(endpoint)["users"] == 0, timeout=10 * UNIT)
        assert broker.proc.poll() is None, broker.stderr
        assert broker.stop() == 0, broker.stderr
    finally:
        broker.stop()
