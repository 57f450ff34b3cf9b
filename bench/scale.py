"""The scale harness: fake workers against one real broker process.

    python bench/scale.py --quick              # 20k and 50k users, about 2 minutes
    python bench/scale.py                      # 100k, 250k, 500k, 1M users
    python bench/scale.py --users 200000 --w32-users 20000 --markdown

Each fake worker is a ``wse_sync.core.link.LinkCore`` (the worker's real
protocol code: hello, reset, snapshot, delta, acks, heartbeats) on a plain
pyzmq DEALER socket, all of them driven by one poll loop in this process
(no gevent). Its connection table is a dict; only the worker that starts
late (``H``) keeps the replica of the map (``MapReplica``), the others keep
none, so the harness itself stays small. The broker is a real
``python -m wse_sync broker`` process on an ipc:// endpoint, every process
wrapped in coreutils ``timeout`` and killed in ``finally``.

For each N (users held; one connection per user):

- **load**: a fresh broker (``--sync-window 0``); W=2 fake workers say hello
  with N/2 connections each; seconds until both have their snapshot.
- **joins/s**: new users joined through the broker (64 joins in flight per
  worker) for a few seconds at N, with W=2; the broker's CPU per join (from
  /proc/<pid>/stat) is the capacity figure, the wall rate is bounded by this
  one harness process sharing the machine.
- **send/s**: routed ``send`` commands from one worker to users of the other
  (32 commands per ZeroMQ message, as a busy worker batches), counted when
  delivered; and the broker's CPU per send.
- **hello**: worker H starts beside the N users: seconds until it has the
  whole map, the hellos it had to send, and workers the broker removed
  meanwhile (a worker it thought dead).
- **restart**: ``kill -9`` of the broker, a new one on the same endpoint
  (``--sync-window 2.5``); seconds from its start until every fake worker
  has a snapshot of the new broker and the broker's ``stats`` equals the
  union of the tables (users, connections, and connections per worker), with
  the ``left``/``joined``/``drop`` the workers got meanwhile (spurious: none
  should come) and the workers removed.
- broker RSS after the load and at the end, its CPU seconds over the whole
  N, and H's replica size in bytes per user (a deep ``sys.getsizeof``).

Then joins/s with W = 2, 8, 16 and 32 lean workers (and 32 keeping replicas)
on a fresh broker holding ``--w32-users`` users, 256 joins in flight in all,
then W = 2 and 32 with 2,048 in flight.

``--core-gc`` also measures BrokerCore's join cost in-process at 10k and
1M users, with the default GC and with the broker's GC tuning.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

import zmq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path and not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, ROOT)

from wse_sync.core.link import Answer, Deliver, Drop, LinkCore, UserJoined, UserLeft  # noqa: E402
from wse_sync.core.messages import batch, decode, encode, split  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
FRAME = '["msg",' + '"' + "x" * 50 + '",null]'  # a 64-byte packed frame
HEARTBEAT = 1.0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class NullView:
    """The replica of a fake worker that keeps none."""

    def __init__(self) -> None:
        self.users: Dict[Any, Any] = {}

    def load(self, entries: List[List[Any]]) -> None:
        pass

    def apply(self, add: List[List[Any]], remove: List[str]) -> List[Any]:
        return []

    def meta_of(self, cid: Any) -> Any:
        return None


def view_bytes(view: Any) -> int:
    """Deep size of a MapReplica (containers, keys, tuples, strings; shared objects once)."""
    seen = set()
    total = 0

    def add(obj: Any) -> None:
        nonlocal total
        if id(obj) in seen:
            return
        seen.add(id(obj))
        total += sys.getsizeof(obj)

    for d in (view.users, getattr(view, "_cid_of", {})):
        add(d)
        for k, v in d.items():
            add(k)
            if isinstance(v, dict):
                add(v)
                for k2, v2 in v.items():
                    add(k2)
                    add(v2)
                    if isinstance(v2, tuple):
                        for x in v2:
                            add(x)
            else:
                add(v)
    return total


class Fake:
    """One fake worker: a LinkCore, its table, a DEALER socket."""

    def __init__(self, ctx: zmq.Context, endpoint: str, wid: str, keep_view: bool = False,
                 replica: Optional[bool] = None) -> None:
        self.id = wid
        self.table: Dict[str, tuple] = {}  # conn_id -> (cid, meta, joined_at)
        # a replica (snapshot and deltas) when it keeps the view, unless told
        self.core = LinkCore(wid, self.entries, None, pid=os.getpid(), broker_timeout=3.0,
                             now=time.monotonic(),
                             replica=keep_view if replica is None else replica)
        if not keep_view:
            self.core.view = NullView()
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, wid.encode())
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.connect(endpoint)
        self.out: List[List[bytes]] = []
        self.next_hb = time.monotonic() + HEARTBEAT
        self.hellos = 0
        self.events = {"left": 0, "joined": 0, "drop": 0, "reset": 0}
        self.delivered = 0
        self.syncs = 0            # complete snapshots received
        self.joins: Dict[int, tuple] = {}  # req -> (conn_id, cid)
        self.joined = 0

    def entries(self):
        return [(c, cid, meta, at) for c, (cid, meta, at) in self.table.items()]

    def queue(self, messages) -> None:
        for m in messages:
            if m.kind == "hello":
                self.hellos += 1
            self.out.append(encode(m.kind, m.body, m.data))

    def flush(self) -> None:
        """As the worker's link does: at most 1000 messages or 1 MiB per ZeroMQ message."""
        chunk: List[List[bytes]] = []
        size = 0
        for frames in self.out:
            chunk.append(frames)
            size += sum(len(f) for f in frames)
            if len(chunk) >= 1000 or size >= 1 << 20:
                self.sock.send_multipart(batch(chunk))
                chunk, size = [], 0
        if chunk:
            self.sock.send_multipart(batch(chunk))
        self.out = []

    def hello(self) -> None:
        self.queue(self.core.hello())
        self.flush()

    def on_frames(self, frames: List[bytes], now: float) -> None:
        self.queue(self.core.received(now))
        for part in split(frames):
            msg = decode(part)
            if msg.kind == "reset":
                self.events["reset"] += 1
            before = getattr(self.core, "syncs", None)
            step = self.core.handle(msg, now)
            if msg.kind == "snapshot":
                if before is not None:
                    self.syncs += self.core.syncs - before
                elif "of" not in msg.body or msg.body.get("part") == msg.body["of"] - 1:
                    self.syncs += 1
            self.queue(step.out)
            for e in step.effects:
                if isinstance(e, Answer):
                    pending = self.joins.pop(e.req, None)
                    if pending is not None:
                        conn_id, cid = pending
                        self.core.join_answered(e.req, conn_id, cid, None, e.body)
                        self.table[conn_id] = (cid, None, now)
                        self.joined += 1
                    else:
                        self.core.call_done(e.req)
                elif isinstance(e, Deliver):
                    self.delivered += 1
                elif isinstance(e, UserLeft):
                    self.events["left"] += 1
                elif isinstance(e, UserJoined):
                    self.events["joined"] += 1
                elif isinstance(e, Drop):
                    self.events["drop"] += 1

    def start_join(self, conn_id: str, cid: Any, now: float) -> None:
        j = self.core.join(conn_id, cid, None, now, [], None)
        if j.req is None:  # broker away: decided locally
            self.table[conn_id] = (cid, None, now)
            return
        self.joins[j.req] = (conn_id, cid)
        self.queue(j.out)


class Harness:
    def __init__(self, python: str, workdir: str, deadline: float, log) -> None:
        self.python = python
        self.workdir = workdir
        self.endpoint = f"ipc://{workdir}/broker.sock"
        self.ctx = zmq.Context()
        self.fakes: List[Fake] = []
        self.broker: Optional[subprocess.Popen] = None
        self.deadline = deadline
        self.log = log
        self._stats_sock: Optional[zmq.Socket] = None

    # -- processes ------------------------------------------------------
    def start_broker(self, sync_window: float) -> None:
        remaining = max(10, int(self.deadline - time.monotonic()))
        env = dict(os.environ)
        self.broker_log = open(os.path.join(self.workdir, "broker.log"), "ab")
        self.broker = subprocess.Popen(
            ["timeout", "-s", "KILL", str(remaining), self.python, "-m", "wse_sync", "broker",
             "--bind", self.endpoint, "--sync-window", str(sync_window), "--log-level",
             "warning"], env=env, stdout=self.broker_log, stderr=subprocess.STDOUT)
        # the pid of the broker itself (timeout's child)
        self.broker_pid = self._child_of(self.broker.pid)

    def _child_of(self, pid: int) -> int:
        for _ in range(200):
            try:
                with open(f"/proc/{pid}/task/{pid}/children") as f:
                    kids = f.read().split()
                if kids:
                    return int(kids[0])
            except OSError:
                pass
            time.sleep(0.01)
        raise SystemExit("the broker did not start")

    def kill_broker(self) -> None:
        if self.broker is None:
            return
        try:
            os.kill(self.broker_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.broker.wait(10)
        self.broker = None

    def close_fakes(self) -> None:
        for f in self.fakes:
            f.sock.close(0)
        self.fakes = []
        if self._stats_sock is not None:
            self._stats_sock.close(0)
            self._stats_sock = None

    def stop(self) -> None:
        self.close_fakes()
        self.kill_broker()
        self.ctx.term()

    # -- the loop -----------------------------------------------------------
    def pump(self, seconds: float, until=None, work=None) -> bool:
        """Serve the fake workers for ``seconds`` or until ``until()`` is true."""
        end = time.monotonic() + seconds
        poller = zmq.Poller()
        by_sock = {}
        for f in self.fakes:
            poller.register(f.sock, zmq.POLLIN)
            by_sock[f.sock] = f
        while True:
            now = time.monotonic()
            if now > self.deadline:
                raise SystemExit("the harness ran out of time (--time-limit)")
            if until is not None and until():
                return True
            if now >= end:
                return False
            if work is not None:
                work(now)
            for f in self.fakes:
                f.flush()
            # read what waits before any fake worker judges the broker's silence
            for sock, _ in poller.poll(20):
                f = by_sock[sock]
                t_end = time.monotonic() + 0.2
                while time.monotonic() < t_end:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    f.on_frames(frames, time.monotonic())
                f.flush()
            now = time.monotonic()
            for f in self.fakes:
                if now >= f.next_hb:
                    f.next_hb = now + HEARTBEAT
                    f.queue(f.core.tick(now).out)

    def stats(self, timeout: float = 20.0) -> Optional[Dict[str, Any]]:
        if self._stats_sock is None:
            s = self._stats_sock = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.IDENTITY, b"stats-%d" % os.getpid())
            s.connect(self.endpoint)
        s = self._stats_sock
        while s.poll(0):
            s.recv_multipart()
        s.send_multipart(encode("stats", {}))
        got: List[Optional[Dict[str, Any]]] = [None]

        def answered() -> bool:
            if s.poll(0):
                for part in split(s.recv_multipart()):
                    m = decode(part)
                    if m.kind == "stats":
                        got[0] = m.body
            return got[0] is not None

        self.pump(timeout, answered)
        return got[0]

    def map_matches(self, st: Optional[Dict[str, Any]]) -> bool:
        if st is None:
            return False
        tables = {f.id: f.table for f in self.fakes}
        users = {cid for t in tables.values() for (cid, _m, _a) in t.values()}
        conns = sum(len(t) for t in tables.values())
        per = {w: i["connections"] for w, i in st["workers"].items()}
        return (st["users"] == len(users) and st["connections"] == conns
                and all(per.get(w, -1) == len(t) for w, t in tables.items()))

    # -- phases ------------------------------------------------------------
    def add_fakes(self, count: int, users: int, prefix: str, keep_view: bool = False,
                  start: int = 0, replica: Optional[bool] = None) -> List[Fake]:
        made = []
        per = users // count if count else 0
        at = time.time()
        n = start
        for i in range(count):
            f = Fake(self.ctx, self.endpoint, f"{prefix}{i}", keep_view, replica)
            for _ in range(per):
                f.table[f"c{n}"] = (f"u{n}", None, at)
                n += 1
            made.append(f)
        self.fakes += made
        return made

    def wait_synced(self, fakes: List[Fake], base: Dict[str, int], timeout: float) -> Optional[float]:
        t0 = time.monotonic()
        ok = self.pump(timeout, lambda: all(f.syncs > base.get(f.id, 0) for f in fakes))
        return time.monotonic() - t0 if ok else None

    def joins(self, fakes: List[Fake], seconds: float, window: int = 64) -> Dict[str, float]:
        ids = itertools.count()
        start_joined = sum(f.joined for f in fakes)

        def work(now: float) -> None:
            for f in fakes:
                while len(f.joins) < window:
                    n = next(ids)
                    f.start_join(f"j{f.id}-{n}", f"ju{f.id}-{n}", now)

        cpu0, t0 = cpu_seconds(self.broker_pid), time.monotonic()
        self.pump(seconds, work=work)
        # let the joins in flight finish (not counted in the rate)
        done_in_time = sum(f.joined for f in fakes) - start_joined
        elapsed = time.monotonic() - t0
        cpu = cpu_seconds(self.broker_pid) - cpu0
        self.pump(10, lambda: all(not f.joins for f in fakes))
        return {"rate": done_in_time / elapsed, "cpu_us": 1e6 * cpu / max(1, done_in_time)}

    def sends(self, sender: Fake, target: Fake, seconds: float, per_msg: int = 32,
              window: int = 4000) -> Dict[str, float]:
        cids = [cid for (cid, _m, _a) in itertools.islice(target.table.values(), 1000)]
        sent = [0]
        base = target.delivered
        cycle = itertools.cycle(cids)

        def work(now: float) -> None:
            while sent[0] - (target.delivered - base) < window:
                for _ in range(per_msg):
                    sender.queue(sender.core.command("send", {"cid": next(cycle)}, FRAME, now))
                sent[0] += per_msg
                sender.flush()

        cpu0, t0 = cpu_seconds(self.broker_pid), time.monotonic()
        self.pump(seconds, work=work)
        got = target.delivered - base
        elapsed = time.monotonic() - t0
        cpu = cpu_seconds(self.broker_pid) - cpu0
        self.pump(5, lambda: target.delivered - base >= sent[0])
        return {"rate": got / elapsed, "cpu_us": 1e6 * cpu / max(1, got)}


def run_n(h: Harness, n: int, args) -> Dict[str, Any]:
    row: Dict[str, Any] = {"users": n}
    h.start_broker(0)
    cpu_start = 0.0
    try:
        fakes = h.add_fakes(2, n, "w")
        t0 = time.monotonic()
        for f in fakes:
            f.hello()
        load = h.wait_synced(fakes, {}, args.settle_timeout)
        row["load_s"] = load
        st = h.stats()
        row["map_ok_after_load"] = h.map_matches(st)
        row["rss_load_mb"] = rss_mb(h.broker_pid)
        h.log(f"N={n}: loaded in {load} s, broker RSS {row['rss_load_mb']:.0f} MB")
        if load is None:
            return row
        j = h.joins(fakes, args.phase_seconds)
        row["joins_s"], row["join_cpu_us"] = j["rate"], j["cpu_us"]
        h.log(f"N={n}: joins {j['rate']:.0f}/s, broker {j['cpu_us']:.1f} us/join")
        s = h.sends(fakes[0], fakes[1], args.phase_seconds)
        row["sends_s"], row["send_cpu_us"] = s["rate"], s["cpu_us"]
        h.log(f"N={n}: sends {s['rate']:.0f}/s, broker {s['cpu_us']:.1f} us/send")
        # a new worker starts beside the N users
        removed0 = (h.stats() or {}).get("counters", {}).get("workers.removed", 0)
        newcomer = h.add_fakes(1, 0, "h", keep_view=True)[0]
        t0 = time.monotonic()
        newcomer.hello()
        hello = h.wait_synced([newcomer], {}, args.settle_timeout)
        row["hello_s"] = hello
        row["hello_count"] = newcomer.hellos
        st = h.stats()
        row["hello_removed"] = (st or {}).get("counters", {}).get("workers.removed", 0) - removed0
        if hello is not None:
            row["view_b_per_user"] = view_bytes(newcomer.core.view) / max(1, st["users"] if st else n)
        h.log(f"N={n}: hello settled in {hello} s ({newcomer.hellos} hello(s),"
              f" {row['hello_removed']} worker(s) removed)")
        # broker restart
        cpu_before_kill = cpu_seconds(h.broker_pid)
        h.kill_broker()
        for f in h.fakes:
            f.events = dict.fromkeys(f.events, 0)
        base = {f.id: f.syncs for f in h.fakes}
        h.start_broker(2.5)
        cpu_start = cpu_before_kill
        t0 = time.monotonic()
        synced = h.wait_synced(h.fakes, base, args.settle_timeout)
        settled = None
        st = None
        if synced is not None:
            while time.monotonic() - t0 < args.settle_timeout:
                st = h.stats()
                if h.map_matches(st):
                    settled = time.monotonic() - t0
                    break
                h.pump(0.2)
        row["restart_s"] = settled
        row["restart_cpu_s"] = cpu_seconds(h.broker_pid)
        row["restart_hellos"] = max(f.hellos for f in h.fakes)
        # no spurious events, also a little later
        h.pump(2.0)
        st = h.stats() or st
        row["restart_spurious"] = sum(f.events["left"] + f.events["joined"] + f.events["drop"]
                                      for f in h.fakes)
        row["restart_removed"] = (st or {}).get("counters", {}).get("workers.removed", 0)
        row["map_ok_end"] = h.map_matches(st)
        row["rss_end_mb"] = rss_mb(h.broker_pid)
        h.log(f"N={n}: restart settled in {settled} s, spurious {row['restart_spurious']},"
              f" removed {row['restart_removed']}, map ok {row['map_ok_end']}")
    finally:
        try:
            if h.broker is not None:
                row["broker_cpu_s"] = cpu_seconds(h.broker_pid) + cpu_start
        except OSError:
            pass
        h.close_fakes()
        h.kill_broker()
    return row


# (key, workers, replicas?, joins in flight per worker): 256 in flight in all
# whatever W (each worker's share of the load), then 2048 (a broker with
# more work waiting finds more joins per ZeroMQ message from each worker)
W32_RUNS = [("2", 2, False, 128), ("8", 8, False, 32), ("16", 16, False, 16),
            ("", 32, False, 8), ("r", 32, True, 8), ("2d", 2, False, 1024),
            ("d", 32, False, 64)]


def run_w32(h: Harness, n: int, args) -> Dict[str, Any]:
    """Joins/s at N users with W=32 and W=2 lean workers (the default: no
    replica), then W=32 workers that keep replicas (every join: 32 deltas)."""
    row: Dict[str, Any] = {"users": n, "workers": 32}
    runs = W32_RUNS
    try:
        for key, count, replica, window in runs:
            h.start_broker(0)
            fakes = h.add_fakes(count, n, f"x{key}", replica=replica)
            for f in fakes:
                f.hello()
            if h.wait_synced(fakes, {}, args.settle_timeout) is None:
                return row
            j = h.joins(fakes, args.phase_seconds, window=window)
            row[f"joins{key}_s"], row[f"join{key}_cpu_us"] = j["rate"], j["cpu_us"]
            h.log(f"W={count} N={n} {'replicas' if replica else 'lean'}: joins {j['rate']:.0f}/s,"
                  f" broker {j['cpu_us']:.1f} us/join")
            h.close_fakes()
            h.kill_broker()
    finally:
        h.close_fakes()
        h.kill_broker()
    return row


def core_gc(sizes: List[int]) -> List[Dict[str, Any]]:
    """BrokerCore join cost in-process at each size, default GC vs the broker's tuning."""
    from wse_sync.core.broker import BrokerCore
    from wse_sync.core.messages import Message
    rows = []
    for tuned in (False, True):
        for n in sizes:
            gc.collect()
            gc.unfreeze() if hasattr(gc, "unfreeze") else None
            gc.set_threshold(700, 10, 10)
            core = BrokerCore()
            table = [[f"c{i}", f"u{i}", None, 1.0] for i in range(n)]
            core.handle("w1", Message("hello", {"pid": 1, "limit": None, "table": table}), 0.0)
            core.handle("w2", Message("hello", {"pid": 2, "limit": None, "table": []}), 0.0)
            del table
            if tuned:
                try:
                    from wse_sync.cluster.broker import tune_gc
                except ImportError:
                    rows.append({"users": n, "gc": "tuned", "join_us": None})
                    continue
                tune_gc(force=True)
            m = 20000
            t0 = time.perf_counter()
            for i in range(m):
                core.handle("w2", Message("join", {"req": i, "conn_id": f"n{i}", "cid": f"nu{i}",
                                                   "limit": None, "at": 1.0}), 0.0)
            rows.append({"users": n, "gc": "tuned" if tuned else "default",
                         "join_us": 1e6 * (time.perf_counter() - t0) / m})
            del core
    gc.set_threshold(700, 10, 10)
    return rows


def fmt(v: Any, spec: str = ".1f") -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def table(rows: List[Dict[str, Any]], w32: Optional[Dict[str, Any]]) -> str:
    head = ["users", "load s", "joins/s (W=2)", "µs/join", "send/s", "µs/send", "hello s",
            "hellos", "removed", "restart s", "hellos", "spurious", "removed", "map==tables",
            "RSS MB", "CPU s", "replica B/user"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            f"{r['users']:,}", fmt(r.get("load_s")), fmt(r.get("joins_s"), ".0f"),
            fmt(r.get("join_cpu_us")), fmt(r.get("sends_s"), ".0f"), fmt(r.get("send_cpu_us")),
            fmt(r.get("hello_s")), fmt(r.get("hello_count")), fmt(r.get("hello_removed")),
            fmt(r.get("restart_s")), fmt(r.get("restart_hellos")), fmt(r.get("restart_spurious")),
            fmt(r.get("restart_removed")), fmt(r.get("map_ok_end")),
            fmt(r.get("rss_end_mb"), ".0f"), fmt(r.get("broker_cpu_s")),
            fmt(r.get("view_b_per_user"), ".0f")]) + " |")
    if w32:
        lines += ["", f"joins at {w32['users']:,} users:", "",
                  "| workers | map in workers | joins in flight | joins/s (wall) |"
                  " µs of broker CPU per join |", "|---|---|---|---|---|"]
        for key, count, replica, window in W32_RUNS:
            lines.append(f"| W={count} | {'replicas' if replica else 'lean'} |"
                         f" {count * window} | {fmt(w32.get(f'joins{key}_s'), '.0f')} |"
                         f" {fmt(w32.get(f'join{key}_cpu_us'))} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="20k and 50k users")
    p.add_argument("--users", default=None, help="comma-separated N (default 100k,250k,500k,1M)")
    p.add_argument("--w32-users", type=int, default=None, help="users for the W=32 join run")
    p.add_argument("--phase-seconds", type=float, default=3.0)
    p.add_argument("--settle-timeout", type=float, default=30.0)
    p.add_argument("--time-limit", type=float, default=1500.0, help="seconds for the whole run")
    p.add_argument("--core-gc", action="store_true", help="also BrokerCore join cost vs GC")
    p.add_argument("--json", default=None, help="write the rows to this file")
    args = p.parse_args()
    if args.users:
        sizes = [int(float(x)) for x in args.users.split(",")]
    elif args.quick:
        sizes = [20000, 50000]
    else:
        sizes = [100000, 250000, 500000, 1000000]
    w32_users = args.w32_users if args.w32_users is not None else (10000 if args.quick else 100000)
    import logging
    import wse_sync
    logging.getLogger("wse_sync").setLevel(logging.CRITICAL)  # the fakes' outage notes
    print(f"# wse_sync from {os.path.dirname(wse_sync.__file__)}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))  # still runs finally
    workdir = tempfile.mkdtemp(prefix="wse-scale-")
    deadline = time.monotonic() + args.time_limit
    h = Harness(sys.executable, workdir, deadline, lambda s: print("#", s, flush=True))
    rows: List[Dict[str, Any]] = []
    w32 = None
    gc_rows = []
    try:
        for n in sizes:
            try:
                rows.append(run_n(h, n, args))
            except SystemExit as exc:
                print(f"# N={n}: stopped: {exc}", flush=True)
                rows.append({"users": n})
                h.close_fakes()
                h.kill_broker()
                break
        if w32_users:
            w32 = run_w32(h, w32_users, args)
        if args.core_gc:
            gc_rows = core_gc([10000, 1000000])
    finally:
        h.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(table(rows, w32))
    for r in gc_rows:
        print(f"BrokerCore join at {r['users']:,} users, GC {r['gc']}: {fmt(r['join_us'])} µs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "w32": w32, "gc": gc_rows}, f, indent=1)


if __name__ == "__main__":
    main()
