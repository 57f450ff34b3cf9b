"""Crowd: tens of thousands of real WebSocket users on a real cluster, through
broker and worker kills and a rolling restart, with the invariants checked
after each step.

    python bench/crowd.py                                  # 40,000 users, 4 workers: minutes
    python bench/crowd.py --users 2000 --workers 2 --client-procs 2
    python bench/crowd.py --users 10000 --steps connect,paced,rolling --json out.json

What runs (every process real, all on this machine):

- a broker: ``wse-sync broker --bind ipc://TMP/broker.sock``;
- ``wse-sync serve bench/crowd_app.py:server --workers W --broker ipc://...``
  (its supervisor starts and respawns the workers; no broker of its own);
- ``--client-procs`` processes of bench/crowd_client.py (default one per
  5,000 users: a process may hold 20,000 descriptors here), each holding its
  share of the users, one raw WebSocket per user, bound to source addresses
  127.0.0.1 .. 127.0.0.<--addresses>, reconnecting as the wse JS client does.

Steps (``--steps``, comma-separated; ``connect`` always runs first):

- ``connect``: every user connects (at most --connect-concurrency first
  connections in flight per client process);
- ``paced``: --senders users call RPC ``note`` (the server ``send``s to a
  user on another worker) --rate times a second each for --send-seconds;
- ``saturate``: the same senders, each as fast as the answers come;
- ``broker-kill``: kill -9 of the broker, a new one on the same endpoint a
  second later (its default --sync-window);
- ``worker-kill``: kill -9 of one worker; serve's supervisor starts another
  and its users reconnect;
- ``rolling``: SIGHUP to serve's supervisor (docs/operations.md): the workers
  are replaced one at a time; timed until every user is back.

After each step the harness waits (bounded: --settle, scaled with the
users) until the invariants hold, then reports them:

- ``users back``: every user connected and welcomed;
- ``no user lost``: no user closed with a code the JS client does not
  reconnect after (e.g. 1000 wse.not-authorized);
- ``map = tables = clients``: the broker's map (``wse-sync stats``: users,
  connections, connections per worker; the set of (user, connection) through
  ``connect_cluster().clients``) equals the union of the workers' own tables
  (RPC ``table``: ``server.hub.connections()``) equals what the clients hold;
- ``joined/left balanced``: for every user, joined − left events (logged by
  the app, one file per worker pid) is 1 when connected, else 0;
- ``no spurious left``: no user got more ``left`` events than welcomed
  connections it lost;
- ``sends delivered once``: every accepted ``note`` reached its user exactly
  once (a note whose target reconnected meanwhile is excused and counted);
- ``logs clean``: the serve and broker logs of the step have no worker
  declared dead (``silent for``), ``Traceback``, ``broker-unavailable`` or
  ``abandoning``;
- ``in time``: the step settled within its bound.

Prints a table per step and PASS/FAIL per invariant; exits 1 when one
fails. Everything stops by itself: --time-limit for the whole run (a
watchdog kills what is left), every child killed in ``finally`` (and by
PR_SET_PDEATHSIG should this process die), temp directory removed.
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import glob
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable
APP = os.path.join(HERE, "crowd_app.py") + ":server"
CLIENT = os.path.join(HERE, "crowd_client.py")

ALL_STEPS = ("connect", "paced", "saturate", "broker-kill", "worker-kill", "rolling")
INVARIANTS = ("users back", "no user lost", "map = tables = clients", "joined/left balanced",
              "no spurious left", "sends delivered once", "logs clean", "in time")
# what "logs clean" looks for in the serve and broker logs
LOG_PATTERNS = {
    "worker declared dead": re.compile(r"worker \S+ \(pid \d+\) silent for"),
    "Traceback": re.compile(r"Traceback"),
    "broker-unavailable": re.compile(r"broker-unavailable"),
    "abandoning": re.compile(r"abandoning"),
}
# counted and shown, not failed on
LOG_INFO = {
    "connection silent (ping)": re.compile(r"connection \S+ silent for"),
    "auth timeout": re.compile(r"did not authenticate in time"),
    "refused a connection": re.compile(r"refused a connection"),
    "join decided locally": re.compile(r"did not answer a join"),
    "broker-busy": re.compile(r"broker-busy"),
    "ERROR lines": re.compile(r" ERROR "),
}


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the harness's (main) thread dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children_of(pid: int) -> List[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return out


def cmdline(pid: int) -> List[str]:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read().split("\0")
    except OSError:
        return []


def usage(pid: int) -> Tuple[float, float]:
    """(VmRSS KB, CPU seconds: utime + stime) of a process; (0, 0) once gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration, IndexError, ValueError):
        return 0.0, 0.0
    return float(rss), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class ClientProc:
    """One bench/crowd_client.py process and its JSON-lines conversation."""

    def __init__(self, index: int, first: int, count: int, url: str, args: Any,
                 log_path: str, deadline: float) -> None:
        self.index, self.first, self.count = index, first, count
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [PY, CLIENT, "--url", url, "--first", str(first), "--count", str(count),
             "--addresses", str(args.addresses),
             "--connect-concurrency", str(args.connect_concurrency),
             "--rpc-timeout", str(args.rpc_timeout), "--deadline", str(deadline)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, cwd=ROOT,
            preexec_fn=_die_with_parent)
        self.replies: Dict[Any, dict] = {}
        self.cond = threading.Condition()
        self.n = 0
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            with self.cond:
                self.replies[obj.get("id")] = obj
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def ask(self, cmd: str, **kw: Any) -> Any:
        self.n += 1
        rid = f"{cmd}-{self.n}"
        try:
            self.proc.stdin.write((json.dumps(dict(kw, id=rid, cmd=cmd)) + "\n").encode())
            self.proc.stdin.flush()
        except (OSError, ValueError):
            return None
        return rid

    def wait(self, rid: Any, timeout: float) -> Optional[dict]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while rid not in self.replies:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.proc.poll() is not None:
                    return self.replies.pop(rid, None)
                self.cond.wait(min(remaining, 0.5))
            return self.replies.pop(rid)

    def stop(self) -> None:
        try:
            self.ask("quit")
            self.proc.stdin.close()
        except (OSError, ValueError):
            pass
        try:
            self.proc.wait(3)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class Harness:
    def __init__(self, args: Any) -> None:
        self.args = args
        self.n = args.users
        self.t_start = time.monotonic()
        self.t_end = self.t_start + args.time_limit
        self.tmp = tempfile.mkdtemp(prefix="wse-crowd-")
        self.events_dir = os.path.join(self.tmp, "events")
        os.mkdir(self.events_dir)
        self.endpoint = f"ipc://{self.tmp}/broker.sock"
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}/"
        self.serve_log = os.path.join(self.tmp, "serve.log")
        self.broker_log = os.path.join(self.tmp, "broker.log")
        self.broker: Optional[subprocess.Popen] = None
        self.serve: Optional[subprocess.Popen] = None
        self.clients: List[ClientProc] = []
        self.workers_seen: set = set()
        self.files: List[Any] = []
        self.steps: List[dict] = []
        self.phases: List[str] = []          # send phases run so far
        self._prev: Dict[str, Any] = {}      # the last step's cumulative counts
        # the server's scale-dependent timeouts, scaled with the crowd (see server_flags)
        self.scale = min(1.0, self.n / 40000) if args.scale_timeouts else 1.0

    # -- processes -----------------------------------------------------------------
    def _logfile(self, path: str) -> Any:
        f = open(path, "ab")
        self.files.append(f)
        return f

    def start_broker(self, fresh: bool) -> None:
        # a fresh cluster needs no sync window; a restarted broker keeps its default
        window = ["--sync-window", "0"] if fresh else []
        mark = os.path.getsize(self.broker_log) if os.path.exists(self.broker_log) else 0
        self.broker = subprocess.Popen(
            [PY, "-m", "wse_sync", "broker", "--bind", self.endpoint, *window,
             "--log-level", "info"], stdout=subprocess.DEVNULL,
            stderr=self._logfile(self.broker_log), cwd=ROOT, preexec_fn=_die_with_parent)
        self.wait_log(self.broker_log, r"broker listening on", 1, 30, mark)

    def server_flags(self) -> List[str]:
        n, scale = self.n, self.scale
        # a worker may hold 20,000 descriptors here: stay below, whatever the kernel's
        # spread of connections over the workers sharing the port
        max_conn = min(n + 1000, 19000)
        # The timeouts that bound a connection's handshake under a reconnect storm
        # (header, ~wse:hi, identify + join) are 10 s, sized for a large crowd: a
        # storm of 10,000 reconnects queues handshakes for seconds. A CI-sized
        # crowd queues them for a fraction of that, so these timeouts are scaled
        # down in proportion (users / 40,000, at least 1 s) to put the server
        # under the same pressure; --no-scale-timeouts keeps the defaults.
        t = max(1.0, 10.0 * scale)
        return ["--max-connections", str(max_conn), "--max-connections-per-ip", str(max_conn),
                # the 8 source addresses stand for thousands of real client addresses
                "--max-unauthenticated-per-ip", "1000",
                "--header-timeout", f"{t:g}", "--handshake-timeout", f"{t:g}",
                "--auth-timeout", f"{t:g}", *self.args.serve_flag]

    def start_serve(self) -> None:
        env = dict(os.environ, WSE_CROWD_LOG_DIR=self.events_dir)
        self.serve = subprocess.Popen(
            [PY, "-m", "wse_sync", "serve", APP, "--workers", str(self.args.workers),
             "--broker", self.endpoint, "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "info", *self.server_flags()],
            stdout=subprocess.DEVNULL, stderr=self._logfile(self.serve_log), cwd=ROOT, env=env,
            preexec_fn=_die_with_parent)
        self.wait_log(self.serve_log, r"worker \d+ serving", self.args.workers, 60)
        self.workers()

    def workers(self) -> List[int]:
        pids = [p for p in children_of(self.serve.pid) if "_worker" in cmdline(p)]
        self.workers_seen.update(pids)
        return sorted(pids)

    def start_clients(self) -> None:
        procs = self.args.client_procs or max(1, math.ceil(self.n / 5000))
        per = math.ceil(self.n / procs)
        deadline = time.time() + self.args.time_limit + 60
        first = 0
        for i in range(procs):
            count = min(per, self.n - first)
            if count <= 0:
                break
            self.clients.append(ClientProc(i, first, count, self.url, self.args,
                                           os.path.join(self.tmp, f"client-{i}.log"), deadline))
            first += count
        for c in self.clients:
            if c.wait("started", 60) is None:
                raise RuntimeError(f"client process {c.index} did not start:\n"
                                   + open(os.path.join(self.tmp, f"client-{c.index}.log")).read())

    def wait_log(self, path: str, pattern: str, count: int, timeout: float,
                 offset: int = 0) -> List[str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = [line for line in self.read_log(path, offset) if rx.search(line)]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {count} line(s) {pattern!r} in {path} in {timeout}s:\n"
                                   + "\n".join(self.read_log(path, offset)[-30:]))
            time.sleep(0.1)

    @staticmethod
    def read_log(path: str, offset: int = 0) -> List[str]:
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return []

    def log_offsets(self) -> Dict[str, int]:
        paths = [self.serve_log, self.broker_log] + glob.glob(os.path.join(self.tmp, "client-*"))
        return {p: os.path.getsize(p) for p in paths if os.path.exists(p)}

    def scan_logs(self, offsets: Dict[str, int], excuse: Optional[int] = None) -> Dict[str, Any]:
        """What the logs say since ``offsets``; the broker declaring dead the
        worker this step killed (pid ``excuse``) is expected, not a failure."""
        hits: Dict[str, int] = collections.Counter()
        info: Dict[str, int] = collections.Counter()
        examples: List[str] = []
        for path in [self.serve_log, self.broker_log]:
            for line in self.read_log(path, offsets.get(path, 0)):
                if excuse is not None and f"(pid {excuse}) silent for" in line:
                    info["killed worker declared dead"] += 1
                    continue
                for name, rx in LOG_PATTERNS.items():
                    if rx.search(line):
                        hits[name] += 1
                        if len(examples) < 8:
                            examples.append(line[:300])
                for name, rx in LOG_INFO.items():
                    if rx.search(line):
                        info[name] += 1
        for path in glob.glob(os.path.join(self.tmp, "client-*")):
            for line in self.read_log(path, offsets.get(path, 0)):
                if "Traceback" in line:
                    info["client Traceback"] += 1
        return {"fail": dict(hits), "info": dict(info), "examples": examples}

    def stop_all(self) -> None:
        for c in self.clients:
            try:
                c.stop()
            except Exception:
                pass
        if self.serve is not None and self.serve.poll() is None:
            self.serve.send_signal(signal.SIGTERM)
            try:
                self.serve.wait(20)
            except subprocess.TimeoutExpired:
                self.serve.kill()
                self.serve.wait()
        for pid in self.workers_seen:
            if alive(pid) and "_worker" in cmdline(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        if self.broker is not None and self.broker.poll() is None:
            self.broker.kill()
            self.broker.wait()
        for f in self.files:
            f.close()

    def emergency_kill(self) -> None:
        """The watchdog's last word: SIGKILL everything this run started."""
        pids = [c.proc.pid for c in self.clients] + list(self.workers_seen)
        for p in (self.serve, self.broker):
            if p is not None:
                pids.append(p.pid)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    # -- asking the clients ------------------------------------------------------------
    def ask_all(self, cmd: str, timeout: float, per: Optional[List[dict]] = None,
                **kw: Any) -> List[Optional[dict]]:
        rids = []
        for i, c in enumerate(self.clients):
            extra = per[i] if per is not None else {}
            rids.append(c.ask(cmd, **kw, **extra))
        return [c.wait(r, timeout) if r is not None else None
                for c, r in zip(self.clients, rids)]

    def status(self) -> dict:
        total: Dict[str, Any] = collections.Counter()
        closes: Dict[str, int] = collections.Counter()
        failures: Dict[str, int] = collections.Counter()
        lost_users: List[Any] = []
        p99 = []
        answered = 0
        for r in self.ask_all("status", 30):
            if r is None or "error" in r:
                continue
            answered += 1
            for k in ("ready", "connecting", "waiting", "lost", "welcomes"):
                total[k] += r[k]
            closes.update(r["closes"])
            failures.update(r["failures"])
            lost_users += r["lost_users"]
            if r.get("welcome_p99") is not None:
                p99.append(r["welcome_max"])
        out = dict(total)
        out.update(answered=answered, closes=dict(closes), failures=dict(failures),
                   lost_users=lost_users[:20],
                   welcome_max=max(p99) if p99 else None)
        return out

    # -- the checks ----------------------------------------------------------------------
    def broker_stats(self) -> Optional[dict]:
        try:
            out = subprocess.run([PY, "-m", "wse_sync", "stats", "--broker", self.endpoint,
                                  "--timeout", "5"], capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            return None
        return json.loads(out.stdout) if out.returncode == 0 else None

    def broker_map(self) -> Optional[set]:
        """{(cid, conn_id)} of the broker's map, through a connect_cluster handle."""
        from wse_sync import WseError, connect_cluster
        try:
            handle = connect_cluster(self.endpoint, timeout=10)
        except (WseError, OSError) as exc:
            print(f"  (connect_cluster: {exc})", flush=True)
            return None
        try:
            clients = handle.clients
            return {(cid, conn_id) for cid, user in clients.items() for conn_id in user.conns}
        except Exception as exc:
            print(f"  (connect_cluster().clients: {exc!r})", flush=True)
            return None
        finally:
            try:
                handle.close(timeout=5)
            except Exception:
                pass

    def tables(self, pids: List[int]) -> Dict[int, dict]:
        found: Dict[int, dict] = {}
        for c in self.clients:
            missing = [p for p in pids if p not in found]
            if not missing:
                break
            rid = c.ask("tables", pids=missing)
            r = c.wait(rid, 60) if rid is not None else None
            if r is None or "error" in r:
                continue
            for pid, t in r["tables"].items():
                found[int(pid)] = t
        return found

    def events(self) -> tuple:
        joined: Dict[str, int] = collections.Counter()
        left: Dict[str, int] = collections.Counter()
        left_codes: Dict[str, int] = collections.Counter()
        for path in glob.glob(os.path.join(self.events_dir, "events-*.log")):
            for line in self.read_log(path):
                try:
                    pid, event, cid, code, reason, _at = json.loads(line)
                except ValueError:
                    continue  # a line cut by a kill -9
                if event == "joined":
                    joined[cid] += 1
                elif event == "left":
                    left[cid] += 1
                    left_codes[f"{code} {reason}"] += 1
        return joined, left, left_codes

    def full_check(self, phase: Optional[str]) -> dict:
        """Every invariant that can be read now; ``ok``: all hold."""
        out: Dict[str, Any] = {}
        # what the clients hold
        welcomed = self.ask_all("welcomed", 60)
        clients: set = set()
        disc: Dict[str, int] = collections.Counter()
        lost: List[str] = []
        client_pids: Dict[int, int] = collections.Counter()
        for r in welcomed:
            if r is None or "error" in r:
                out["clients error"] = True
                continue
            for cid, conn_id, pid in r["users"]:
                clients.add((cid, conn_id))
                client_pids[pid] += 1
            disc.update(r["disc"])
            lost += r["lost"]
        ready_cids = {cid for cid, _ in clients}
        out["clients"] = len(clients)
        out["lost"] = len(lost)
        # the workers' own tables
        pids = self.workers()
        tables = self.tables(pids)
        table_set: set = set()
        dup = 0
        per_pid_tables = {}
        for pid, t in tables.items():
            rows = {(cid, conn_id) for cid, conn_id in t["conns"]}
            dup += len(table_set & rows)
            table_set |= rows
            per_pid_tables[pid] = len(rows)
        out["tables"] = len(table_set)
        out["tables_missing"] = [p for p in pids if p not in tables]
        # the broker's map
        stats = self.broker_stats()
        if stats is not None:
            out["map_users"] = stats.get("users")
            out["map_connections"] = stats.get("connections")
            per_pid_map = {w["pid"]: w["connections"] for w in stats.get("workers", {}).values()
                           if w.get("serves", True) and w.get("connections")}
        else:
            out["map_users"] = out["map_connections"] = None
            per_pid_map = None
        counts_equal = (stats is not None and out["map_users"] == len(ready_cids)
                        and out["map_connections"] == len(clients)
                        and per_pid_map == {p: n for p, n in per_pid_tables.items() if n})
        # the whole map (a snapshot streamed to a cluster handle: work for the
        # broker) only once the counts agree, not on every poll of a wait
        map_set = self.broker_map() if counts_equal else None
        out["map_set"] = len(map_set) if map_set is not None else None
        sets_equal = (map_set is not None and map_set == table_set == clients and dup == 0
                      and not out["tables_missing"])
        out["map_ok"] = bool(sets_equal and counts_equal)
        if not out["map_ok"]:
            diff = {}
            if map_set is not None:
                diff["map - clients"] = len(map_set - clients)
                diff["clients - map"] = len(clients - map_set)
                diff["map - tables"] = len(map_set - table_set)
                diff["tables - map"] = len(table_set - map_set)
                ex = sorted(map_set - clients)[:3] + sorted(clients - map_set)[:3]
                diff["examples"] = [list(e) for e in ex]
            diff["clients - tables"] = len(clients - table_set)
            diff["tables - clients"] = len(table_set - clients)
            diff["in two tables"] = dup
            diff["per pid map"] = per_pid_map
            diff["per pid tables"] = per_pid_tables
            diff["per pid clients"] = dict(client_pids)
            out["map_diff"] = diff
        # joined / left
        joined, left, left_codes = self.events()
        bad_balance = []
        spurious = 0
        spurious_users = []
        for i in range(self.n):
            cid = f"u{i}"
            want = 1 if cid in ready_cids else 0
            if joined[cid] - left[cid] != want:
                bad_balance.append([cid, joined[cid], left[cid], want])
            extra = left[cid] - disc[cid]
            if extra > 0:
                spurious += extra
                if len(spurious_users) < 5:
                    spurious_users.append([cid, left[cid], disc[cid]])
        out["joined"] = sum(joined.values())
        out["left"] = sum(left.values())
        out["left_codes"] = dict(left_codes)
        out["disconnects"] = sum(disc.values())
        out["balance_bad"] = len(bad_balance)
        out["balance_examples"] = bad_balance[:5]
        out["spurious_left"] = spurious
        out["spurious_examples"] = spurious_users
        # notes
        notes_ok = True
        if phase is not None:
            agg: Dict[str, int] = collections.Counter()
            examples: Dict[str, list] = collections.defaultdict(list)
            for r in self.ask_all("notes", 60, phase=phase):
                if r is None or "error" in r:
                    notes_ok = False
                    continue
                agg.update(r["notes"])
                for k, v in r["examples"].items():
                    examples[k] += v
            out["notes"] = dict(agg)
            out["notes_examples"] = {k: v[:5] for k, v in examples.items()}
            notes_ok = notes_ok and not (agg["lost"] or agg["duplicated"]
                                         or agg["misdelivered (all phases)"])
        out["notes_ok"] = notes_ok
        out["ok"] = (out["map_ok"] and not bad_balance and not spurious and notes_ok
                     and len(clients) + len(lost) == self.n)
        return out

    # -- steps ----------------------------------------------------------------------------
    def bound(self, name: str) -> float:
        settle = self.args.settle or (30 + self.n / 400)
        if name == "connect":
            settle += self.n / 250
        if name == "rolling":
            settle += 30 * self.args.workers
        return settle

    def remaining(self) -> float:
        return self.t_end - time.monotonic()

    def converge(self, rec: dict, t0: float, bound: float, phase: Optional[str] = None,
                 ready_when=None) -> None:
        """Wait until every user is settled (connected, or lost for good), then
        until the full check holds; bounded by ``bound`` from ``t0``."""
        deadline = min(t0 + bound, self.t_end - 20)
        st = None
        while True:
            st = self.status()
            settled = st.get("ready", 0) + st.get("lost", 0) == self.n
            if settled and (ready_when is None or ready_when()):
                rec["back_s"] = round(time.monotonic() - t0, 2)
                break
            if time.monotonic() > deadline:
                rec["back_s"] = None
                break
            time.sleep(0.5)
        while True:
            check = self.full_check(phase)
            if check["ok"] or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        st = self.status()
        rec["duration_s"] = round(time.monotonic() - t0, 2)
        rec["in_time"] = bool(check["ok"]) and time.monotonic() <= deadline + 5
        rec["status"] = st
        rec["check"] = check

    def step_connect(self, rec: dict) -> None:
        pids = self.workers() + [self.broker.pid]
        before = {pid: usage(pid) for pid in pids}
        t0 = time.monotonic()
        self.start_clients()
        self.converge(rec, t0, self.bound("connect"))
        after = {pid: usage(pid) for pid in pids}
        # what the crowd costs the servers: the workers' memory per connection held,
        # and their CPU (and the broker's) per connect + hi -> welcome
        workers = pids[:-1]
        rec["worker_kb_per_conn"] = round(sum(after[p][0] - before[p][0] for p in workers)
                                          / self.n, 1)
        rec["worker_cpu_us_per_connect"] = round(
            sum(after[p][1] - before[p][1] for p in workers) * 1e6 / self.n)
        broker = pids[-1]
        rec["broker_cpu_us_per_connect"] = round((after[broker][1] - before[broker][1])
                                                 * 1e6 / self.n)

    def _send(self, rec: dict, mode: str) -> None:
        phase = mode
        self.phases.append(phase)
        k = len(self.clients)
        senders = [self.args.senders // k + (1 if i < self.args.senders % k else 0)
                   for i in range(k)]
        t0 = time.monotonic()
        per = [{"senders": s} for s in senders]
        answers = self.ask_all("send", self.args.send_seconds + 2 * self.args.rpc_timeout + 60,
                               per=per, phase=phase, mode=mode, rate=self.args.rate,
                               duration=self.args.send_seconds)
        agg: Dict[str, int] = collections.Counter()
        p99 = []
        for a in answers:
            if a is None or "error" in a:
                agg["harness: no answer from a client process"] += 1
                continue
            agg.update(a["answers"])
            if a.get("rpc_p99") is not None:
                p99.append(a["rpc_p99"])
        rec["send_s"] = round(time.monotonic() - t0, 2)
        rec["calls"] = sum(agg.values())
        rec["answers"] = dict(agg)
        rec["refusals"] = {k: v for k, v in agg.items() if k != "ok"}
        rec["rate_per_s"] = round(agg.get("ok", 0) / max(0.001, self.args.send_seconds), 1)
        rec["rpc_p99_s"] = round(max(p99), 3) if p99 else None
        self.converge(rec, t0, self.args.send_seconds + self.bound(mode), phase=phase)

    def step_paced(self, rec: dict) -> None:
        self._send(rec, "paced")

    def step_saturate(self, rec: dict) -> None:
        self._send(rec, "closed")

    def step_broker_kill(self, rec: dict) -> None:
        t0 = time.monotonic()
        os.kill(self.broker.pid, signal.SIGKILL)
        self.broker.wait()
        time.sleep(1.0)
        self.start_broker(fresh=False)
        rec["broker_restart_s"] = round(time.monotonic() - t0, 2)
        self.converge(rec, t0, self.bound("broker-kill"))

    def step_worker_kill(self, rec: dict) -> None:
        before = self.workers()
        victim = random.choice(before)
        started = len(self.read_log(self.serve_log))
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        rec["victim"] = victim

        def respawned() -> bool:
            lines = self.read_log(self.serve_log)[started:]
            if not (any(re.search(r"worker \d+ serving", line) for line in lines)
                    and len(self.workers()) == self.args.workers):
                return False
            # and the broker has removed the dead worker (3 s without its heartbeat),
            # so that what follows from its death belongs to this step
            stats = self.broker_stats()
            return stats is not None and all(w.get("pid") != victim
                                             for w in stats.get("workers", {}).values())

        self.converge(rec, t0, self.bound("worker-kill"), ready_when=respawned)

    def step_rolling(self, rec: dict) -> None:
        started = len(self.read_log(self.serve_log))
        t0 = time.monotonic()
        os.kill(self.serve.pid, signal.SIGHUP)
        done_at: List[float] = []

        def rolled() -> bool:
            if not done_at and any("rolling restart done" in line
                                   for line in self.read_log(self.serve_log)[started:]):
                done_at.append(time.monotonic())
            return bool(done_at)

        self.converge(rec, t0, self.bound("rolling"), ready_when=rolled)
        rec["roll_s"] = round(done_at[0] - t0, 2) if done_at else None

    def _deltas(self, rec: dict) -> None:
        """This step's share of the cumulative counts (closes, events)."""
        prev = self._prev
        st, c = rec.get("status", {}), rec.get("check", {})
        now = {"closes": st.get("closes", {}), "failures": st.get("failures", {}),
               "left_codes": c.get("left_codes", {})}
        for key, counts in now.items():
            before = prev.get(key, {})
            rec[key + "_step"] = {k: v - before.get(k, 0) for k, v in counts.items()
                                  if v - before.get(k, 0)}
        for key in ("joined", "left", "spurious_left", "disconnects"):
            if c.get(key) is not None:
                rec[key + "_step"] = c[key] - prev.get(key, 0)
                now[key] = c[key]
        self._prev = now

    # -- the run --------------------------------------------------------------------------
    def run(self, steps: List[str]) -> dict:
        print(f"crowd: {self.n} users, {self.args.workers} workers, {self.args.addresses}"
              f" source addresses, steps {','.join(steps)}; timeouts x{self.scale:g}"
              f" (server flags: {' '.join(self.server_flags())}); tmp {self.tmp}", flush=True)
        self.start_broker(fresh=True)
        self.start_serve()
        for name in steps:
            if self.remaining() < 30:
                self.steps.append({"step": name, "skipped": "time limit", "in_time": False})
                print(f"step {name}: skipped (time limit)", flush=True)
                continue
            rec: Dict[str, Any] = {"step": name}
            offsets = self.log_offsets()
            print(f"step {name} ...", flush=True)
            try:
                getattr(self, "step_" + name.replace("-", "_"))(rec)
            except Exception as exc:
                rec["error"] = repr(exc)
                rec["in_time"] = False
                print(f"step {name}: {exc!r}", flush=True)
            rec["logs"] = self.scan_logs(offsets, excuse=rec.get("victim"))
            self._deltas(rec)
            rec["invariants"] = evaluate(rec, self.n)
            self.steps.append(rec)
            print(step_line(rec), flush=True)
            if "error" in rec and name == "connect":
                break
        final: Dict[str, bool] = {}
        for inv in INVARIANTS:
            final[inv] = all(s.get("invariants", {}).get(inv, False) for s in self.steps)
        return {"users": self.n, "workers": self.args.workers, "steps": self.steps,
                "invariants": final, "pass": all(final.values()),
                "seconds": round(time.monotonic() - self.t_start, 1)}


def evaluate(rec: dict, n: int) -> Dict[str, bool]:
    c = rec.get("check", {})
    st = rec.get("status", {})
    logs = rec.get("logs", {}).get("fail", {})
    if not c:
        return {inv: False for inv in INVARIANTS}
    return {
        "users back": c.get("clients") == n,
        "no user lost": st.get("lost", 1) == 0 and c.get("lost", 1) == 0,
        "map = tables = clients": bool(c.get("map_ok")),
        "joined/left balanced": c.get("balance_bad", 1) == 0,
        "no spurious left": c.get("spurious_left", 1) == 0,
        "sends delivered once": bool(c.get("notes_ok")),
        "logs clean": not any(logs.values()),
        "in time": bool(rec.get("in_time")),
    }


def step_line(rec: dict) -> str:
    c = rec.get("check", {})
    inv = rec.get("invariants", {})
    failed = [k for k, v in inv.items() if not v]
    parts = [f"step {rec['step']}: {rec.get('duration_s')} s (back {rec.get('back_s')} s)",
             f"clients {c.get('clients')} map {c.get('map_users')}/{c.get('map_connections')}"
             f" tables {c.get('tables')} lost {c.get('lost')}",
             f"joined +{rec.get('joined_step')} left +{rec.get('left_step')} spurious"
             f" {c.get('spurious_left')} unbalanced {c.get('balance_bad')}"]
    if "notes" in c:
        parts.append(f"notes {c['notes']}")
    if rec.get("refusals"):
        parts.append(f"refusals {rec['refusals']}")
    parts.append("OK" if not failed else "FAILED: " + ", ".join(failed))
    return "; ".join(parts)


def print_report(result: dict) -> None:
    rows = [("step", "dur s", "back s", "users back", "lost", "refusals", "joined/left (spur.)",
             "map u/c", "tables", "clients", "sets", "unbal.", "notes lost/dup", "log hits")]
    for s in result["steps"]:
        c = s.get("check", {})
        notes = c.get("notes")
        ref = s.get("refusals") or {}
        rows.append((
            s["step"], str(s.get("duration_s", "-")), str(s.get("back_s", "-")),
            f"{c.get('clients', '-')}/{result['users']}", str(c.get("lost", "-")),
            ",".join(f"{k}:{v}" for k, v in ref.items()) or "-",
            f"{s.get('joined_step', '-')}/{s.get('left_step', '-')}"
            f" ({s.get('spurious_left_step', '-')})",
            f"{c.get('map_users', '-')}/{c.get('map_connections', '-')}",
            str(c.get("tables", "-")), str(c.get("clients", "-")),
            "=" if c.get("map_ok") else "≠", str(c.get("balance_bad", "-")),
            f"{notes.get('lost', 0)}/{notes.get('duplicated', 0)}" if notes else "-",
            ",".join(f"{k}:{v}" for k, v in s.get("logs", {}).get("fail", {}).items()) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)))
    print()
    for s in result["steps"]:
        extra = []
        for key in ("worker_kb_per_conn", "worker_cpu_us_per_connect",
                    "broker_cpu_us_per_connect", "victim", "roll_s", "broker_restart_s",
                    "send_s", "calls", "rate_per_s", "rpc_p99_s", "error", "skipped"):
            if key in s:
                extra.append(f"{key}={s[key]}")
        c = s.get("check", {})
        st = s.get("status", {})
        if s.get("closes_step"):
            extra.append(f"client closes={s['closes_step']}")
        if s.get("failures_step"):
            extra.append(f"connect failures={s['failures_step']}")
        if st.get("welcome_max") is not None:
            extra.append(f"slowest welcome so far={st['welcome_max']:.2f}s")
        if st.get("lost_users"):
            extra.append(f"lost users={st['lost_users'][:5]}")
        if s.get("left_codes_step"):
            extra.append(f"left codes={s['left_codes_step']}")
        if c.get("map_diff"):
            extra.append(f"map diff={c['map_diff']}")
        if c.get("balance_examples"):
            extra.append(f"unbalanced e.g. [cid, joined, left, want]={c['balance_examples']}")
        if c.get("spurious_examples"):
            extra.append(f"spurious e.g. [cid, left, lost conns]={c['spurious_examples']}")
        if c.get("notes"):
            extra.append(f"notes={c['notes']}")
        if c.get("notes_examples"):
            extra.append(f"notes e.g.={c['notes_examples']}")
        logs = s.get("logs", {})
        if logs.get("info"):
            extra.append(f"log info={logs['info']}")
        if logs.get("examples"):
            extra.append("log lines:\n      " + "\n      ".join(logs["examples"]))
        print(f"{s['step']}: " + ("\n    ".join(extra) if extra else "-"))
    print()
    for inv, ok in result["invariants"].items():
        failed_in = [s["step"] for s in result["steps"]
                     if not s.get("invariants", {}).get(inv, False)]
        print(f"{'PASS' if ok else 'FAIL'}  {inv}" + (f"  (failed in: {', '.join(failed_in)})"
                                                      if failed_in else ""))
    print(f"\ncrowd: {'PASS' if result['pass'] else 'FAIL'} ({result['seconds']} s)")


def parse_args(argv: Optional[List[str]] = None) -> Any:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=40000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--addresses", type=int, default=8, help="source addresses 127.0.0.1..N")
    ap.add_argument("--client-procs", type=int, default=0,
                    help="client processes (default: one per 5,000 users)")
    ap.add_argument("--steps", default=",".join(ALL_STEPS),
                    help=f"comma-separated, of {', '.join(ALL_STEPS)}")
    ap.add_argument("--time-limit", type=float, default=1800,
                    help="seconds for the whole run; everything is killed after")
    ap.add_argument("--settle", type=float, default=0,
                    help="seconds a step may take to settle (default: 30 + users/400,"
                         " more for connect and rolling)")
    ap.add_argument("--senders", type=int, default=200)
    ap.add_argument("--rate", type=float, default=5, help="paced: calls per second per sender")
    ap.add_argument("--send-seconds", type=float, default=10)
    ap.add_argument("--rpc-timeout", type=float, default=10)
    ap.add_argument("--connect-concurrency", type=int, default=100,
                    help="first connections in flight per client process")
    ap.add_argument("--no-scale-timeouts", dest="scale_timeouts", action="store_false",
                    help="keep the server's handshake/auth/header timeouts at their defaults"
                         " (by default they are scaled by users/40,000, at least 1 s)")
    ap.add_argument("--serve-flag", action="append", default=[], metavar="FLAG",
                    help="one more flag for wse-sync serve (repeat; e.g. --serve-flag=--grace=30)")
    ap.add_argument("--json", metavar="OUT", help="write the results as JSON")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the logs (printed path)")
    args = ap.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in ALL_STEPS]
    if unknown:
        ap.error(f"unknown steps {unknown}; known: {', '.join(ALL_STEPS)}")
    if "connect" in steps:
        steps.remove("connect")
    args.step_list = ["connect"] + steps
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    h = Harness(args)

    def watchdog() -> None:
        time.sleep(args.time_limit + 60)
        print("crowd: time limit passed long ago: killing everything", file=sys.stderr,
              flush=True)
        h.emergency_kill()
        os._exit(2)

    threading.Thread(target=watchdog, daemon=True).start()
    result = None
    try:
        result = h.run(args.step_list)
    except KeyboardInterrupt:
        print("crowd: interrupted", file=sys.stderr)
    except Exception as exc:
        print(f"crowd: {exc}", file=sys.stderr)
    finally:
        h.stop_all()
        if args.keep_tmp:
            print(f"crowd: logs kept in {h.tmp}")
        else:
            shutil.rmtree(h.tmp, ignore_errors=True)
    if result is None:
        result = {"users": args.users, "workers": args.workers, "steps": h.steps,
                  "invariants": {inv: False for inv in INVARIANTS}, "pass": False,
                  "seconds": round(time.monotonic() - h.t_start, 1)}
    print_report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
