"""Soak: churn connections, messages, RPCs and broadcasts across 3 workers while
killing a random worker and the broker, then check the invariants.

    python bench/soak.py --duration 180      # a few minutes
    python bench/soak.py --duration 20       # the short version CI runs

Prints the counts; exits 1 when an invariant fails.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import gevent

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from helpers import ServerProcess, broker_stats, free_port, wait_for  # noqa: E402
from wse_sync import WseClient, WseError  # noqa: E402


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=180)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--clients", type=int, default=30)
    ap.add_argument("--kills", type=int, default=0, help="worker kills (default: duration/40+1)")
    ap.add_argument("--curve", action="store_true",
                    help="a CURVE broker on tcp:// (kept alive by broker_keeper) instead of"
                         " serve's own ipc broker")
    args = ap.parse_args()
    kills = args.kills or int(args.duration // 40) + 1
    log_path = tempfile.mktemp(prefix="wse-soak-", suffix=".log")
    env = dict(os.environ, WSE_SOAK_LOG=log_path)
    port = free_port()
    extra: list = []
    keeper = None
    if args.curve:
        keeper, extra = _curve_broker(env)
    sp = ServerProcess(["serve", os.path.join(HERE, "soak_app.py") + ":server", "--host",
                        "127.0.0.1", "--port", str(port), "--workers", str(args.workers),
                        "--log-level", "warning", *extra], env=env)
    # the broker's parent: serve's supervisor, or the keeper of the CURVE broker
    broker_parent = keeper.pid if keeper is not None else sp.proc.pid
    url = f"ws://127.0.0.1:{port}/"
    counts = dict(connects=0, connect_errors=0, rpcs=0, rpc_ok=0, rpc_err=0, msgs=0,
                  broadcasts=0, worker_kills=0, broker_kills=0, closes=0)
    clients: list = []
    try:
        # the supervisor logs at warning: find the broker through /proc
        deadline = time.monotonic() + 30
        while True:
            kids = subprocess.run(["pgrep", "-P", str(sp.proc.pid)], capture_output=True,
                                  text=True).stdout.split()
            if keeper is not None:
                kids += subprocess.run(["pgrep", "-P", str(keeper.pid)], capture_output=True,
                                       text=True).stdout.split()
            if len(kids) >= args.workers + 1:
                break
            assert time.monotonic() < deadline, "processes did not start"
            time.sleep(0.1)

        def children():
            out = {}
            pids = subprocess.run(["pgrep", "-P", str(sp.proc.pid)], capture_output=True,
                                  text=True).stdout.split()
            if broker_parent != sp.proc.pid:
                pids += subprocess.run(["pgrep", "-P", str(broker_parent)], capture_output=True,
                                       text=True).stdout.split()
            for pid in pids:
                try:
                    cmd = open(f"/proc/{pid}/cmdline").read().split("\0")
                except OSError:
                    continue
                out[int(pid)] = "broker" if "broker" in cmd else "worker"
            return out

        def endpoint():
            for pid, kind in children().items():
                if kind == "broker":
                    cmd = open(f"/proc/{pid}/cmdline").read().split("\0")
                    return pid, cmd[cmd.index("--bind") + 1]
            return None, None

        wait_for(lambda: _try_connect(url), timeout=30)
        broker_pid, ep = wait_for(lambda: endpoint()[0] and endpoint(), timeout=15)
        long_lived = [p for p, k in children().items() if k == "worker"]
        mem_start = {"broker": rss_kb(broker_pid)}
        for pid in long_lived:
            mem_start[f"worker {pid}"] = rss_kb(pid)
        start = time.monotonic()
        next_kill = start + args.duration / (kills + 1)
        kill_broker_next = False
        n = 0
        while time.monotonic() - start < args.duration:
            n += 1
            # churn: open a connection, maybe close an old one
            if len(clients) < args.clients or random.random() < 0.3:
                c = WseClient(url, reconnect=True, rpc_timeout=10, connect_timeout=10)
                try:
                    c.connect(f"u{random.randrange(args.clients)}")
                    counts["connects"] += 1
                    clients.append(c)
                except WseError:
                    counts["connect_errors"] += 1
            if len(clients) > args.clients:
                c = clients.pop(random.randrange(len(clients)))
                c.close()
                counts["closes"] += 1
            # traffic from a few clients at once
            jobs = []
            for c in random.sample(clients, min(5, len(clients))):
                jobs.append(gevent.spawn(_traffic, c, counts))
            gevent.joinall(jobs, timeout=30)
            if time.monotonic() >= next_kill and sum(counts[k] for k in (
                    "worker_kills", "broker_kills")) < kills + 1:
                next_kill += args.duration / (kills + 1)
                if kill_broker_next:
                    broker_pid, _ = endpoint()
                    if broker_pid:
                        os.kill(broker_pid, signal.SIGKILL)
                        counts["broker_kills"] += 1
                else:
                    workers = [p for p, k in children().items() if k == "worker"]
                    victim = random.choice(workers)
                    os.kill(victim, signal.SIGKILL)
                    counts["worker_kills"] += 1
                    long_lived = [p for p in long_lived if p != victim]
                kill_broker_next = not kill_broker_next
            gevent.sleep(0.01)
        # settle: every client READY again, then compare the map with the tables
        wait_for(lambda: all(c.ready or c.status == "OFFLINE" for c in clients), timeout=30)
        live = [c for c in clients if c.ready]
        broker_pid, ep = wait_for(lambda: endpoint()[0] and endpoint(), timeout=15)

        def compare():
            """(equal?, map per worker pid, table sizes per worker pid, stats)."""
            tables = {}
            for c in live:
                try:
                    t = c.call("table")
                    tables[t["pid"]] = len(t["conns"])
                except WseError:
                    pass
            stats = broker_stats(ep) or {"connections": None, "counters": {}, "workers": {}}
            in_map = {w["pid"]: w["connections"] for w in stats["workers"].values()
                      if w["connections"]}
            return in_map == tables, in_map, tables, stats

        try:
            _, in_map, tables, stats = wait_for(lambda: (r := compare())[0] and r, timeout=20)
            map_ok = True
        except AssertionError:
            map_ok, in_map, tables, stats = compare()
        union = tables
        print("map per worker:", in_map, "tables per worker:", tables)
        mem_end = {"broker": rss_kb(broker_pid)}
        for pid in long_lived:
            mem_end[f"worker {pid}"] = rss_kb(pid)
        # close everything; joined and left must balance
        for c in clients:
            c.close()
        wait_for(lambda: (s := broker_stats(ep)) and s["users"] == 0, timeout=15)

        def balance():
            events = [json.loads(line) for line in open(log_path)]
            return (sum(1 for e in events if e[0] == "joined"),
                    sum(1 for e in events if e[0] == "left"))

        # the last 'left' handlers may still be writing
        try:
            joined, left = wait_for(lambda: (b := balance())[0] == b[1] and b, timeout=10)
        except AssertionError:
            joined, left = balance()
        print(json.dumps(dict(counts, joined=joined, left=left, map_connections=stats["connections"],
                              workers_tables=sum(union.values()), broker_counters=stats["counters"],
                              rss_kb_start=mem_start, rss_kb_end=mem_end), indent=1, sort_keys=True))
        ok = map_ok
        if not map_ok:
            print("FAIL: the broker's map differs from the union of the workers' tables")
        if counts["rpcs"] != counts["rpc_ok"] + counts["rpc_err"]:
            print("FAIL: an RPC neither returned nor raised")
            ok = False
        if joined != left:
            print(f"FAIL: joined {joined} != left {left}")
            ok = False
        for name, end in mem_end.items():
            # generous: the first minutes include imports, caches and pools warming up
            if end > 2 * max(mem_start.get(name, end), 30000):
                print(f"FAIL: {name} memory grew from {mem_start.get(name)} to {end} kB")
                ok = False
        print("soak: OK" if ok else "soak: FAILED")
        return 0 if ok else 1
    finally:
        for c in clients:
            try:
                c.close()
            except Exception:
                pass
        sp.stop()
        if keeper is not None:
            keeper.terminate()
            try:
                keeper.wait(20)
            except subprocess.TimeoutExpired:
                keeper.kill()
                keeper.wait()
        try:
            os.unlink(log_path)
        except OSError:
            pass


def _curve_broker(env: dict):
    """Keys, and a CURVE broker on tcp://127.0.0.1 kept alive by broker_keeper.

    Returns (the keeper process, the ``serve`` flags that attach to it). This
    process's ``stats`` calls get a worker key through the environment.
    """
    keys = tempfile.mkdtemp(prefix="wse-soak-keys-")
    for name, where in (("broker", keys), ("w", os.path.join(keys, "workers"))):
        subprocess.run([sys.executable, "-m", "wse_sync", "keys", name, "--dir", where],
                       check=True, capture_output=True, timeout=30)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    broker_env = dict(env, WSE_SYNC_CURVE_SECRET=os.path.join(keys, "broker.key_secret"),
                      WSE_SYNC_ALLOW_WORKERS=os.path.join(keys, "workers"))
    keeper = subprocess.Popen([sys.executable, "-m", "wse_sync.serve.broker_keeper", "--bind",
                               endpoint, "--log-level", "warning"], env=broker_env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    broker_key = os.path.join(keys, "broker.key")
    secret = os.path.join(keys, "workers", "w.key_secret")
    os.environ["WSE_SYNC_BROKER_KEY"] = broker_key   # for broker_stats (wse-sync stats)
    os.environ["WSE_SYNC_CURVE_SECRET"] = secret
    return keeper, ["--broker", endpoint, "--broker-key", broker_key, "--curve-secret", secret]


def _try_connect(url: str) -> bool:
    try:
        c = WseClient(url, connect_timeout=2)
        c.connect("probe")
        c.close()
        return True
    except (WseError, OSError):
        return False


def _traffic(c, counts) -> None:
    if not c.ready:
        return
    try:
        counts["rpcs"] += 1
        c.call("echo", {"x": 1})
        counts["rpc_ok"] += 1
    except WseError:
        counts["rpc_err"] += 1
    try:
        c.send("msg", 1)
        counts["msgs"] += 1
        if random.random() < 0.1:
            counts["rpcs"] += 1
            try:
                c.call("bcast", 1)
                counts["broadcasts"] += 1
                counts["rpc_ok"] += 1
            except WseError:
                counts["rpc_err"] += 1
    except WseError:
        pass


if __name__ == "__main__":
    sys.exit(main())
