"""CURVE on the broker's tcp:// links, with real processes on 127.0.0.1.

A broker started with keys, `wse-sync serve --broker tcp://...` workers and
connect_cluster() handles holding keys of their own; peers with unknown or
client keys, and forged commands from raw DEALER sockets (the broker map is
read back through `stats` after each). Also: --insecure, a broker that
refuses to start without keys, SIGHUP reloading the allowed keys, and the
ipc socket's mode.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections import defaultdict
from typing import Dict, List, Optional

import pytest
import zmq
import zmq.auth

from helpers import ROOT, UNIT, ServerProcess, free_port, serve_process, wait_for
from wse_sync import WseClient, connect_cluster
from wse_sync.core.errors import WSE_ERROR, WseError
from wse_sync.core.messages import decode, encode, split
from wse_sync.core.routes import link_identity, member_of

pytestmark = pytest.mark.timeout(60)

APP = "tests/apps/cluster_app.py:server"


# -- helpers -------------------------------------------------------------------
def make_keys(root, *names: str) -> Dict[str, str]:
    """keys/NAME.key(_secret) via the CLI; returns {name: secret path}."""
    out = {}
    for name in names:
        done = subprocess.run([sys.executable, "-m", "wse_sync", "keys", name, "--dir",
                               str(root)], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        out[name] = os.path.join(str(root), name + ".key_secret")
    return out


def allow(directory, root, *names: str) -> str:
    """Copy the public keys of ``names`` into ``directory`` (an --allow-* directory)."""
    os.makedirs(str(directory), exist_ok=True)
    for name in names:
        shutil.copy(os.path.join(str(root), name + ".key"), str(directory))
    return str(directory)


class Cluster:
    """A CURVE broker with keys for: broker, w1 and w2 (workers), cron (client),
    watch (observer: a client that reads the map), rogue."""

    def __init__(self, tmp_path, clients: bool = True, extra: Optional[List[str]] = None):
        self.root = tmp_path / "keys"
        self.secret = make_keys(self.root, "broker", "w1", "w2", "cron", "watch", "rogue")
        self.broker_key = os.path.join(str(self.root), "broker.key")
        self.workers_dir = allow(tmp_path / "workers", self.root, "w1", "w2")
        self.clients_dir = allow(tmp_path / "clients", self.root, "cron")
        self.observers_dir = allow(tmp_path / "observers", self.root, "watch")
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        argv = ["broker", "--bind", self.endpoint, "--sync-window", "0",
                "--curve-secret", self.secret["broker"], "--allow-workers", self.workers_dir]
        if clients:
            argv += ["--allow-clients", self.clients_dir,
                     "--allow-observers", self.observers_dir]
        self.proc = ServerProcess(argv + (extra or []))
        self.proc.wait_line(r"broker listening on .* with CURVE")
        self.ctx = zmq.Context()
        self.socks: List[zmq.Socket] = []

    def keys(self, name: str) -> List[str]:
        """`serve`/`stats` flags for the key ``name``."""
        return ["--broker-key", self.broker_key, "--curve-secret", self.secret[name]]

    def handle(self, name: str = "cron", **kw):
        return connect_cluster(self.endpoint, broker_key=self.broker_key,
                               secret=self.secret[name], timeout=10 * UNIT, **kw)

    def dealer(self, name: str, identity: bytes) -> zmq.Socket:
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IDENTITY, identity)
        public, secret = zmq.auth.load_certificate(self.secret[name])
        s.curve_serverkey = zmq.auth.load_certificate(self.broker_key)[0]
        s.curve_publickey, s.curve_secretkey = public, secret
        s.connect(self.endpoint)
        self.socks.append(s)
        return s

    def stats(self, name: str = "cron") -> dict:
        out = subprocess.run([sys.executable, "-m", "wse_sync", "stats", "--broker",
                              self.endpoint, *self.keys(name)], capture_output=True, text=True,
                             timeout=30 * UNIT)
        assert out.returncode == 0, out.stderr + self.proc.stderr
        return json.loads(out.stdout)

    def close(self) -> None:
        for s in self.socks:
            s.close(0)
        self.ctx.term()
        rc = self.proc.stop()
        assert rc == 0, self.proc.stderr
        assert "Traceback" not in self.proc.stderr, self.proc.stderr


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()


def send(s: zmq.Socket, kind: str, body: Optional[dict] = None, data=None) -> None:
    s.send_multipart(encode(kind, body or {}, data))


class Inbox:
    """What a raw DEALER received, by kind. Every raw worker that said hello
    beats its heart while a test waits (the broker drops a worker silent for 3 s)."""

    beating: List[zmq.Socket] = []
    last_beat = [0.0]

    def __init__(self, sock: zmq.Socket) -> None:
        self.sock = sock
        self.got: Dict[str, List] = defaultdict(list)

    @classmethod
    def beat(cls) -> None:
        now = time.monotonic()
        if now - cls.last_beat[0] > 0.5:
            cls.last_beat[0] = now
            for s in list(cls.beating):
                if s.closed:
                    cls.beating.remove(s)
                else:
                    send(s, "hb")

    def until(self, kind: str, count: int = 1, timeout: float = 10 * UNIT) -> list:
        def arrived():
            Inbox.beat()
            while self.sock.poll(0):
                for part in split(self.sock.recv_multipart()):
                    m = decode(part)
                    self.got[m.kind].append(m)
            return len(self.got[kind]) >= count
        wait_for(arrived, timeout=timeout)
        return self.got[kind]

    def stats(self) -> dict:
        """A stats round trip on this socket: what it sent before has been carried out."""
        n = len(self.got["stats"])
        send(self.sock, "stats")
        return self.until("stats", n + 1)[-1].body


def worker_hello(s: zmq.Socket, table=()) -> Inbox:
    send(s, "hello", {"pid": 1, "limit": 2, "table": list(table), "base": 0, "serves": True})
    inbox = Inbox(s)
    inbox.until("snapshot")
    Inbox.beating.append(s)
    return inbox


def conn_map(stats: dict) -> Dict[str, int]:
    return {w: v["connections"] for w, v in stats["workers"].items()}


# -- the cluster with CURVE ------------------------------------------------------
def test_a_curve_cluster_serves_rpc_and_a_client_key_handle_sends(cluster):
    with serve_process(APP, workers=1, extra=["--broker", cluster.endpoint,
                                              *cluster.keys("w1")]) as sp:
        sp.wait_line(r"joined broker tcp://.* with CURVE")
        c = WseClient(sp.url, rpc_timeout=10 * UNIT)
        got = []
        c.channel.on("notice", got.append)
        c.connect("alice")
        assert c.call("pid") == c.call("pid")  # RPC through the worker
        with cluster.handle("watch") as watcher, cluster.handle("cron") as handle:
            wait_for(lambda: "alice" in watcher.clients)  # an observer key reads the map
            handle.send("alice", "notice", {"text": "export ready"})
            handle.broadcast("notice", "to all")
            stats = cluster.stats("cron")
            # a client key may not: refused at once, saying why
            with pytest.raises(WseError) as err:
                _ = handle.clients
            assert err.value.code == WSE_ERROR.NOT_ALLOWED
            assert "may not send 'lookup'" in err.value.details["reason"]
        wait_for(lambda: len(got) == 2)
        assert got == [{"text": "export ready"}, "to all"]
        roles = sorted(v["role"] for v in stats["workers"].values())
        assert roles == ["client", "observer", "worker"], stats
        assert stats["users"] == 1 and stats["connections"] == 1
        assert not [k for k in stats["counters"] if k.startswith("refused")], stats
        c.close()
    assert "Traceback" not in sp.stderr


def test_a_worker_with_an_unknown_key_is_refused_and_never_gets_a_byte(cluster):
    rogue = cluster.dealer("rogue", b"w-rogue")
    send(rogue, "hello", {"pid": 1, "table": [["x", "eve", None, 1.0]]})
    wait_for(lambda: cluster.stats()["counters"].get("refused.unknown-key", 0) >= 1,
             timeout=10 * UNIT, interval=0.1)
    # a second try with the same key: counted, not logged again
    again = cluster.dealer("rogue", b"w-rogue-2")
    send(again, "hb")
    wait_for(lambda: cluster.stats()["counters"].get("refused.unknown-key", 0) >= 2,
             timeout=10 * UNIT, interval=0.1)
    assert not rogue.poll(0) and not again.poll(0)  # no snapshot, no reset: nothing
    stats = cluster.stats()
    assert "w-rogue" not in stats["workers"] and stats["connections"] == 0
    assert len(cluster.proc.wait_line(r"unknown CURVE key")) == 1
    # connect_cluster with that key fails at once, saying why
    with pytest.raises(WseError) as err:
        cluster.handle("rogue")
    assert err.value.code == WSE_ERROR.BROKER_UNAVAILABLE
    assert "refused this key" in err.value.details["reason"]
    # and so does a keyless one
    with pytest.raises(WseError) as err:
        connect_cluster(cluster.endpoint, timeout=10 * UNIT)
    assert "needs this side's keys" in err.value.details["reason"]


def test_serve_with_a_wrong_key_logs_the_refusal(cluster):
    with serve_process(APP, workers=1, extra=["--broker", cluster.endpoint,
                                              *cluster.keys("rogue")]) as sp:
        sp.wait_line(r"the broker refused this key")
        assert cluster.stats()["workers"] == {}
    assert "Traceback" not in sp.stderr


def test_a_client_key_may_not_join_leave_or_call(cluster):
    w1 = cluster.dealer("w1", b"w1")
    w1_in = worker_hello(w1)
    send(w1, "join", {"req": 1, "conn_id": "cA", "cid": "alice", "limit": 2, "at": 1.0})
    w1_in.until("joined")
    handle = cluster.dealer("cron", b"client-raw")
    inbox = Inbox(handle)
    # a hello asking for the map (the default) gets none: no user id, conn_id or meta
    send(handle, "hello", {"pid": 2, "table": [], "serves": False})
    assert inbox.until("snapshot")[0].body["entries"] == []
    send(handle, "lookup", {"req": 5, "all": True})
    assert "refused" in inbox.until("users")[0].body
    send(handle, "join", {"req": 1, "conn_id": "cM", "cid": "mallory"})
    send(handle, "leave", {"conn_id": "cA", "cid": "alice", "code": 1000, "reason": ""})
    send(handle, "call", {"call": 1, "conn_id": "cA", "rp": "whoami"})
    send(handle, "conn_drop", {"conn_id": "cA", "reason": "x", "seq": 1})
    stats = inbox.stats()
    assert stats["counters"]["refused.role"] == 5, stats
    assert not inbox.got["delta"]
    assert conn_map(stats) == {"w1": 1, "client-raw": 0} and stats["users"] == 1
    assert not inbox.got["joined"] and not inbox.got["left"] and not inbox.got["result"]
    # the worker got no drop and no call
    w1_in.stats()
    assert not w1_in.got["drop"] and not w1_in.got["call"]
    # what a handle may do still works
    send(handle, "send", {"cid": "alice", "seq": 1}, '["hi",null,null]')
    assert w1_in.until("deliver")[0].data == '["hi",null,null]'
    # and a handle made by connect_cluster() with that key is refused the same way
    with cluster.handle("cron") as h:
        h.send("alice", "hi", 2)
    w1_in.until("deliver", 2)


def test_forged_commands_leave_the_map_unchanged(cluster):
    w1 = cluster.dealer("w1", b"w1")
    w1_in = worker_hello(w1)
    send(w1, "join", {"req": 1, "conn_id": "cA", "cid": "alice", "limit": 1, "at": 1.0})
    w1_in.until("joined")
    w2 = cluster.dealer("w2", b"w2")
    w2_in = worker_hello(w2, [["cB", "bob", None, 2.0]])
    # w2 (a worker key) forges: a join taking alice's connection (it would evict it),
    # a leave of a connection it does not hold, a table claiming cA
    send(w2, "join", {"req": 9, "conn_id": "cA", "cid": "alice", "limit": 1, "at": 9.0})
    send(w2, "leave", {"conn_id": "cA", "cid": "alice", "code": 1000, "reason": ""})
    stats = w2_in.stats()
    assert stats["counters"]["refused.conn-taken"] == 1
    assert stats["counters"]["refused.not-holder"] == 1
    assert conn_map(stats) == {"w1": 1, "w2": 1} and stats["users"] == 2
    w2_in.until("stats")
    assert not w2_in.got["joined"] and not w2_in.got["left"]
    # a result for a call it was not asked: w1 calls bob on w2, w3 answers in its name
    w3 = cluster.dealer("w1", b"w3")  # another worker holding w1's key
    w3_in = worker_hello(w3)
    send(w1, "call", {"call": 7, "conn_id": "cB", "rp": "whoami", "timeout": 5})
    assert w2_in.until("call")[0].body["origin"] == "w1"
    send(w3, "result", {"call": 7, "origin": "w1", "ok": True, "value": "forged"})
    assert w3_in.stats()["counters"]["refused.not-holder"] == 2
    send(w2, "result", {"call": 7, "origin": "w1", "ok": True, "value": "bob here"})
    assert [m.body["value"] for m in w1_in.until("result")] == ["bob here"]
    # a client key's hello spoofing a table (deltas to everyone): refused
    spoof = cluster.dealer("cron", b"spoofer")
    spoof_in = Inbox(spoof)
    send(spoof, "hello", {"pid": 3, "table": [["cE", "eve", None, 3.0], ["cA", "alice", None, 0.1]]})
    stats = spoof_in.stats()
    assert stats["counters"]["refused.role"] == 1
    assert conn_map(stats) == {"w1": 1, "w2": 1, "w3": 0} and stats["users"] == 2
    # nobody was dropped or told of a change
    for inbox in (w1_in, w2_in, w3_in):
        inbox.stats()
        assert not inbox.got["drop"]
        assert all(not m.body.get("remove") and all(e[0] != "cE" for e in m.body.get("add", []))
                   for m in inbox.got["delta"])
    # a client key taking a worker's identity to say bye in its name: refused
    w1.close(0)
    cluster.socks.remove(w1)
    watcher = Inbox(cluster.dealer("cron", b"watcher"))
    impostors = []

    def taken():
        # While the broker's ROUTER still holds w1's old link it ignores a new
        # link claiming "w1" and may attach it later under another identity,
        # so every try is a fresh connection.
        if impostors:
            impostors[-1].close(0)
            cluster.socks.remove(impostors[-1])
        impostor = cluster.dealer("cron", b"w1")
        impostors.append(impostor)
        send(impostor, "bye")
        send(impostor, "hello", {"pid": 4, "table": []})
        stats = watcher.stats()
        # (>= 1: once refused, the broker drops w1 at once; whether the bye or the
        # hello is the one that gets through first depends on when the old link ends)
        return stats if stats["counters"].get("refused.identity-taken", 0) >= 1 else None

    wait_for(taken, interval=0.1)
    # the bye was not carried out (w1 itself is gone: the broker drops it after
    # 3 s of silence, which is another line)
    assert not [line for line in cluster.proc.lines if "w1 leaves the cluster" in line]
    assert "Traceback" not in cluster.proc.stderr


def _connected(cluster: Cluster, name: str, identities: List[str]) -> List[zmq.Socket]:
    """DEALERs holding key ``name`` under ``identities``, once their CURVE
    handshakes are done (each one's monitor says so)."""
    socks, monitors = [], []
    for identity in identities:
        s = cluster.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IDENTITY, identity.encode())
        s.curve_serverkey = zmq.auth.load_certificate(cluster.broker_key)[0]
        s.curve_publickey, s.curve_secretkey = zmq.auth.load_certificate(cluster.secret[name])
        monitors.append(s.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED))
        s.connect(cluster.endpoint)
        cluster.socks.append(s)
        socks.append(s)
    for s, monitor in zip(socks, monitors):
        assert monitor.poll(int(10 * UNIT * 1000)), "no CURVE handshake"
        s.disable_monitor()
        monitor.close(0)
    return socks


def test_a_peer_under_a_workers_name_gets_none_of_its_traffic(cluster):
    """Last round's residual, retried: a worker's link drops while the broker
    still routes to it (up to 3 s); peers holding another allowed key connect
    under that worker's name, bare or with a guessed nonce, while its user is
    sent to: none of them receives a byte. The worker's next link (its key, a
    new nonce) gets its traffic back."""
    w1 = cluster.dealer("w1", link_identity("w1").encode())  # as BrokerLink does
    w1_in = worker_hello(w1)
    send(w1, "join", {"req": 1, "conn_id": "cA", "cid": "alice", "limit": 2, "at": 1.0})
    w1_in.until("joined")
    watcher = Inbox(cluster.dealer("cron", b"watcher"))  # (stats without a subprocess)
    with cluster.handle("cron") as sender:
        # the handle's own link: a nonce after its name, which stats never shows
        identity = sender._server.hub.link.sock.getsockopt(zmq.IDENTITY).decode()
        assert member_of(identity) != identity
        shown = watcher.stats()
        assert member_of(identity) in shown["workers"] and identity not in json.dumps(shown)
        send(w1, "hb")
        w1.close(0)  # w1's link drops; the broker lists it for 3 s more
        cluster.socks.remove(w1)
        Inbox.beating.remove(w1)
        intruders = _connected(cluster, "cron", ["w1", f"w1#{'a' * 16}"]
                               + [link_identity("w1") for _ in range(6)])
        for attempt in range(4):
            sender.send("alice", "secret", attempt)
        sender.flush()
        # the broker routed those sends to w1: still listed, holding alice
        stats = watcher.stats()
        assert stats["workers"].get("w1", {}).get("connections") == 1, stats["workers"]
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            for s in intruders:
                assert not s.poll(0), f"{s.getsockopt(zmq.IDENTITY)!r} got a message"
            time.sleep(0.05)
        # (an intruder that speaks in w1's name is refused, and w1 is not removed for it)
        send(intruders[0], "bye")
        wait_for(lambda: watcher.stats()["counters"].get("refused.identity-taken", 0) >= 1)
        assert "w1" in watcher.stats()["workers"]
        # w1 back on a new socket with its key: its traffic follows
        back = cluster.dealer("w1", link_identity("w1").encode())
        back_in = worker_hello(back, [["cA", "alice", None, 1.0]])
        sender.send("alice", "after", 9)
        assert back_in.until("deliver")[-1].data is not None
    assert not any(s.poll(0) for s in intruders)


def test_malformed_and_oversize_frames_are_dropped(tmp_path):
    c = Cluster(tmp_path, extra=["--max-msg-size", "100000"])
    try:
        w1 = c.dealer("w1", b"w1")
        w1_in = worker_hello(w1)
        send(w1, "join", {"req": 1, "conn_id": "x" * 500, "cid": "u"})
        send(w1, "join", {"req": 2, "conn_id": "c", "cid": {"not": "an id"}})
        stats = w1_in.stats()
        assert stats["counters"]["dropped.oversize"] == 1
        assert stats["counters"]["dropped.malformed"] == 1
        # a frame over --max-msg-size: the peer is cut before it is read
        big = c.dealer("w2", b"w2")
        send(big, "bcast", {"seq": 1}, "x" * 200000)
        w1_in.stats()
        assert not w1_in.got["deliver"] and c.stats()["counters"].get("in.bcast", 0) == 0
    finally:
        c.close()


def test_sighup_reloads_the_allowed_keys(cluster):
    late = make_keys(cluster.root, "late")
    with pytest.raises(WseError):
        connect_cluster(cluster.endpoint, broker_key=cluster.broker_key, secret=late["late"],
                        timeout=10 * UNIT)
    allow(cluster.workers_dir, cluster.root, "late")
    cluster.proc.proc.send_signal(signal.SIGHUP)
    cluster.proc.wait_line(r"CURVE: 3 worker key\(s\)")
    with connect_cluster(cluster.endpoint, broker_key=cluster.broker_key, secret=late["late"],
                         timeout=10 * UNIT) as h:
        assert h.clients == {}
    # revoked: a connection already made loses its rights at once
    w2 = cluster.dealer("w2", b"w2")
    w2_in = worker_hello(w2)
    os.remove(os.path.join(cluster.workers_dir, "w2.key"))
    cluster.proc.proc.send_signal(signal.SIGHUP)
    cluster.proc.wait_line(r"CURVE: 2 worker key\(s\)", count=2)  # at start, and now
    send(w2, "stats")
    wait_for(lambda: cluster.stats()["counters"].get("refused.revoked-key", 0) >= 1,
             timeout=10 * UNIT, interval=0.1)
    # nothing answers it: what it still gets is the broker's heartbeat, until
    # the broker drops the silent worker
    late_kinds = set()
    while w2.poll(0):
        late_kinds.update(decode(part).kind for part in split(w2.recv_multipart()))
    assert not w2_in.got["stats"] and late_kinds <= {"hb"}


# -- without CURVE ------------------------------------------------------------------
def test_a_tcp_broker_without_keys_refuses_to_start():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    out = subprocess.run([sys.executable, "-m", "wse_sync", "broker", "--bind", endpoint],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "needs CURVE keys" in out.stderr and "--insecure" in out.stderr
    assert "Traceback" not in out.stderr


def test_an_insecure_broker_warns_and_serves():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    broker = ServerProcess(["broker", "--bind", endpoint, "--insecure"])
    try:
        line = broker.wait_line(r"WITHOUT CURVE")[0]
        assert "WARNING" in line and endpoint in line
        with connect_cluster(endpoint, timeout=10 * UNIT) as h:
            assert h.clients == {}
        assert broker.stop() == 0
    finally:
        broker.stop()
    assert "Traceback" not in broker.stderr


def test_the_ipc_socket_is_0600_in_a_0700_directory_and_removed_on_stop(tmp_path):
    run_dir = tmp_path / "run" / "wse"
    path = run_dir / "broker.sock"
    old = os.umask(0)  # the broker inherits the loosest umask
    try:
        broker = ServerProcess(["broker", "--bind", f"ipc://{path}"])
    finally:
        os.umask(old)
    try:
        broker.wait_line(r"broker listening on ipc://")
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700
        with connect_cluster(f"ipc://{path}", timeout=10 * UNIT) as h:  # no keys on ipc
            assert h.clients == {}
        assert broker.stop() == 0
    finally:
        broker.stop()
    assert not path.exists()
    assert "Traceback" not in broker.stderr


def test_keys_are_pyzmq_certificates(tmp_path):
    secret = make_keys(tmp_path / "k", "node")["node"]
    public_path = secret[: -len("_secret")]
    public, none = zmq.auth.load_certificate(public_path)
    assert none is None and len(public) == 40
    assert zmq.auth.load_certificate(secret) == (public, zmq.auth.load_certificate(secret)[1])
    assert zmq.curve_public(zmq.auth.load_certificate(secret)[1]) == public
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "k").st_mode) == 0o700
    again = subprocess.run([sys.executable, "-m", "wse_sync", "keys", "node", "--dir",
                            str(tmp_path / "k")], capture_output=True, text=True, timeout=30)
    assert again.returncode == 2 and "exists" in again.stderr


GREEN_BROKER = r"""
import sys
from gevent import monkey
monkey.patch_all()
import gevent
import zmq.green as zmq
from wse_sync import connect_cluster
from wse_sync.cluster.broker import Broker
from wse_sync.cluster.curve import server_curve

endpoint, secret, workers, clients, broker_key, cron, rogue = sys.argv[1:]
broker = Broker(endpoint, zmq, curve=server_curve(endpoint, secret, workers, clients))
broker.bind()
loop = gevent.spawn(broker.run)
with connect_cluster(endpoint, broker_key=broker_key, secret=cron, timeout=10) as handle:
    handle.broadcast("x", 1)
    print("client ok", handle.background)
try:
    connect_cluster(endpoint, broker_key=broker_key, secret=rogue, timeout=10)
except Exception as exc:
    print("rogue refused", exc.details["reason"][:27])
print(sorted(k for k in broker.core.counters if k.startswith(("refused", "in."))))
broker.stop()
loop.join(5)
"""


def test_zap_is_served_by_a_green_broker_under_monkey_patching(tmp_path):
    """The broker in a greenlet of a monkey-patched process (zmq.green), with a
    handle in the same hub: ZAP answers from the broker's own loop."""
    root = tmp_path / "keys"
    secret = make_keys(root, "broker", "cron", "rogue")
    workers = allow(tmp_path / "workers", root)
    clients = allow(tmp_path / "clients", root, "cron")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    out = subprocess.run([sys.executable, "-c", GREEN_BROKER, endpoint, secret["broker"],
                          workers, clients, os.path.join(str(root), "broker.key"),
                          secret["cron"], secret["rogue"]],
                         capture_output=True, text=True, timeout=50)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:2] == ["client ok False", "rogue refused the broker refused this key"], \
        out.stdout + out.stderr
    counters = ast.literal_eval(lines[2])  # a list of counter names
    assert {"in.hello", "in.bcast", "in.bye", "refused.unknown-key"} <= set(counters), counters
    assert "Traceback" not in out.stderr


def test_faults_with_curve_on_worker_killed_then_broker_killed(cluster, tmp_path):
    """kill -9 of a worker, then of the broker, on CURVE links: 'left' fires on
    the survivor, and a restarted broker (same keys) gets the map back."""
    extra = ["--broker", cluster.endpoint]
    with serve_process(APP, extra=extra + cluster.keys("w1")) as sp1, \
            serve_process(APP, extra=extra + cluster.keys("w2")) as sp2:
        a = WseClient(sp1.url, rpc_timeout=10 * UNIT)
        b = WseClient(sp2.url, rpc_timeout=10 * UNIT, reconnect=True)
        evs = []
        b.channel.on("ev", evs.append)
        a.connect("alice")
        b.connect("bob")
        wait_for(lambda: cluster.stats()["users"] == 2, timeout=10 * UNIT, interval=0.1)
        os.kill(a.call("pid"), signal.SIGKILL)
        wait_for(lambda: any(e[:2] == ["left", "alice"] for e in evs), timeout=20 * UNIT)
        left = next(e for e in evs if e[:2] == ["left", "alice"])
        assert left[3:] == [1006, "wse.worker-died"]
        wait_for(lambda: cluster.stats()["users"] == 1, timeout=10 * UNIT, interval=0.1)
        # the broker dies and comes back on the same port with the same keys
        cluster.proc.proc.send_signal(signal.SIGKILL)
        cluster.proc.proc.wait(10)
        cluster.proc = ServerProcess(
            ["broker", "--bind", cluster.endpoint, "--sync-window", "0.5",
             "--curve-secret", cluster.secret["broker"], "--allow-workers", cluster.workers_dir,
             "--allow-clients", cluster.clients_dir])
        cluster.proc.wait_line(r"broker listening on .* with CURVE")
        wait_for(lambda: cluster.stats()["connections"] == 1, timeout=20 * UNIT, interval=0.2)
        assert b.call("pid") > 0            # bob was served throughout
        a.close()
        b.close()
    assert "Traceback" not in sp1.stderr + sp2.stderr


def _netns_available() -> Optional[str]:
    """None when two network namespaces joined by a veth pair can be made, else why not."""
    if os.geteuid() != 0:
        return "needs root (ip netns)"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    name = f"wseprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True,
                          timeout=10)
    if made.returncode != 0:
        return "cannot make a network namespace: " + made.stderr.strip()
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
    return None


def test_broker_and_worker_in_two_network_namespaces(tmp_path):
    """A CURVE link over a real (veth) network between two namespaces: the
    broker in one, `serve` and its client in the other."""
    why = _netns_available()
    if why is not None:
        pytest.skip(why)
    tag = str(os.getpid() % 100000)
    ns_b, ns_w, v_b, v_w = f"wseb{tag}", f"wsew{tag}", f"veb{tag}", f"vew{tag}"

    def run(*argv: str) -> None:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=20)
        assert done.returncode == 0, (argv, done.stderr)

    procs: List[subprocess.Popen] = []
    try:
        run("ip", "netns", "add", ns_b)
        run("ip", "netns", "add", ns_w)
        run("ip", "link", "add", v_b, "type", "veth", "peer", "name", v_w)
        for ns, dev, addr in ((ns_b, v_b, "10.231.0.1/30"), (ns_w, v_w, "10.231.0.2/30")):
            run("ip", "link", "set", dev, "netns", ns)
            run("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
        root = tmp_path / "keys"
        secret = make_keys(root, "broker", "w1", "cron")
        workers = allow(tmp_path / "workers", root, "w1")
        observers = allow(tmp_path / "observers", root, "cron")  # (it reads clients)
        broker_key = os.path.join(str(root), "broker.key")
        endpoint = "tcp://10.231.0.1:5599"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        broker = subprocess.Popen(
            ["ip", "netns", "exec", ns_b, sys.executable, "-m", "wse_sync", "broker", "--bind",
             endpoint, "--sync-window", "0", "--curve-secret", secret["broker"],
             "--allow-workers", workers, "--allow-observers", observers],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        procs.append(broker)
        serve = subprocess.Popen(
            ["ip", "netns", "exec", ns_w, sys.executable, "-m", "wse_sync", "serve", APP,
             "--host", "127.0.0.1", "--port", "4201", "--workers", "1", "--broker", endpoint,
             "--broker-key", broker_key, "--curve-secret", secret["w1"]],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        procs.append(serve)
        # a client inside the workers' namespace, a handle inside the broker's
        client = ("import sys, time; from wse_sync import WseClient\n"
                  "deadline = time.monotonic() + 30\n"
                  "while True:\n"
                  "    try:\n"
                  "        c = WseClient('ws://127.0.0.1:4201/', rpc_timeout=10)\n"
                  "        c.connect('netns-user'); break\n"
                  "    except Exception:\n"
                  "        if time.monotonic() > deadline: raise\n"
                  "        time.sleep(0.2)\n"
                  "print(c.call('pid'), flush=True)\n"
                  "sys.stdin.readline()\n")
        user = subprocess.Popen(["ip", "netns", "exec", ns_w, sys.executable, "-c", client],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env=env, cwd=ROOT)
        procs.append(user)
        assert int(user.stdout.readline()) > 0          # served, through the CURVE link
        look = ("from wse_sync import connect_cluster\n"
                f"h = connect_cluster({endpoint!r}, broker_key={broker_key!r},"
                f" secret={secret['cron']!r}, timeout=20)\n"
                "import time; deadline = time.monotonic() + 20\n"
                "while 'netns-user' not in h.clients and time.monotonic() < deadline:\n"
                "    time.sleep(0.1)\n"
                "print(sorted(h.clients)); h.close()\n")
        seen = subprocess.run(["ip", "netns", "exec", ns_b, sys.executable, "-c", look],
                              capture_output=True, text=True, timeout=60, env=env)
        assert seen.stdout.strip() == "['netns-user']", seen.stderr
        user.stdin.write("\n")
        user.stdin.flush()
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        for ns in (ns_b, ns_w):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


# -- shards with a key pair each ------------------------------------------------
def test_split_keys_gives_one_key_per_shard():
    from wse_sync.cluster.curve import CurveError, split_keys
    assert split_keys(None, 2) == [None, None]
    assert split_keys("a.key", 3) == ["a.key"] * 3
    assert split_keys("a.key, b.key", 2) == ["a.key", "b.key"]
    assert split_keys(["a.key", "b.key"], 2) == ["a.key", "b.key"]
    with pytest.raises(CurveError, match="3 broker keys for 2 broker"):
        split_keys("a,b,c", 2)


def test_two_curve_shards_with_their_own_keys(tmp_path):
    root = tmp_path / "keys"
    secret = make_keys(root, "shard0", "shard1", "w1", "cron")
    workers, clients = allow(tmp_path / "w", root, "w1"), allow(tmp_path / "c", root, "cron")
    endpoints = [f"tcp://127.0.0.1:{free_port()}" for _ in range(2)]
    brokers = [ServerProcess(["broker", "--bind", ep, "--shard", f"{i}/2", "--sync-window", "0",
                              "--curve-secret", secret[f"shard{i}"], "--allow-workers", workers,
                              "--allow-clients", clients])
               for i, ep in enumerate(endpoints)]
    both = ",".join(endpoints)
    keys = ",".join(os.path.join(str(root), f"shard{i}.key") for i in range(2))
    try:
        for b in brokers:
            b.wait_line(r"broker listening on .* with CURVE")
        # shard 0's key for both: shard 1 cannot read the handshake, never answers
        with serve_process(APP, 1, ["--broker", both, "--curve-secret", secret["w1"],
                                    "--broker-key", keys.split(",")[0]]) as sp:
            wait_for(lambda: _health(sp.port).get("shards") == ["up", "away"],
                     timeout=15 * UNIT)
        # the wrong number of keys is said before anything starts
        bad = subprocess.run([sys.executable, "-m", "wse_sync", "serve", APP, "--broker", both,
                              "--broker-key", keys + "," + keys, "--curve-secret",
                              secret["w1"]], capture_output=True, text=True, timeout=30 * UNIT)
        assert bad.returncode == 2 and "4 broker keys for 2 broker(s)" in bad.stderr, bad.stderr
        # a key per shard, in the list's order
        with serve_process(APP, 1, ["--broker", both, "--broker-key", keys,
                                    "--curve-secret", secret["w1"]]) as sp:
            sp.wait_line(r"joined broker tcp://.* with CURVE", count=2)
            wait_for(lambda: _health(sp.port).get("shards") == ["up", "up"])
            users = {}
            for i in range(2):
                cid = f"k{i}"
                while not _on_shard(cid, i):
                    cid += "x"
                c = WseClient(sp.url, rpc_timeout=10 * UNIT)
                c.connect(cid)
                users[cid] = c
            out = wait_for(lambda: (lambda o: o if o.returncode == 0 and json.loads(
                o.stdout)["users"] == 2 else None)(subprocess.run(
                    [sys.executable, "-m", "wse_sync", "stats", "--broker", both, "--broker-key",
                     keys, "--curve-secret", secret["cron"]], capture_output=True, text=True,
                    timeout=30 * UNIT)), timeout=10 * UNIT)
            assert [a["users"] for a in json.loads(out.stdout)["shards"]] == [1, 1]
            for c in users.values():
                c.close()
            assert "Traceback" not in sp.stderr
    finally:
        for b in brokers:
            b.stop()
            assert "Traceback" not in b.stderr


def _health(port: int) -> dict:
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5 * UNIT) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())


def _on_shard(cid: str, shard: int) -> bool:
    from wse_sync.core.shards import shard_of
    return shard_of(cid, 2) == shard
