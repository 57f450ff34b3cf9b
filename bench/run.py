"""Run the wse_sync benchmarks against wse_sync and five bare baselines; print a table.

    python bench/run.py --quick                 # about 4 minutes
    python bench/run.py                         # the full set (about 25 minutes)
    python bench/run.py --servers wse_sync,node --scenarios rpc,msg
    python bench/run.py --from-json bench/results/latest.json --markdown   # reprint

For each server (wse_sync; bare gevent-websocket, Node ws, picows on uvloop,
websockets and aiohttp on asyncio's loop) and scenario, the server runs pinned to CPU 0 and the Node load generator (bench/node/loadgen.js) to
CPU 1. The primary figure is the server's CPU time per operation: utime+stime from
/proc/PID/stat, summed over the whole server process tree (supervisor, broker,
workers), read when the generator enters and leaves its measured window (warm-up
excluded). Each cell is the median of 3 runs. The Python peers (picows, websockets,
aiohttp) run under --peer-python (default: bench/.peers-venv, made on first use from
bench/requirements-peers.txt). See bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NODE_DIR = os.path.join(HERE, "node")
LOADGEN = os.path.join(NODE_DIR, "loadgen.js")
CLK_TCK = os.sysconf("SC_CLK_TCK")

SERVERS = ["wse_sync", "gevent", "node", "picows", "websockets", "aiohttp"]
SERVER_LABELS = {"wse_sync": "wse_sync", "gevent": "bare gevent", "node": "bare node",
                 "picows": "bare picows", "websockets": "bare websockets",
                 "aiohttp": "bare aiohttp"}
# the baselines run by --peer-python (bench/bare_<kind>.py), and what they import
PEERS = ["picows", "websockets", "aiohttp"]
PEER_CHECK = """
import json, platform
import aiohttp, picows, ujson, uvloop, websockets
from websockets.asyncio.server import broadcast, serve
v = {m.__name__: getattr(m, "__version__", "?") for m in (picows, uvloop, websockets, aiohttp, ujson)}
v["python"] = platform.python_version()
print(json.dumps(v))
"""
PEERS_VENV = os.path.join(HERE, ".peers-venv")
PEERS_REQUIREMENTS = os.path.join(HERE, "requirements-peers.txt")
SCENARIOS = ["rpc", "msg", "fanout", "connect", "cross"]

# Scenario parameters per mode. "sizes" lists the cells a scenario expands to.
PARAMS = {
    "quick": {
        "rpc": dict(conns=50, slices=2, warmup=0.15, duration=0.4),
        "msg": dict(conns=50, slices=2, warmup=0.15, duration=0.4),
        "fanout": dict(sizes=[2000], deliveries=10000, warmup=0.1, duration=0.6),
        # 2,000: measured on the fanout's receivers; 10,000: the idle-memory figure
        "connect": dict(sizes=[2000, 10000], concurrency=200, warmup=0.2),
        "cross": dict(receivers=100, count=10, warmup=0.1, duration=0.6),
    },
    "full": {
        "rpc": dict(conns=50, slices=4, warmup=0.3, duration=1.0),
        "msg": dict(conns=50, slices=4, warmup=0.3, duration=1.0),
        "fanout": dict(sizes=[2000, 10000], deliveries=20000, warmup=0.5, duration=3.0),
        "connect": dict(sizes=[5000, 10000], concurrency=200, warmup=0.3),
        "cross": dict(receivers=200, count=20, warmup=0.5, duration=3.0),
    },
}

UNITS = {"rpc": "call", "msg": "ping/pong", "fanout": "delivery", "connect": "handshake",
         "cross": "message"}


# ----------------------------------------------------------------------------- /proc
def _proc_table() -> Dict[int, int]:
    """pid -> ppid for every process."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rindex(b")") + 2:].split()
        table[int(name)] = int(rest[1])
    return table


def tree_pids(root: int) -> List[int]:
    """``root`` and all its descendants (walks the ppid links)."""
    children: Dict[int, List[int]] = {}
    for pid, ppid in _proc_table().items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` (all its threads), in clock ticks; 0 if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return 0
    rest = data[data.rindex(b")") + 2:].split()
    return int(rest[11]) + int(rest[12])  # fields 14 and 15 of stat(5)


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def hwm_kb(pid: int) -> int:
    """VmHWM (KB): the process's peak resident set since it started."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakRSS:
    """Samples the summed VmRSS of ``pids`` every ``interval`` s in a thread; ``peak_kb``
    is the largest sum seen (the peak of the sum, not the sum of each process's peak)."""

    def __init__(self, pids: List[int], interval: float = 0.05) -> None:
        self.pids, self.interval = pids, interval
        self.before_kb = sum(rss_kb(p) for p in pids)
        self.peak_kb, self.samples = self.before_kb, 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_kb = max(self.peak_kb, sum(rss_kb(p) for p in self.pids))
            self.samples += 1

    def stop(self) -> Dict[str, Any]:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, sum(rss_kb(p) for p in self.pids))
        return {"peak_rss_kb": self.peak_kb, "rss_before_kb": self.before_kb,
                "samples": self.samples + 1,
                # cross-check: each process's own peak since it started (not resettable)
                "hwm_sum_kb": sum(hwm_kb(p) for p in self.pids)}


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- pinning
def pinned(cmd: List[str], cpu: int) -> tuple:
    """(argv, preexec_fn) that run ``cmd`` on ``cpu`` only."""
    if CPUS < 2:
        cpu = 0
    if shutil.which("taskset"):
        return ["taskset", "-c", str(cpu)] + cmd, None
    return cmd, (lambda: os.sched_setaffinity(0, {cpu}))


CPUS = len(os.sched_getaffinity(0))


# ----------------------------------------------------------------------------- servers
class Server:
    """One server under test, in its own session, bounded in time by ``timeout``."""

    def __init__(self, kind: str, workers: int = 1, lifetime: float = 600,
                 gevent_wsaccel: bool = False, peer_python: Optional[str] = None,
                 asyncio_uvloop: bool = False, app: Optional[str] = None) -> None:
        self.kind = kind
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}/"
        py = sys.executable
        if kind == "wse_sync":
            cmd = [py, "-m", "wse_sync", "serve", app or os.path.join(HERE, "bench_app.py") + ":server",
                   "--workers", str(workers), "--host", "127.0.0.1", "--port", str(self.port),
                   "--log-level", "warning", "--grace", "2"]
        elif kind == "gevent":
            cmd = [py, os.path.join(HERE, "bare_gevent.py"), "--port", str(self.port),
                   "--max-seconds", str(lifetime)] + (["--wsaccel"] if gevent_wsaccel else [])
        elif kind == "node":
            cmd = ["node", os.path.join(NODE_DIR, "bare_server.js"), "--port", str(self.port),
                   "--max-seconds", str(lifetime)]
        elif kind in PEERS:
            cmd = [peer_python or py, os.path.join(HERE, f"bare_{kind}.py"), "--port", str(self.port),
                   "--max-seconds", str(lifetime)]
            if asyncio_uvloop and kind != "picows":  # picows always runs on uvloop
                cmd.append("--uvloop")
        else:
            raise ValueError(kind)
        argv, preexec = pinned(cmd, 0)
        # coreutils timeout: the server stops by itself even if this runner is killed
        argv = ["timeout", "-k", "5", str(int(lifetime))] + argv
        self.log = tempfile.TemporaryFile()  # the server's output, shown when a run fails
        self.proc = subprocess.Popen(argv, preexec_fn=preexec, start_new_session=True,
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)

    def log_tail(self, n: int = 1500) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-n:]

    def pids(self) -> List[int]:
        return tree_pids(self.proc.pid)

    def cpu_ticks(self) -> int:
        return sum(cpu_ticks(p) for p in self.pids())

    def role(self, pid: int) -> str:
        if self.kind != "wse_sync":
            return "server" if pid != self.proc.pid else "timeout"
        line = cmdline(pid)
        if " _worker " in line:
            return f"worker {pid}"
        if " broker " in line:
            return "broker"
        if " serve " in line:
            return "supervisor"
        return "other"

    def snapshot(self, pids: Optional[List[int]] = None) -> Dict[int, int]:
        """pid -> CPU ticks. With ``pids`` (a list read earlier, so that reading is
        quick at a window's edge), read those first, then add any newcomer."""
        if pids is None:
            return {p: cpu_ticks(p) for p in self.pids()}
        snap = {p: cpu_ticks(p) for p in pids}
        for p in self.pids():
            if p not in snap:
                snap[p] = cpu_ticks(p)
        return snap

    def workers(self) -> List[int]:
        """The processes holding connections: wse_sync's workers, else the server."""
        pids = self.pids()
        if self.kind == "wse_sync":
            return [p for p in pids if " _worker " in cmdline(p)]
        return [p for p in pids if p != self.proc.pid]  # below coreutils timeout

    def memory_pids(self) -> List[int]:
        """The processes whose memory the peak-RSS row sums: wse_sync's workers and
        broker (not the supervisor, which holds no connection or message), else the server."""
        if self.kind != "wse_sync":
            return self.workers()
        return [p for p in self.pids() if " _worker " in cmdline(p) or " broker " in cmdline(p)]

    def rss(self) -> Dict[str, int]:
        """VmRSS (KB) of the workers and of the whole tree."""
        workers = self.workers()
        return {"workers": sum(rss_kb(p) for p in workers),
                "all": sum(rss_kb(p) for p in self.pids()),
                "n_workers": len(workers)}

    def stop(self) -> None:
        pids = self.pids()
        try:
            os.kill(self.proc.pid, signal.SIGTERM)  # timeout forwards it to the server
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(8)
        except subprocess.TimeoutExpired:
            pass
        # anything left of the tree (children live in sessions of their own)
        for pid in pids + self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self.proc.wait(2)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()


# ----------------------------------------------------------------------------- generator
class LoadgenError(RuntimeError):
    pass


class Gen:
    """One loadgen.js process in --sync mode: read its event lines, answer "go"."""

    def __init__(self, server: Server, scenario: str, opts: Dict[str, Any], windows: int,
                 timeout: float) -> None:
        self.scenario = scenario
        cmd = ["node", LOADGEN, "--scenario", scenario, "--url", server.url, "--sync",
               "--windows", str(windows), "--max-seconds", str(int(timeout))]
        for k, v in opts.items():
            cmd += [f"--{k}", str(v)]
        argv, preexec = pinned(cmd, 1)
        argv = ["timeout", "-k", "3", str(int(timeout) + 5)] + argv
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(argv, preexec_fn=preexec, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr,
                                     start_new_session=True)
        self.deadline = time.monotonic() + timeout + 10
        self.buf = b""
        self.result: Optional[Dict[str, Any]] = None

    def next(self) -> Dict[str, Any]:
        """The next event, or the final result (also kept in .result)."""
        while b"\n" not in self.buf:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise LoadgenError(f"{self.scenario}: the generator did not finish in time")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if not ready:
                continue
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                self.stderr.seek(0)
                err = self.stderr.read().decode(errors="replace")[-1500:]
                raise LoadgenError(f"{self.scenario}: the generator exited without a result: {err}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        msg = json.loads(line)
        if "event" not in msg:
            self.result = msg
            if "error" in msg:
                raise LoadgenError(f"{self.scenario}: {msg['error']}")
        return msg

    def expect(self, name: str) -> Dict[str, Any]:
        msg = self.next()
        if msg.get("event") != name:
            raise LoadgenError(f"{self.scenario}: expected event {name}, got {msg}")
        return msg

    def go(self) -> None:
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()

    def finish(self) -> Dict[str, Any]:
        while self.result is None:
            self.next()
        return self.result

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.proc.stdout.close()
        self.stderr.close()


def cpu0_busy_ticks() -> int:
    """Busy ticks of CPU 0 (user nice system irq softirq steal), from /proc/stat."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu0 "):
                v = [int(x) for x in line.split()[1:]]
                return v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
    return 0


def wait_all_idle(servers: List[Server], limit: float = 5.0) -> None:
    """Wait (at most ``limit`` s) until none of ``servers`` uses CPU for 50 ms."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        a = sum(s.cpu_ticks() for s in servers)
        time.sleep(0.05)
        if sum(s.cpu_ticks() for s in servers) - a <= 0:
            return


def measure_phase(gen: Gen, server: Server, quiet: List[Server], memory: bool = False,
                  settle: float = 0.5, peak: bool = False) -> Dict[str, Any]:
    """Drive one window of ``gen`` (ready -> start -> end) and return the server's figures.
    With ``peak``, the summed VmRSS of the server's memory_pids() is sampled every 50 ms
    from the go after "ready" (warm-up included) to "end", and its maximum kept."""
    gen.expect("ready")
    wait_all_idle(quiet)  # the previous run's teardown is over, everywhere on CPU 0
    pids = server.pids()
    sampler = PeakRSS(server.memory_pids()) if peak else None
    gen.go()
    a = gen.expect("start")
    t_a, snap_a, cpu0_a = time.monotonic(), server.snapshot(pids), cpu0_busy_ticks()
    rss_a = server.rss() if memory else None
    gen.go()
    b = gen.expect("end")
    t_b, snap_b, cpu0_b = time.monotonic(), server.snapshot(pids), cpu0_busy_ticks()
    peak_fig = sampler.stop() if sampler else None
    ticks_a, ticks_b = sum(snap_a.values()), sum(snap_b.values())
    by_role: Dict[str, float] = {}
    for pid, ticks in snap_b.items():
        role = server.role(pid)
        by_role[role] = by_role.get(role, 0) + (ticks - snap_a.get(pid, 0)) / CLK_TCK
    if memory:
        time.sleep(settle)  # let the server finish its bookkeeping, then read its memory
        rss_b = server.rss()
    gen.go()
    wall = t_b - t_a
    cpu_s = (ticks_b - ticks_a) / CLK_TCK
    ops = b["ops"]
    others_s = max(0.0, (cpu0_b - cpu0_a) / CLK_TCK - cpu_s)
    fig = {"ops": ops, "server_cpu_s": cpu_s, "wall_s": wall,
           "gen_cpu_s": b["gen_cpu_s"] - a["gen_cpu_s"], "cpu0_others_s": others_s,
           "cpu_s_by_process": by_role}
    derive(fig)
    if memory:
        fig["rss_before_kb"], fig["rss_after_kb"] = rss_a, rss_b
        fig["kb_per_conn"] = (rss_b["workers"] - rss_a["workers"]) / ops if ops else None
        fig["kb_per_conn_all"] = (rss_b["all"] - rss_a["all"]) / ops if ops else None
    if peak_fig:
        fig["peak"] = peak_fig
        fig["peak_rss_mb"] = peak_fig["peak_rss_kb"] / 1024
        fig["peak_rise_mb"] = (peak_fig["peak_rss_kb"] - peak_fig["rss_before_kb"]) / 1024
    return fig


def derive(fig: Dict[str, Any]) -> None:
    """The per-operation and utilisation figures from the sums of a window (or several)."""
    ops, wall, cpu_s = fig["ops"], fig["wall_s"], fig["server_cpu_s"]
    fig["us_per_op"] = cpu_s * 1e6 / ops if ops else None
    fig["server_util"] = cpu_s / wall if wall else None
    fig["gen_util"] = fig["gen_cpu_s"] / wall if wall else None
    # CPU 0 time used by processes that are not this server (other jobs on the machine)
    fig["cpu0_others"] = fig["cpu0_others_s"] / wall if wall else None
    fig["us_per_op_by_process"] = {r: c * 1e6 / ops for r, c in sorted(fig["cpu_s_by_process"].items())
                                   if c and ops}


def combine(slices: List[Dict[str, Any]], windows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One run made of several interleaved slices: sums of CPU, operations and time;
    latencies are the medians of the slices' percentiles."""
    fig: Dict[str, Any] = {"cpu_s_by_process": {}}
    for k in ("ops", "server_cpu_s", "wall_s", "gen_cpu_s", "cpu0_others_s"):
        fig[k] = sum(f[k] for f in slices)
    for f in slices:
        for r, c in f["cpu_s_by_process"].items():
            fig["cpu_s_by_process"][r] = fig["cpu_s_by_process"].get(r, 0) + c
    derive(fig)
    window = {"ops": sum(w["ops"] for w in windows),
              "window_s": sum(w["window_s"] for w in windows)}
    window["rate"] = window["ops"] / window["window_s"]
    for k in ("p50_ms", "p99_ms"):
        vals = [w[k] for w in windows if w.get(k) is not None]
        if vals:
            window[k] = statistics.median(vals)
    window["slices"] = windows
    return merge(fig, window)


def name_workers(fig: Dict[str, Any], names: Optional[Dict[int, str]] = None) -> None:
    """Rename the "worker PID" entries of the CPU split: "worker" when there is one,
    else the names given (cross: worker A holds the receivers, B the remote trigger)."""
    split = fig.get("us_per_op_by_process", {})
    out: Dict[str, float] = {}
    for role, v in split.items():
        if role.startswith("worker "):
            pid = int(role.split()[1])
            role = (names or {}).get(pid, "worker")
        if role != "timeout":
            out[role] = out.get(role, 0) + v
    fig["us_per_op_by_process"] = out


def merge(fig: Dict[str, Any], window: Dict[str, Any], rename: bool = True) -> Dict[str, Any]:
    """The runner's CPU figures plus the generator's rate and latencies for one window."""
    for k in ("rate", "p50_ms", "p99_ms", "tick_ms", "round_p50_ms", "failed"):
        if k in window:
            fig[k] = window[k]
    fig["loadgen"] = window
    if rename:
        name_workers(fig)
    return fig


# ----------------------------------------------------------------------------- scenarios
def start_servers(kinds: List[str], args, workers: int = 1) -> Dict[str, Server]:
    """Start the servers together, then wait until each answers hi -> welcome."""
    servers: Dict[str, Server] = {}
    try:
        for kind in kinds:
            servers[kind] = Server(kind, workers=workers, gevent_wsaccel=args.gevent_wsaccel,
                                   peer_python=args.peer_python,
                                   asyncio_uvloop=args.asyncio_uvloop)
        for kind, server in servers.items():
            gen = Gen(server, "probe", {"timeout": 30, "expect-pids": workers if kind == "wse_sync" else 0},
                      windows=1, timeout=40)
            try:
                gen.finish()
            except LoadgenError as exc:
                raise LoadgenError(f"{kind} did not start: {exc}\n{server.log_tail()}") from None
            finally:
                gen.close()
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    return servers


def warm_closed_loops(servers: Dict[str, Server], conns: int) -> None:
    """One throwaway closed-loop session (``conns`` connections, 0.5 s of rpc) on each
    newly started server, before the rpc and msg cells. The asyncio-loop peers
    (websockets, aiohttp) serve the first connections a fresh process accepts at about
    half the speed of the later ones for as long as those connections live (seen as
    rpc costing ~2x msg when rpc ran first); every server gets the same warm-up."""
    for kind, server in servers.items():
        cmd = ["node", LOADGEN, "--scenario", "rpc", "--url", server.url, "--conns", str(conns),
               "--warmup", "0.2", "--duration", "0.3", "--max-seconds", "30"]
        argv, preexec = pinned(cmd, 1)
        try:
            out = subprocess.run(["timeout", "-k", "3", "35"] + argv, preexec_fn=preexec,
                                 capture_output=True, timeout=45)
        except subprocess.TimeoutExpired:
            log(f"  warm-up of {kind} did not finish")
            continue
        if out.returncode:
            log(f"  warm-up of {kind} failed: {out.stdout.decode(errors='replace')[-300:]}"
                f" {out.stderr.decode(errors='replace')[-300:]}")


def plan(scenarios: List[str], params: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The tasks to run, in order. A fanout task also measures the connect cell of its
    size when connect is selected: its receivers' handshakes are that cell's window."""
    tasks: List[Dict[str, Any]] = []
    connect_sizes = list(params["connect"]["sizes"]) if "connect" in scenarios else []
    for scenario in ("rpc", "msg"):
        if scenario in scenarios:
            p = params[scenario]
            tasks.append({"how": "interleaved", "scenario": scenario, "cells": [scenario],
                          "slices": p["slices"],
                          "opts": {"conns": p["conns"], "warmup": p["warmup"],
                                   "duration": p["duration"]}})
    p, pc = params["fanout"], params["connect"]
    if "fanout" in scenarios:
        for n in p["sizes"]:
            opts = {"receivers": n, "count": max(1, round(p["deliveries"] / n)),
                    "warmup": p["warmup"], "duration": p["duration"],
                    "concurrency": pc["concurrency"]}
            cells = [f"fanout-{size_name(n)}"]
            if n in connect_sizes:
                connect_sizes.remove(n)
                opts["measure-connect"] = 1
                cells.insert(0, f"connect-{size_name(n)}")
            tasks.append({"how": "fresh", "scenario": "fanout", "cells": cells, "opts": opts})
    for n in connect_sizes:
        tasks.append({"how": "fresh", "scenario": "connect", "cells": [f"connect-{size_name(n)}"],
                      "opts": {"conns": n, "concurrency": pc["concurrency"], "warmup": pc["warmup"]}})
    if "cross" in scenarios:
        p = params["cross"]
        tasks.append({"how": "cross", "scenario": "cross", "cells": ["cross"],
                      "opts": {"receivers": p["receivers"], "count": p["count"],
                               "warmup": p["warmup"], "duration": p["duration"]}})
    return tasks


def size_name(n: int) -> str:
    """2000 -> "2k"; a size that is not a multiple of 1000 keeps its digits."""
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def cell_order(cell: str) -> tuple:
    scenario, _, size = cell.partition("-")
    if not size:
        return (SCENARIOS.index(scenario), 0)
    return (SCENARIOS.index(scenario), int(size[:-1]) * 1000 if size.endswith("k") else int(size))


def time_budget(opts: Dict[str, Any], windows: int) -> float:
    n = opts.get("receivers", 0) + opts.get("conns", 0)
    return 60 + n / 50 + windows * 4 * (opts.get("warmup", 0) + opts.get("duration", 1))


def show(cell: str, kind: str, i: int, fig: Dict[str, Any], unit: str) -> None:
    extra = ""
    if fig.get("kb_per_conn") is not None:
        extra = f"  {fig['kb_per_conn']:.1f} KB/conn"
    if "hop_us" in fig:
        extra = f"  local {fig['local']['us_per_op']:.1f}  hop {fig['hop_us']:.1f} us"
    split = fig.get("remote", fig).get("us_per_op_by_process", {})
    if kind == "wse_sync" and split:
        extra += "  [" + ", ".join(f"{k} {v:.1f}" for k, v in split.items() if v >= 0.05) + "]"
    log(f"  {cell:11s} {kind:10s} run {i + 1}: {fig['us_per_op']:8.1f} us/{unit}"
        f"  {fig.get('rate') or 0:9.0f}/s  server {fig['server_util']:4.0%}"
        f"  gen {fig['gen_util']:4.0%}  others on CPU 0 {fig.get('cpu0_others') or 0:4.0%}{extra}")


def run_interleaved(cell: str, scenario: str, opts: Dict[str, Any], kinds: List[str], runs: int,
                    slices: int, servers: Dict[str, Server]) -> Dict[str, Dict[str, Any]]:
    """rpc, msg: all servers up at once, one generator each holding its connections.
    Each run is ``slices`` short windows per server, the servers taking turns in an
    order rotated at every slice, so that a noisy moment of the machine does not hit
    one server only; a run's figure sums its slices. A server that failed is stopped
    and removed from ``servers``."""
    results: Dict[str, Dict[str, Any]] = {k: {"runs": [], "errors": [], "params": opts} for k in kinds}
    gens: Dict[str, Gen] = {}
    live = set(kinds)
    try:
        for kind in kinds:
            gens[kind] = Gen(servers[kind], scenario, opts, windows=runs * slices,
                             timeout=time_budget(opts, runs * slices * len(kinds)))
        figs: Dict[str, List[Dict[str, Any]]] = {k: [] for k in kinds}
        turn = 0
        for i in range(runs):
            for _ in range(slices):
                for kind in kinds[turn % len(kinds):] + kinds[:turn % len(kinds)]:
                    if kind not in live:
                        continue
                    try:
                        figs[kind].append(measure_phase(gens[kind], servers[kind], list(servers.values())))
                    except LoadgenError as exc:
                        live.discard(kind)
                        results[kind]["errors"].append(str(exc))
                        log(f"  {cell:11s} {kind:10s} run {i + 1}: FAILED {exc}\n{servers[kind].log_tail()}")
                turn += 1
        for kind in kinds:
            if kind not in live:
                continue
            try:
                res = gens[kind].finish()
            except LoadgenError as exc:
                results[kind]["errors"].append(str(exc))
                continue
            for i in range(runs):
                part = slice(i * slices, (i + 1) * slices)
                fig = combine(figs[kind][part], res["windows"][part])
                results[kind]["runs"].append(fig)
                show(cell, kind, i, fig, UNITS[scenario])
            if res.get("errors"):
                results[kind]["errors"].append(f"{res['errors']} errors: {res.get('last_error')}")
    finally:
        for gen in gens.values():
            gen.close()
        for kind in kinds:
            if kind not in live and kind in servers:
                servers.pop(kind).stop()
    return results


def run_fresh(task: Dict[str, Any], kinds: List[str], runs: int, args) -> Dict[str, Dict[str, Any]]:
    """connect and fanout: fresh servers for each run (the memory per connection needs
    them), started together; run i measures them one after the other, in an order
    rotated by i. Returns {cell: {kind: results}}."""
    opts, scenario = task["opts"], task["scenario"]
    with_connect = task["cells"][0].startswith("connect")
    with_fanout = scenario == "fanout"
    out = {cell: {k: {"runs": [], "errors": [], "params": opts} for k in kinds} for cell in task["cells"]}
    for i in range(runs):
        servers = start_servers(kinds, args)
        for kind in kinds[i % len(kinds):] + kinds[:i % len(kinds)]:
            server, gen = servers[kind], None
            try:
                gen = Gen(server, scenario, opts, windows=1, timeout=time_budget(opts, 1))
                figs = []
                if with_connect:
                    figs.append(measure_phase(gen, server, list(servers.values()), memory=True,
                                              settle=0.3 if args.quick else 1.0))
                if with_fanout:
                    figs.append(measure_phase(gen, server, list(servers.values()), peak=True))
                res = gen.finish()
                windows = ([res["connect"]] if with_fanout and with_connect else []) + res["windows"]
                for cell, fig, window in zip(task["cells"], figs, windows):
                    merge(fig, window)
                    out[cell][kind]["runs"].append(fig)
                    show(cell, kind, i, fig, UNITS[cell.split("-")[0]])
                    if window.get("failed"):
                        out[cell][kind]["errors"].append(f"{window['failed']} connections failed")
                if res.get("errors"):
                    out[task["cells"][-1]][kind]["errors"].append(
                        f"{res['errors']} errors: {res.get('last_error')}")
            except LoadgenError as exc:
                out[task["cells"][-1]][kind]["errors"].append(str(exc))
                log(f"  {task['cells'][-1]:11s} {kind:10s} run {i + 1}: FAILED {exc}\n{server.log_tail()}")
            finally:
                if gen is not None:
                    gen.close()
                servers.pop(kind).stop()
    return out


def run_cross(cell: str, opts: Dict[str, Any], runs: int, args) -> Dict[str, Dict[str, Any]]:
    """cross: wse_sync with 2 workers; each run measures the local phase then the remote one."""
    result: Dict[str, Any] = {"runs": [], "errors": [], "params": opts}
    servers = start_servers(["wse_sync"], args, workers=2)
    server = servers["wse_sync"]
    gen = Gen(server, "cross", opts, windows=runs, timeout=time_budget(opts, 2 * runs))
    try:
        figs = []
        for _ in range(runs):
            local = measure_phase(gen, server, [server])
            remote = measure_phase(gen, server, [server])
            figs.append({"local": local, "remote": remote})
        res = gen.finish()
        names = {res["pid_a"]: "worker A", res["pid_b"]: "worker B"}
        for i, (fig, window) in enumerate(zip(figs, res["windows"])):
            for mode in ("local", "remote"):
                name_workers(fig[mode], names)
                merge(fig[mode], window[mode], rename=False)
            r = fig["remote"]
            fig.update(us_per_op=r["us_per_op"], rate=r["rate"], server_util=r["server_util"],
                       gen_util=r["gen_util"], cpu0_others=r["cpu0_others"],
                       round_p50_ms=r["round_p50_ms"],
                       hop_us=r["us_per_op"] - fig["local"]["us_per_op"])
            show(cell, "wse_sync", i, fig, "message")
        result["runs"] = figs
        result["placement"] = {"pid_a": res.get("pid_a"), "pid_b": res.get("pid_b")}
        if res.get("errors"):
            result["errors"].append(f"{res['errors']} errors: {res.get('last_error')}")
    except LoadgenError as exc:
        result["errors"].append(str(exc))
        log(f"  {cell:11s} wse_sync run: FAILED {exc}\n{server.log_tail()}")
    finally:
        gen.close()
        server.stop()
    return {"wse_sync": result}


def median_of(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Median of each numeric figure over the runs."""
    out: Dict[str, Any] = {}
    keys = ["us_per_op", "rate", "p50_ms", "p99_ms", "tick_ms", "round_p50_ms", "server_util",
            "gen_util", "cpu0_others", "kb_per_conn", "kb_per_conn_all", "hop_us",
            "peak_rss_mb", "peak_rise_mb"]
    for k in keys:
        vals = [r[k] for r in runs if isinstance(r.get(k), (int, float))]
        if vals:
            out[k] = statistics.median(vals)
    roles = sorted({k for r in runs for k in r.get("us_per_op_by_process", {})})
    if roles:
        out["us_per_op_by_process"] = {
            k: statistics.median([r.get("us_per_op_by_process", {}).get(k, 0.0) for r in runs])
            for k in roles}
    for mode in ("local", "remote"):
        if runs and all(mode in r for r in runs):
            out[mode] = median_of([r[mode] for r in runs])
    return out


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)



# ----------------------------------------------------------------------------- table
def fmt(x: Optional[float], spec: str = ".1f") -> str:
    return "—" if x is None else format(x, spec)


def fmt_rate(x: Optional[float]) -> str:
    if x is None:
        return "—"
    return f"{x / 1000:.1f}k/s" if x >= 1000 else f"{x:.0f}/s"


def servers_of(data: Dict[str, Any]) -> List[str]:
    """The servers of a results file, in SERVERS' order (older files: those with cells)."""
    kinds = data.get("meta", {}).get("servers")
    if not kinds:
        seen = {k for cell in data["cells"].values() for k in cell}
        kinds = [k for k in SERVERS if k in seen]
    return [k for k in SERVERS if k in kinds]


def table_rows(data: Dict[str, Any]) -> List[List[str]]:
    """Rows: scenario | wse_sync | each peer "µs/op (wse_sync ÷ peer)" | rate | p50/p99."""
    rows = []
    cells = data["cells"]
    peers = [k for k in servers_of(data) if k != "wse_sync"]

    def med(cell, kind):
        c = cells.get(cell, {}).get(kind)
        return (c or {}).get("median") or {}

    def flags(cell, kind):
        m = med(cell, kind)
        f = ""
        if (m.get("gen_util") or 0) > 0.9:
            f += "G"  # the generator was saturated
        c = cells.get(cell, {}).get(kind) or {}
        if c.get("errors") or any(r.get("warning") for r in c.get("runs", [])):
            f += "!"
        return f

    def val(cell, kind, key):
        v = med(cell, kind).get(key)
        return (fmt(v) + flags(cell, kind)) if v is not None else "—"

    def vs(cell, kind, key):
        """A peer's figure and the ratio wse_sync / peer: "8.1 (1.52×)"."""
        w, v = med(cell, "wse_sync").get(key), med(cell, kind).get(key)
        if v is None:
            return "—"
        ratio = f" ({w / v:.2f}×)" if w is not None and v else ""
        return fmt(v) + flags(cell, kind) + ratio

    for cell in data["order"]:
        scenario = cell.split("-")[0]
        unit = UNITS[scenario]
        w = med(cell, "wse_sync")
        dashes = ["—"] * len(peers)
        if scenario == "cross":
            lw = w.get("local", {})
            rw = w.get("remote", {})
            rows.append([f"cross: remote send (µs/{unit})", val(cell, "wse_sync", "us_per_op")]
                        + dashes + [fmt_rate(w.get("rate")), f"round {fmt(rw.get('round_p50_ms'))} ms"])
            rows.append([f"cross: local send (µs/{unit})", fmt(lw.get("us_per_op"))] + dashes
                        + [fmt_rate(lw.get("rate")), f"round {fmt(lw.get('round_p50_ms'))} ms"])
            rows.append(["cross: broker hop (µs/message)", fmt(w.get("hop_us"))] + dashes + ["", ""])
            continue
        label = {"rpc": "rpc echo", "msg": "ping/pong", "fanout": f"fanout {cell[7:]} receivers",
                 "connect": f"connect {cell[8:]}"}[scenario]
        if scenario == "fanout":
            lat = f"tick {fmt(w.get('tick_ms'), '.2f')} ms, round {fmt(w.get('round_p50_ms'), '.0f')} ms"
        else:
            lat = (f"{fmt(w.get('p50_ms'), '.2f')}/{fmt(w.get('p99_ms'), '.2f')} ms"
                   if w.get("p50_ms") is not None else "—")
        rows.append([f"{label} (µs/{unit})", val(cell, "wse_sync", "us_per_op")]
                    + [vs(cell, k, "us_per_op") for k in peers] + [fmt_rate(w.get("rate")), lat])
        if scenario == "fanout" and w.get("peak_rss_mb") is not None:
            rows.append([f"peak RSS fanout {cell[7:]} (MB)", fmt(w.get("peak_rss_mb"))]
                        + [vs(cell, k, "peak_rss_mb") for k in peers]
                        + [f"rise {fmt(w.get('peak_rise_mb'))} MB", ""])
        if scenario == "connect":
            rows.append([f"idle memory {cell[8:]} (KB/conn)", fmt(w.get("kb_per_conn"))]
                        + [vs(cell, k, "kb_per_conn") for k in peers]
                        + [f"all procs {fmt(w.get('kb_per_conn_all'))} KB", ""])
    return rows


def detail_rows(data: Dict[str, Any]) -> List[List[str]]:
    rows = []
    for cell in data["order"]:
        for kind in servers_of(data):
            c = data["cells"].get(cell, {}).get(kind)
            if not c:
                continue
            m = c.get("median") or {}
            runs = [fmt(r.get("us_per_op")) for r in c["runs"]]
            lat = (f"{fmt(m.get('p50_ms'), '.2f')}/{fmt(m.get('p99_ms'), '.2f')}"
                   if m.get("p50_ms") is not None else
                   (f"tick {fmt(m.get('tick_ms'), '.2f')}" if m.get("tick_ms") is not None else ""))
            note = "; ".join(c.get("errors") or [])[:60]
            split = ""
            if kind == "wse_sync":
                parts = [("", m)] if "local" not in m else [("local: ", m["local"]),
                                                            ("remote: ", m["remote"])]
                split = " ".join(prefix + ", ".join(
                    f"{k} {v:.1f}" for k, v in mm.get("us_per_op_by_process", {}).items() if v >= 0.05)
                    for prefix, mm in parts)
            rows.append([cell, SERVER_LABELS[kind], " ".join(runs), fmt_rate(m.get("rate")), lat,
                         fmt(100 * m["server_util"], ".0f") + "%" if "server_util" in m else "—",
                         fmt(100 * m["gen_util"], ".0f") + "%" if "gen_util" in m else "—",
                         fmt(100 * m["cpu0_others"], ".0f") + "%" if "cpu0_others" in m else "—",
                         split, note])
    return rows


def render(header: List[str], rows: List[List[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def versions_line(data: Dict[str, Any]) -> str:
    meta = data.get("meta", {})
    v = meta.get("peer_versions") or {}
    if not v:
        return ""
    loop = "uvloop" if meta.get("asyncio_uvloop") else "asyncio's default loop"
    return (f" Peers: picows {v.get('picows', '?')} on uvloop {v.get('uvloop', '?')},"
            f" websockets {v.get('websockets', '?')} and aiohttp {v.get('aiohttp', '?')}"
            f" on {loop}, ujson {v.get('ujson', '?')} (Python {meta.get('peer_python_version', '?')}).")


def print_tables(data: Dict[str, Any], markdown: bool) -> None:
    peers = [k for k in servers_of(data) if k != "wse_sync"]
    head = (["scenario", "wse_sync"] + [SERVER_LABELS[k] for k in peers]
            + ["rate (wse_sync)", "p50/p99 (wse_sync)"])
    print(render(head, table_rows(data), markdown))
    print()
    print("Server CPU µs per operation (idle memory: KB per connection) for wse_sync and each"
          " peer; in brackets the ratio wse_sync ÷ peer (below 1: wse_sync spends less)."
          + versions_line(data))
    print()
    print("Per server: server CPU µs/op of each run; medians of rate, latency, CPU use of the"
          " server (core 0) and of the generator (core 1), CPU 0 time used by other processes"
          " of the machine during the windows (high = a noisy figure), and wse_sync's CPU split"
          " between its processes:")
    print(render(["cell", "server", "µs/op per run", "rate", "p50/p99 ms", "server CPU",
                  "gen CPU", "others CPU 0", "wse_sync µs/op by process", "errors"],
                 detail_rows(data), markdown))
    print()
    print("G = the load generator used >90% of its core (the rate is the generator's; the µs/op"
          " still counts only the server); ! = errors, see the JSON.")


# ----------------------------------------------------------------------------- main
def run_task(task: Dict[str, Any], servers: List[str], shared: Dict[str, Server],
             args) -> Dict[str, Dict[str, Any]]:
    """Run one task; returns {cell: {server kind: results}}."""
    if task["how"] == "interleaved":
        missing = [k for k in servers if k not in shared]
        if missing:
            started = start_servers(missing, args)
            shared.update(started)
            warm_closed_loops(started, task["opts"]["conns"])
        cell = task["cells"][0]
        return {cell: run_interleaved(cell, task["scenario"], task["opts"], servers, args.runs,
                                      task["slices"], shared)}
    while shared:  # the other scenarios want CPU 0 to themselves
        shared.popitem()[1].stop()
    if task["how"] == "fresh":
        return run_fresh(task, servers, args.runs, args)
    if "wse_sync" in servers:
        return {"cross": run_cross("cross", task["opts"], args.runs, args)}
    return {"cross": {}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short windows, fewer connections (about 4 min)")
    ap.add_argument("--servers", default=",".join(SERVERS), help="comma list of " + ",".join(SERVERS))
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma list of " + ",".join(SCENARIOS))
    ap.add_argument("--runs", type=int, default=3, help="runs per cell (median; default 3)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "latest.json"))
    ap.add_argument("--markdown", action="store_true", help="print markdown tables")
    ap.add_argument("--from-json", default=None, help="reprint the tables of a results file")
    ap.add_argument("--set", action="append", default=[], metavar="SCENARIO.KEY=VALUE",
                    help="override a parameter, e.g. --set rpc.conns=200 --set fanout.sizes=5000")
    ap.add_argument("--gevent-wsaccel", action="store_true",
                    help="let the bare gevent baseline use wsaccel (default: stock pure-Python)")
    ap.add_argument("--peer-python", default=None, metavar="PYTHON",
                    help="the interpreter of the picows, websockets and aiohttp baselines (default:"
                         " this one if it imports them, else bench/.peers-venv, made on first use"
                         " from bench/requirements-peers.txt)")
    ap.add_argument("--asyncio-uvloop", action="store_true",
                    help="run the websockets and aiohttp baselines on uvloop (default: asyncio's"
                         " own loop, as their users get it; picows always runs on uvloop)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)  # stop the servers in the finally clauses

    if args.from_json:
        with open(args.from_json) as f:
            print_tables(json.load(f), args.markdown)
        return 0

    servers = [s for s in args.servers.split(",") if s]
    scenarios = [s for s in args.scenarios.split(",") if s]
    for s in servers:
        if s not in SERVERS:
            ap.error(f"unknown server {s!r}")
    for s in scenarios:
        if s not in SCENARIOS:
            ap.error(f"unknown scenario {s!r}")
    if args.runs < 3:
        log("note: fewer than 3 runs per cell; the medians are less robust")
    if not os.path.isdir(os.path.join(NODE_DIR, "node_modules", "ws")):
        log("installing the load generator's dependencies (npm ci in bench/node)")
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True)
    peer_versions = None
    if any(k in PEERS for k in servers):
        args.peer_python, peer_versions = find_peer_python(args.peer_python)
        log(f"peer baselines: {args.peer_python} ({peer_versions})")
    if CPUS < 2:
        log("WARNING: fewer than 2 CPUs available: server and generator share CPU 0")
    if CPUS >= 2:
        os.sched_setaffinity(0, {1})  # keep this runner off the server's core

    mode = "quick" if args.quick else "full"
    params = json.loads(json.dumps(PARAMS[mode]))
    for item in args.set:
        try:
            key, value = item.split("=", 1)
            scen, name = key.split(".", 1)
            params[scen][name] = ([int(v) for v in value.split(",")] if name == "sizes"
                                  else float(value) if "." in value else int(value))
        except (ValueError, KeyError):
            ap.error(f"bad --set {item!r}")
    raise_fd_limit(max([0] + [n for k in ("fanout", "connect") if k in scenarios
                              for n in params[k]["sizes"]]))
    started = time.monotonic()
    data: Dict[str, Any] = {
        "meta": {"mode": mode, "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                 "commit": _git_head(), "clk_tck": CLK_TCK, "cpus": CPUS,
                 "cpu_model": _cpu_model(), "python": platform.python_version(),
                 "node": subprocess.run(["node", "--version"], capture_output=True,
                                        text=True).stdout.strip(),
                 "runs": args.runs, "gevent_wsaccel": args.gevent_wsaccel, "params": params,
                 "servers": servers, "peer_python": args.peer_python,
                 "peer_versions": peer_versions, "asyncio_uvloop": args.asyncio_uvloop,
                 "peer_python_version": peer_versions and peer_versions.pop("python", None)},
        "cells": {}, "order": [],
    }
    shared: Dict[str, Server] = {}  # servers kept up across the rpc and msg cells
    tasks = plan(scenarios, params)
    data["order"] = sorted((c for t in tasks for c in t["cells"]), key=cell_order)
    try:
        for task in tasks:
            log(f"{' + '.join(task['cells'])} ({time.monotonic() - started:.0f} s)")
            try:
                results = run_task(task, servers, shared, args)
            except (LoadgenError, OSError, KeyError, ValueError, TypeError) as exc:
                # report what failed and go on with the other cells
                log(f"  {' + '.join(task['cells'])}: FAILED\n{traceback.format_exc()}")
                results = {cell: {"_error": {"runs": [], "errors": [repr(exc)], "params": task["opts"]}}
                           for cell in task["cells"]}
            for cell, cells in results.items():
                for c in cells.values():
                    c["median"] = median_of(c["runs"]) if c["runs"] else None
                data["cells"][cell] = cells
            save(data, args.out)
    except KeyboardInterrupt:
        log("interrupted: printing what was measured")
    finally:
        for server in shared.values():
            server.stop()
    data["meta"]["elapsed_s"] = time.monotonic() - started
    save(data, args.out)
    print(f"\n{mode} mode, {args.runs} runs per cell, {data['meta']['elapsed_s']:.0f} s;"
          f" server on CPU 0, generator on CPU 1; results in {os.path.relpath(args.out)}\n")
    print_tables(data, args.markdown)
    return 0


def raise_fd_limit(conns: int) -> None:
    """Raise RLIMIT_NOFILE for this runner and so for the servers and generators it
    starts: each of them holds ``conns`` sockets at once (10,000 in the full run)."""
    need = conns + 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        try:  # root (CAP_SYS_RESOURCE) may raise the hard limit too
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
            return
        except (ValueError, OSError):
            log(f"WARNING: the open-file limit is {hard} (ulimit -Hn): the cells with {conns}"
                f" connections need about {need}; they will fail (raise it, or --set connect.sizes=...)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def peer_versions_of(python: str) -> tuple:
    """({module: version, "python": X.Y.Z} or None, error text) for ``python``."""
    try:
        out = subprocess.run([python, "-c", PEER_CHECK], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, str(exc)
    if out.returncode:
        return None, (out.stderr.strip().splitlines() or ["failed"])[-1]
    return json.loads(out.stdout.strip().splitlines()[-1]), ""


def find_peer_python(requested: Optional[str]) -> tuple:
    """(interpreter, versions) for the Python peer baselines: ``requested`` (it must
    import them), else this interpreter if it does, else bench/.peers-venv (made and
    filled from bench/requirements-peers.txt when missing or incomplete)."""
    if requested:
        versions, err = peer_versions_of(requested)
        if versions is None:
            raise SystemExit(f"--peer-python {requested}: cannot import the peers' modules: {err}"
                             f" (pip install -r {os.path.relpath(PEERS_REQUIREMENTS)})")
        return requested, versions
    versions, _ = peer_versions_of(sys.executable)
    if versions is not None:
        return sys.executable, versions
    venv_python = os.path.join(PEERS_VENV, "bin", "python")
    if os.path.exists(venv_python):
        versions, _ = peer_versions_of(venv_python)
        if versions is not None:
            return venv_python, versions
    log(f"installing the peer baselines' modules in {os.path.relpath(PEERS_VENV)}"
        f" (pip install -r {os.path.relpath(PEERS_REQUIREMENTS)})")
    for cmd in ([sys.executable, "-m", "venv", PEERS_VENV],
                [venv_python, "-m", "pip", "install", "--disable-pip-version-check", "-q",
                 "-r", PEERS_REQUIREMENTS]):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if out.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{(out.stdout + out.stderr)[-3000:]}")
    versions, err = peer_versions_of(venv_python)
    if versions is None:
        raise SystemExit(f"{venv_python}: the peers' modules still do not import: {err}")
    return venv_python, versions


def save(data: Dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _git_head() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True)
    return out.stdout.strip()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
