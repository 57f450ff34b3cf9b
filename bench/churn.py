"""Churn: waves of connections that end in every way a connection can end,
against ``wse-sync serve bench/churn_app.py:server --workers 2``, with each
worker's resources checked after every wave.

    python bench/churn.py --duration 60                # a short run
    python bench/churn.py                              # 300 s, waves of 3,000 every 12 s
    python bench/churn.py --kill-worker-at 40          # and kill -9 one worker at 40 s

Each wave opens ``--wave`` connections (raw gevent sockets, at most
``--concurrency`` handshakes at a time); connection i ends the way
``KINDS[i % len(KINDS)]`` says:

    clean         welcome, close frame 1000, waits for the echo
    reason        welcome, close frame 4001 with a reason, waits for the echo
    fin           welcome, FIN without a close frame
    rst           welcome, RST (SO_LINGER 0)
    rpc_hangup    welcome, calls RPC ``slow``, hangs up (FIN or RST) before the answer
    prewelcome    sends ~wse:hi (identify takes 0.3 s) and hangs up before the welcome
    no_hi         upgrades, never sends ~wse:hi: the server closes it on its deadline
                  (1000 wse.not-authorized, or 1013 wse.handshake-timeout)
    no_upgrade    an unfinished HTTP request: the server answers 408 after header_timeout
    idle_nonreader  welcome, then reads nothing (tiny receive buffer) and sends nothing:
                  the server pings, then cuts it (ping timeout)
    flood         welcome, asks RPC ``flood`` for many large messages and reads nothing:
                  the server cuts it (1008 wse.send-queue-full)

After each wave it prints one line: the wave, connections made, what the
clients saw (``ok`` = as expected; the others by kind), each worker's RSS
(/proc/PID/status), fds (/proc/PID/fd), greenlets and GC figures (RPC
``stats`` of churn_app.py, through one monitor connection per worker; it
runs ``gc.collect()`` only when the harness asks, every ``--collect-every``
waves), the broker's users and connections (``wse-sync stats``), and whether
each figure is back to its baseline (taken before the first wave). Then the
verdicts; exit 1 on any FAIL:

- worker exits (the supervisor's "worker (pid N) exited with ...", an
  "Assertion" line, a worker pid gone): any, except the ``--kill-worker-at``
  victim, is a FAIL;
- RSS growth of each worker from the second wave to the end, read on the least-squares
  line over the waves (``--rss-target``, 5 %; the end samples swing with malloc_trim);
- fds, greenlets and the broker's map back to baseline after every wave;
- joined == left for every user once all are gone (the app logs both, one
  file per worker; with ``--kill-worker-at``, ``left`` for the victim's users
  fires on the survivor);
- the flooded clients were cut with 1008 wse.send-queue-full (the app's ``left``);
- what the clients saw was what each kind expects (the wave of a kill excepted);
- no traceback in the logs.

Every process it starts is killed in ``finally``; every wait is bounded.
"""
from __future__ import annotations

import argparse
import base64
import errno
import json
import os
import re
import resource
import signal
import socket as pysocket
import struct
import sys
import tempfile
import time
from collections import Counter, defaultdict
from typing import Dict, List, Optional, Tuple

import gevent
import gevent.lock
from gevent import socket as gsocket
from gevent import subprocess as gsubprocess

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from helpers import ServerProcess, free_port  # noqa: E402
from wse_sync import WseClient, WseError  # noqa: E402
from wse_sync.core.frames import OP_TEXT, FrameError, FrameReader, build_close, build_frame  # noqa: E402

APP = os.path.join(HERE, "churn_app.py") + ":server"

KINDS = ("clean", "reason", "fin", "rst", "rpc_hangup", "prewelcome", "no_hi", "no_upgrade",
         "idle_nonreader", "flood")

# what each kind expects to see (a set: either is fine)
EXPECTED = {
    "clean": {"echo1000"},
    "reason": {"echo4001"},
    "fin": {"eof", "close1006"},
    "rst": {"rst"},
    "rpc_hangup": {"hangup"},
    "prewelcome": {"hangup"},
    # (the server's deadline: 1000 wse.not-authorized, or 1013 when it counts itself the
    # slow side: wse.handshake-timeout for no ~wse:hi, wse.server-busy for a late timer)
    "no_hi": {"close1000:wse.not-authorized", "close1013:wse.handshake-timeout",
              "close1013:wse.server-busy"},
    "no_upgrade": {"408"},
    "idle_nonreader": {"cut"},
    "flood": {"cut", "cut:close1008"},
}

TCP_CLOSE_WAIT = 8
SEND_QUEUE_FULL = "wse.send-queue-full"


class Outcome(Exception):
    """How a client's connection ended, when it ended early."""


# -- the raw client -------------------------------------------------------------
class Peer:
    """One raw WebSocket client connection on a gevent socket."""

    def __init__(self, host: str, port: int, timeout: float, rcvbuf: int = 0,
                 mss: int = 0) -> None:
        self.host, self.port = host, port
        sock = gsocket.socket(gsocket.AF_INET, gsocket.SOCK_STREAM)
        # before connect: the window (and segment size) the server sees from the start
        if rcvbuf:
            sock.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_RCVBUF, rcvbuf)
        if mss:
            sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_MAXSEG, mss)
        sock.settimeout(timeout)
        self.sock = sock
        try:
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        self.reader = FrameReader(None, expect_mask=False)
        self.events: List[tuple] = []
        self.received = 0

    def upgrade(self) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET / HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                           "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                           "Sec-WebSocket-Protocol: wse-default-json\r\n\r\n").encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise Outcome("eof:upgrade")
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        status = head.split(b" ", 2)[1].decode("latin-1") if b" " in head else "?"
        if status != "101":
            raise Outcome(f"http{status}")
        if rest:
            self._feed(rest)

    def _feed(self, data: bytes) -> None:
        self.received += len(data)
        try:
            self.events += self.reader.feed(data)
        except FrameError as exc:
            self.events += exc.events
            self.events.append(("bad-frame", str(exc)))

    def send_text(self, text: str) -> None:
        self.sock.sendall(build_frame(OP_TEXT, text.encode(), mask=True))

    def hi(self, identity: str) -> None:
        self.send_text(json.dumps(["~wse:hi", {"identity": identity, "meta": {}}, None]))

    def next_event(self) -> tuple:
        """("text", s) / ("close", code, reason) / ("ping", b) / ("eof",) / ("rst",)."""
        while not self.events:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                return ("rst",)
            if not data:
                return ("eof",)
            self._feed(data)
        return self.events.pop(0)

    def welcome(self, identity: str) -> None:
        self.hi(identity)
        while True:
            ev = self.next_event()
            if ev[0] == "text" and ev[1].startswith('["~wse:welcome"'):
                return
            if ev[0] in ("eof", "rst"):
                raise Outcome(f"{ev[0]}:before-welcome")
            if ev[0] == "close":
                raise Outcome(f"close{ev[1]}:{ev[2]}:before-welcome")

    def until_end(self) -> tuple:
        """Skip messages and pings up to the close frame, EOF or RST."""
        while True:
            ev = self.next_event()
            if ev[0] in ("close", "eof", "rst", "bad-frame"):
                return ev

    def tcp_state(self) -> int:
        return self.sock.getsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_INFO, 8)[0]

    def rst(self) -> None:
        self.sock.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Clients:
    """The client side of a run: how each kind of connection behaves."""

    def __init__(self, host: str, port: int, args: argparse.Namespace) -> None:
        self.host, self.port, self.args = host, port, args
        self.handshakes = gevent.lock.Semaphore(args.concurrency)
        self.made = 0

    def run(self, kind: str, cid: str, n: int) -> str:
        """One connection of ``kind`` from start to end; its outcome."""
        a = self.args
        limit = max(30.0, 2 * (a.ping_interval + a.ping_timeout) + 20)
        peer = None
        try:
            with gevent.Timeout(limit, Outcome("hung")):
                nonreader = kind in ("idle_nonreader", "flood")
                with self.handshakes:
                    peer = Peer(self.host, self.port, timeout=10, rcvbuf=4096 if nonreader else 0,
                                mss=a.nonreader_mss if nonreader else 0)
                    self.made += 1
                    if kind == "no_upgrade":
                        peer.sock.sendall(b"GET / HTTP/1.1\r\nHost: churn\r\nUpgrade: websock")
                    else:
                        peer.upgrade()
                        if kind == "prewelcome":
                            peer.hi(cid)
                        elif kind != "no_hi":
                            peer.welcome(cid)
                return getattr(self, "_" + kind)(peer, n)
        except Outcome as exc:
            return str(exc)
        except pysocket.timeout:
            return "timeout"
        except ConnectionRefusedError:
            return "refused"
        except ConnectionResetError:
            return "reset"
        except BrokenPipeError:
            return "broken-pipe"
        except OSError as exc:
            return f"oserror:{errno.errorcode.get(exc.errno, exc.errno)}"
        finally:
            if peer is not None:
                peer.close()

    # each returns the outcome; the peer is closed by run()
    def _echo(self, peer: Peer, code: int, reason: str) -> str:
        peer.sock.sendall(build_close(code, reason, mask=True))
        ev = peer.until_end()
        if ev[0] != "close":
            return ev[0]
        after = peer.next_event()
        return f"echo{ev[1]}" + ("" if after[0] == "eof" else f"+{after[0]}")

    def _clean(self, peer: Peer, n: int) -> str:
        return self._echo(peer, 1000, "")

    def _reason(self, peer: Peer, n: int) -> str:
        return self._echo(peer, 4001, "churn: going")

    def _fin(self, peer: Peer, n: int) -> str:
        peer.sock.shutdown(gsocket.SHUT_WR)
        ev = peer.until_end()
        return ev[0] if ev[0] != "close" else f"close{ev[1]}"

    def _rst(self, peer: Peer, n: int) -> str:
        peer.rst()
        return "rst"

    def _rpc_hangup(self, peer: Peer, n: int) -> str:
        peer.send_text(json.dumps(["slow", 0.5, f"s{n:09d}"]))
        if n % 2:
            peer.rst()
        else:
            peer.sock.shutdown(gsocket.SHUT_RDWR)
        return "hangup"

    def _prewelcome(self, peer: Peer, n: int) -> str:
        if n % 2:
            peer.rst()
        else:
            peer.sock.shutdown(gsocket.SHUT_RDWR)
        return "hangup"

    def _no_hi(self, peer: Peer, n: int) -> str:
        peer.sock.settimeout(self.args.handshake_timeout + 10)
        ev = peer.until_end()
        if ev[0] != "close":
            return ev[0]
        peer.sock.sendall(build_close(ev[1], "", mask=True))
        return f"close{ev[1]}:{ev[2]}"

    def _no_upgrade(self, peer: Peer, n: int) -> str:
        peer.sock.settimeout(self.args.header_timeout + 10)
        buf = b""
        while True:
            try:
                chunk = peer.sock.recv(4096)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                break
            buf += chunk
        return buf.split(b" ", 2)[1].decode("latin-1") if buf.count(b" ") >= 2 else "eof"

    def _wait_fin(self, peer: Peer, seconds: float) -> bool:
        """Without reading: poll the TCP state until the server's FIN is in."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if peer.tcp_state() == TCP_CLOSE_WAIT:
                return True
            gevent.sleep(0.25)
        return False

    def _idle_nonreader(self, peer: Peer, n: int) -> str:
        a = self.args
        if not self._wait_fin(peer, a.ping_interval + a.ping_timeout + 8):
            return "not-cut"
        ev = peer.until_end()  # the pings, then the end
        return "cut" if ev[0] in ("eof", "rst") else f"cut:{ev[0]}{ev[1] if len(ev) > 1 else ''}"

    def _flood(self, peer: Peer, n: int) -> str:
        a = self.args
        peer.send_text(json.dumps(["flood", {"count": a.flood_count, "size": a.flood_size,
                                             "burst": a.flood_burst}, f"f{n:09d}"]))
        # its window is closed: no FIN can come before we read, so wait, then read
        gevent.sleep(a.flood_wait)
        peer.sock.settimeout(10)
        messages = 0
        while True:
            ev = peer.next_event()
            if ev[0] == "text":
                if ev[1].startswith('["~wse:response"'):
                    return f"not-cut:{messages}"
                messages += 1
                continue
            if ev[0] in ("eof", "rst"):
                return "cut" if messages < a.flood_count else "not-cut"
            if ev[0] == "close":
                return f"cut:close{ev[1]}"
            if ev[0] == "bad-frame":
                return "bad-frame"


def flood_round(host: str, port: int, n: int, args: argparse.Namespace, tag: str,
                group: bool = False) -> List[Peer]:
    """``n`` clients (users ``{tag}-{i}-flood``) that read nothing and ask for
    a flood: each its own, or (``group``) once all are welcomed, one flood per
    worker of all of them at once (RPC ``flood`` with ``"group"``). Returned
    open: the caller waits for the server's cuts."""
    def connect(i: int) -> Peer:
        p = Peer(host, port, timeout=10, rcvbuf=4096, mss=args.nonreader_mss)
        try:
            p.upgrade()
            p.welcome(f"{tag}-{i}-flood")
        except BaseException:
            p.close()
            raise
        return p

    jobs = [gevent.spawn(connect, i) for i in range(n)]
    gevent.joinall(jobs, timeout=30)
    peers = [j.value for j in jobs if j.successful()]
    failed = next((j for j in jobs if not j.successful()), None)
    if failed is not None:
        for j in jobs:
            j.kill(block=False)
        for p in peers:
            p.close()
        raise failed.exception or RuntimeError("a flooded client did not connect in 30 s")
    ask = {"count": args.flood_count, "size": args.flood_size, "burst": args.flood_burst}
    if group:
        ask["group"] = tag + "-"
    for i, p in enumerate(peers):
        p.send_text(json.dumps(["flood", ask, f"f{i:09d}"]))
    return peers


# -- the server and its processes ----------------------------------------------------
def children(ppid: int) -> Dict[int, str]:
    """{pid: "worker" | "broker"} of the supervisor's children."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) != ppid:
                    continue
            with open(f"/proc/{entry}/cmdline") as f:
                cmd = f.read().split("\0")
        except (OSError, IndexError, ValueError):
            continue
        out[int(entry)] = "broker" if "broker" in cmd else "worker" if "_worker" in cmd else "?"
    return out


def broker_endpoint(pid: int) -> Optional[str]:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            cmd = f.read().split("\0")
        return cmd[cmd.index("--bind") + 1]
    except (OSError, ValueError, IndexError):
        return None


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def broker_stats(endpoint: str, timeout: float = 5.0) -> Optional[dict]:
    """``wse-sync stats`` (in a gevent subprocess: the monitors keep answering pings)."""
    try:
        out = gsubprocess.run([sys.executable, "-m", "wse_sync", "stats", "--broker", endpoint,
                               "--timeout", str(timeout)], capture_output=True, text=True,
                              timeout=timeout + 15, cwd=ROOT)
    except gsubprocess.TimeoutExpired:
        return None
    return json.loads(out.stdout) if out.returncode == 0 else None


class Server:
    """``wse-sync serve churn_app.py --workers N`` and what it logs."""

    def __init__(self, args: argparse.Namespace, log_prefix: str) -> None:
        self.port = free_port()
        self.host = "127.0.0.1"
        self.url = f"ws://{self.host}:{self.port}/"
        env = dict(os.environ, WSE_CHURN_LOG=log_prefix)
        opts = ["--ping-interval", str(args.ping_interval), "--ping-timeout", str(args.ping_timeout),
                "--handshake-timeout", str(args.handshake_timeout),
                "--header-timeout", str(args.header_timeout),
                "--max-send-queue", str(args.max_send_queue), "--close-timeout", "1"]
        self.proc = ServerProcess(["serve", APP, "--host", self.host, "--port", str(self.port),
                                   "--workers", str(args.workers), "--log-level", "warning",
                                   *opts], env=env)
        self.seen: set = set()  # every child pid ever seen (killed in finally)

    def kids(self) -> Dict[int, str]:
        k = children(self.proc.proc.pid)
        self.seen.update(k)
        return k

    def workers(self) -> List[int]:
        return sorted(p for p, kind in self.kids().items() if kind == "worker")

    def broker(self) -> Optional[int]:
        return next((p for p, kind in self.kids().items() if kind == "broker"), None)

    def stop(self) -> None:
        try:
            self.proc.stop(timeout=30)
        finally:
            for pid in self.seen:  # workers run in their own sessions: none may outlive us
                try:
                    with open(f"/proc/{pid}/cmdline") as f:
                        if "wse_sync" not in f.read():
                            continue
                    os.kill(pid, signal.SIGKILL)
                except (OSError, ProcessLookupError):
                    pass


def read_events(log_prefix: str) -> List[Tuple[int, List[str]]]:
    """(pid, fields) of every joined/left line the workers wrote."""
    out = []
    d, base = os.path.split(log_prefix)
    for name in os.listdir(d):
        if name.startswith(base + "."):
            pid = int(name.rsplit(".", 1)[1])
            with open(os.path.join(d, name), encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.endswith("\n"):
                        out.append((pid, line.split()))
    return out


def kind_of(cid: str) -> str:
    return cid.rsplit("-", 1)[-1]


# -- the run ---------------------------------------------------------------------
class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="wse-churn-")
        self.log_prefix = os.path.join(self.tmp, "events")
        self.server: Optional[Server] = None
        self.monitors: Dict[int, WseClient] = {}
        self.n_monitor = 0
        self.base: Dict[int, dict] = {}       # pid -> baseline figures
        self.samples: Dict[int, List[Tuple[int, dict]]] = defaultdict(list)  # pid -> (wave, fig)
        self.waves: List[dict] = []
        self.killed: Optional[int] = None
        self.kill_wave: Optional[int] = None
        self.known_workers: set = set()
        self.vanished: set = set()
        self.fails: List[str] = []
        self.t0 = time.monotonic()

    # -- monitors: one WseClient per worker, for RPC stats --------------------------
    def attach_monitors(self, deadline: float = 30.0) -> None:
        srv = self.server
        assert srv is not None
        end = time.monotonic() + deadline
        while True:
            workers = srv.workers()
            for pid in list(self.monitors):
                if pid not in workers or not self.monitors[pid].ready:
                    self.monitors.pop(pid).close()
            if workers and all(p in self.monitors for p in workers) \
                    and len(workers) == self.args.workers:
                return
            if time.monotonic() > end:
                raise RuntimeError(f"no monitor on every worker: {workers} {list(self.monitors)}")
            c = WseClient(srv.url, rpc_timeout=30, connect_timeout=10)
            self.n_monitor += 1
            try:
                pid = c.connect(f"monitor{self.n_monitor}-monitor")["pid"]
            except (WseError, OSError):
                c.close()
                gevent.sleep(0.2)
                continue
            if pid in self.monitors or pid not in workers:
                c.close()
            else:
                self.monitors[pid] = c

    def sample(self, collect: bool) -> Tuple[Dict[int, dict], Optional[dict]]:
        """Each worker's figures (RSS and fds from /proc first, then RPC stats) and the broker's."""
        figs = {}
        for pid, mon in list(self.monitors.items()):
            f = {"rss": rss_kb(pid), "fds": fd_count(pid)}
            try:
                f.update(mon.call("stats", {"collect": collect}, 60))
            except WseError as exc:
                f["error"] = str(exc)
            figs[pid] = f
        ep = broker_endpoint(self.server.broker() or 0)
        return figs, (broker_stats(ep) if ep else None)

    def at_baseline(self, figs: Dict[int, dict], stats: Optional[dict]) -> Dict[str, bool]:
        ok = {"fds": True, "greenlets": True, "map": True}
        for pid, f in figs.items():
            b = self.base.get(pid)
            if b is None or "error" in f:
                ok["fds"] = ok["greenlets"] = False
                continue
            ok["fds"] &= f["fds"] == b["fds"]
            ok["greenlets"] &= f["greenlets"] - f["parked"] == b["greenlets"] - b["parked"]
        n = len(self.monitors)
        ok["map"] = bool(stats) and stats.get("users") == n and stats.get("connections") == n
        return ok

    # -- the kill ---------------------------------------------------------------------
    def kill_later(self, at: float) -> None:
        gevent.sleep(max(0.0, self.t0 + at - time.monotonic()))
        workers = self.server.workers()
        if not workers:
            return
        victim = workers[0]
        self.killed = victim
        self.kill_wave = len(self.waves) + 1
        os.kill(victim, signal.SIGKILL)
        print(f"  (t={time.monotonic() - self.t0:.1f}s: kill -9 worker {victim} during wave"
              f" {self.kill_wave})", flush=True)

    # -- one wave ---------------------------------------------------------------------
    def wave(self, k: int, clients: Clients) -> dict:
        a = self.args
        t_start = time.monotonic()
        made_before = clients.made
        jobs = []
        for i in range(a.wave):
            kind = a.kinds[i % len(a.kinds)]
            cid = f"w{k}-{i}-{kind}"
            if kind == "prewelcome":
                cid = "slow:" + cid
            jobs.append((kind, gevent.spawn(clients.run, kind, cid, i)))
        gevent.joinall([j for _, j in jobs], timeout=max(60.0, 3 * a.interval))
        outcomes: Counter = Counter()
        for kind, j in jobs:
            if not j.dead:
                j.kill(block=True, timeout=5)
            outcomes[(kind, j.value if j.successful() else "hung")] += 1
        t_clients = time.monotonic() - t_start
        # settle: every figure back to its baseline, or the settle time is up
        collect = a.collect_every > 0 and k % a.collect_every == 0
        settle_end = time.monotonic() + a.settle
        while True:
            self.attach_monitors()
            figs, stats = self.sample(collect)
            for pid, f in figs.items():
                if pid not in self.base and "error" not in f:
                    self.base[pid] = dict(f, new_after_wave=k)  # a replacement: its first rest
            ok = self.at_baseline(figs, stats)
            if all(ok.values()) or time.monotonic() > settle_end:
                break
            gevent.sleep(0.5)
        t_settle = time.monotonic() - t_start - t_clients
        for pid, f in figs.items():
            self.samples[pid].append((k, f))
        w = {"wave": k, "t": round(t_start - self.t0, 1), "conns": a.wave,
             "made": clients.made - made_before, "clients_s": round(t_clients, 1),
             "settle_s": round(t_settle, 1), "outcomes": outcomes, "figs": figs,
             "broker": {"users": (stats or {}).get("users"),
                        "connections": (stats or {}).get("connections")},
             "baseline": ok, "collected": collect}
        self.waves.append(w)
        print(self.line(w), flush=True)
        return w

    def line(self, w: dict) -> str:
        odd = Counter()
        ok_n = 0
        for (kind, outcome), n in w["outcomes"].items():
            if outcome in EXPECTED[kind]:
                ok_n += n
            else:
                odd[f"{kind}:{outcome}"] += n
        parts = [f"wave {w['wave']:3d} t={w['t']:6.1f}s made {w['made']}/{w['conns']}"
                 f" in {w['clients_s']:.1f}s",
                 f"clients ok {ok_n}/{w['conns']}" + (
                     " odd " + ", ".join(f"{k}x{n}" for k, n in odd.most_common(6)) if odd else "")]
        for pid, f in sorted(w["figs"].items()):
            b = self.base.get(pid, {})
            if "error" in f:
                parts.append(f"w{pid} stats failed: {f['error']}")
                continue
            busy = f["greenlets"] - f["parked"]
            busy0 = b.get("greenlets", 0) - b.get("parked", 0)
            # the automatic collections since the last report (its own collect excluded)
            prev = self.previous(pid, w["wave"]) or b
            runs = sum(f["gc_runs"]) - sum(prev.get("gc_runs_after", prev.get("gc_runs", [])))
            found = sum(f["gc_found"]) - sum(prev.get("gc_found_after", prev.get("gc_found", [])))
            fds_mark = "=" if f["fds"] == b.get("fds") else f"!{b.get('fds')}"
            s = (f"w{pid} rss {f['rss'] / 1024:.1f}MB fds {f['fds']}{fds_mark}"
                 f" gl {busy}{'=' if busy == busy0 else f'!{busy0}'}+{f['parked']}parked"
                 f" gc auto {runs} runs found {found} garbage {f['garbage']}")
            if "collected" in f:
                s += f" collect {f['collected']}"
                if f["collected_types"]:
                    s += " (" + ",".join(f"{t}:{n}" for t, n in f["collected_types"][:3]) + ")"
            if b.get("new_after_wave") == w["wave"]:
                s += " [new worker: baseline]"
            parts.append(s)
        bk = w["broker"]
        n = len(self.monitors)
        parts.append(f"broker users {bk['users']} conns {bk['connections']} (base {n})")
        bad = [name for name, good in w["baseline"].items() if not good]
        parts.append(f"baseline {'back' if not bad else 'NOT back: ' + ','.join(bad)}"
                     f" ({w['settle_s']:.1f}s)")
        return " | ".join(parts)

    def previous(self, pid: int, wave: int) -> Optional[dict]:
        """The figures of worker ``pid`` after the wave before ``wave``."""
        before = [f for k, f in self.samples.get(pid, []) if k < wave and "error" not in f]
        return before[-1] if before else None

    # -- all of it --------------------------------------------------------------------
    def main(self) -> int:
        a = self.args
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        print(f"churn: {a.workers} workers, waves of {a.wave} every {a.interval:.0f}s for"
              f" {a.duration:.0f}s; kinds {','.join(a.kinds)}; gevent {gevent.__version__};"
              f" events in {self.log_prefix}.<pid>", flush=True)
        self.server = srv = Server(a, self.log_prefix)
        try:
            end = time.monotonic() + 60
            while len(srv.workers()) < a.workers or srv.broker() is None:
                if srv.proc.proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError("the server did not start:\n" + srv.proc.stderr)
                gevent.sleep(0.1)
            self.attach_monitors(60)
            self.known_workers = set(srv.workers())
            # the baseline: the monitors connected, nothing else
            end = time.monotonic() + 30
            while True:
                figs, stats = self.sample(True)
                if stats and stats.get("users") == len(self.monitors) or time.monotonic() > end:
                    break
                gevent.sleep(0.3)
            for pid, f in figs.items():
                self.base[pid] = dict(f, new_after_wave=0)
                self.samples[pid].append((0, f))
            print("baseline: " + " | ".join(
                f"w{p} rss {f['rss'] / 1024:.1f}MB fds {f['fds']} gl {f['greenlets']}"
                f" ({f['parked']} parked)"
                for p, f in sorted(figs.items())) +
                f" | broker users {(stats or {}).get('users')}", flush=True)
            clients = Clients(srv.host, srv.port, a)
            self.t0 = time.monotonic()
            killer = gevent.spawn(self.kill_later, a.kill_worker_at) \
                if a.kill_worker_at is not None else None
            k = 0
            while True:
                # the next wave starts on its tick, or at once when the last one ran late
                if k * a.interval >= a.duration or time.monotonic() - self.t0 >= a.duration:
                    break
                start_at = max(self.t0 + k * a.interval, time.monotonic())
                k += 1
                gevent.sleep(max(0.0, start_at - time.monotonic()))
                self.wave(k, clients)
                self.track_workers()
            if killer is not None:
                killer.kill()
            return self.finish()
        finally:
            for c in self.monitors.values():
                try:
                    c.close()
                except Exception:
                    pass
            srv.stop()
            if not a.keep_logs:
                for name in os.listdir(self.tmp):
                    os.unlink(os.path.join(self.tmp, name))
                os.rmdir(self.tmp)

    def track_workers(self) -> None:
        now = set(self.server.workers())
        gone = self.known_workers - now - {self.killed}
        self.vanished |= gone
        self.known_workers = now | self.known_workers

    # -- the verdicts ---------------------------------------------------------------
    def verdict(self, name: str, ok: bool, detail: str) -> None:
        print(f"VERDICT {name}: {'PASS' if ok else 'FAIL'} {detail}", flush=True)
        if not ok:
            self.fails.append(name)

    def finish(self) -> int:
        a = self.args
        srv = self.server
        # everyone gone: the monitors close, the map empties, the last 'left' lines land
        for c in self.monitors.values():
            c.close()
        self.monitors = {}
        ep = broker_endpoint(srv.broker() or 0)
        end = time.monotonic() + 20
        while time.monotonic() < end:
            s = broker_stats(ep) if ep else None
            if s and s.get("users") == 0:
                break
            gevent.sleep(0.5)

        def balance():
            joined: Counter = Counter()
            left: Counter = Counter()
            codes: Dict[str, Counter] = defaultdict(Counter)
            for _pid, fields in read_events(self.log_prefix):
                if fields[0] == "joined":
                    joined[fields[1]] += 1
                elif fields[0] == "left":
                    left[fields[1]] += 1
                    codes[kind_of(fields[1])][" ".join(fields[2:4])] += 1
            return joined, left, codes

        end = time.monotonic() + 10
        while True:
            joined, left, codes = balance()
            if joined == left or time.monotonic() > end:
                break
            gevent.sleep(0.3)
        text = srv.proc.stderr
        lines = text.splitlines()

        print("server side: left (code reason) by kind: " + "; ".join(
            f"{kind} " + ", ".join(f"{c}x{n}" for c, n in cnt.most_common(3))
            for kind, cnt in sorted(codes.items())), flush=True)
        total: Counter = Counter()
        for w in self.waves:
            total.update(w["outcomes"])
        print("client side: outcomes by kind: " + "; ".join(
            f"{kind} " + ", ".join(f"{o}x{n}" for (k2, o), n in total.most_common() if k2 == kind)
            for kind in a.kinds), flush=True)

        # 1. worker exits
        exits = [ln for ln in lines if re.search(r"worker \(pid \d+\) exited with", ln)]
        unexpected = [ln for ln in exits if f"pid {self.killed})" not in ln]
        asserts = [ln for ln in lines if "Assertion" in ln]
        signals = Counter(m.group(1) for ln in unexpected
                          if (m := re.search(r"exited with (-?\d+)", ln)))
        detail = (f"{len(unexpected)} unexpected exit(s) {dict(signals)}, {len(asserts)}"
                  f" 'Assertion' line(s), {len(self.vanished)} worker pid(s) gone")
        if self.killed:
            detail += f" (and the kill -9 of {self.killed} in wave {self.kill_wave})"
        self.verdict("worker exits", not unexpected and not asserts and not self.vanished,
                     detail)
        for ln in (asserts + unexpected)[:6]:
            print("    " + ln)
        # 2. RSS growth from the second wave to the end
        growth = []
        rss_ok = True
        for pid, s in sorted(self.samples.items()):
            # the waves this worker served whole: all of them, or for a replacement,
            # those after the one it was started in
            born = self.base.get(pid, {}).get("new_after_wave", 0)
            waves = [(k, f) for k, f in s if k > born and "rss" in f and f["rss"]]
            if len(waves) < 3:
                continue
            (k2, f2), (kn, fn) = waves[1], waves[-1]
            pct = 100.0 * (fn["rss"] - f2["rss"]) / f2["rss"]
            per = (fn["rss"] - f2["rss"]) / 1024 / max(1, kn - k2)
            # The verdict reads the least-squares line over those waves, not the
            # two end samples: a worker's RSS swings +-2 MB with the phase of its
            # malloc_trim (every 10 s) against the waves, so an end sample taken
            # high reads as growth; a ratchet or steps still tilt the line.
            pts = [(k, f["rss"] / 1024) for k, f in waves[1:]]
            mk = sum(k for k, _ in pts) / len(pts)
            mr = sum(r for _, r in pts) / len(pts)
            slope = (sum((k - mk) * (r - mr) for k, r in pts)
                     / (sum((k - mk) ** 2 for k, _ in pts) or 1))
            start = mr + slope * (k2 - mk)
            fit_pct = 100.0 * slope * (kn - k2) / start if start > 0 else 0.0
            rss_ok &= fit_pct <= a.rss_target
            growth.append(f"w{pid} {f2['rss'] / 1024:.1f} -> {fn['rss'] / 1024:.1f} MB"
                          f" (fit {fit_pct:+.1f}%, ends {pct:+.1f}%, {per:+.2f} MB/wave,"
                          f" fit {slope:+.2f} MB/wave,"
                          f" waves {k2}-{kn}; parked greenlets {f2['parked']} -> {fn['parked']})")
        if growth:
            self.verdict(f"RSS growth wave 2 -> end within {a.rss_target:g}%", rss_ok,
                         "; ".join(growth))
        else:
            print(f"VERDICT RSS growth wave 2 -> end within {a.rss_target:g}%: SKIP (fewer than"
                  " 3 waves)")
        # 3. back to baseline after each wave
        bad = defaultdict(list)
        for w in self.waves:
            for name, good in w["baseline"].items():
                if not good and w["wave"] != self.kill_wave:
                    bad[name].append(w["wave"])
        self.verdict("fds/greenlets/map back to baseline after each wave", not bad,
                     "; ".join(f"{n} not back after wave(s) {v}" for n, v in bad.items())
                     or f"all {len(self.waves)} waves")
        # 4. joined / left balance
        users = set(joined) | set(left)
        unbalanced = sorted(u for u in users if joined[u] != left[u])
        dup = sum(1 for u in users if joined[u] > 1)
        detail = (f"{len(users)} users, joined {sum(joined.values())}, left"
                  f" {sum(left.values())}, {len(unbalanced)} unbalanced, {dup} joined twice")
        if unbalanced:
            detail += " e.g. " + ", ".join(f"{u} (joined {joined[u]}, left {left[u]})"
                                           for u in unbalanced[:5])
        self.verdict("joined == left per user", not unbalanced and bool(users), detail)
        # 5. the flooded clients were cut with 1008 wse.send-queue-full
        flood = codes.get("flood", Counter())
        cut = flood.get(f"1008 {SEND_QUEUE_FULL}", 0)
        other = {c: n for c, n in flood.items() if c != f"1008 {SEND_QUEUE_FULL}"}
        if "flood" in a.kinds:
            killed_ok = sum(n for c, n in other.items() if "worker-died" in c) \
                if self.killed else 0
            self.verdict("flooded clients cut 1008 wse.send-queue-full", cut > 0 and
                         sum(other.values()) == killed_ok,
                         f"{cut} cut so, others {other}")
        # 6. what the clients saw
        odd: Counter = Counter()
        for w in self.waves:
            if w["wave"] == self.kill_wave:
                continue
            for (kind, outcome), n in w["outcomes"].items():
                if outcome not in EXPECTED[kind]:
                    odd[f"{kind}:{outcome}"] += n
        self.verdict("client outcomes as expected", not odd,
                     ", ".join(f"{k}x{n}" for k, n in odd.most_common(10)) or
                     f"{sum(sum(w['outcomes'].values()) for w in self.waves)} connections")
        # 7. tracebacks
        tbs = [i for i, ln in enumerate(lines) if "Traceback (most recent call last)" in ln]
        self.verdict("no tracebacks in the logs", not tbs, f"{len(tbs)} traceback(s)")
        if tbs:
            print("\n".join("    " + ln for ln in lines[tbs[0]:tbs[0] + 25]))
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"waves": [dict(w, outcomes={f"{k}:{o}": n for (k, o), n in
                                                        w["outcomes"].items()})
                                     for w in self.waves],
                           "fails": self.fails, "killed": self.killed,
                           "kill_wave": self.kill_wave, "exits": exits, "asserts": asserts,
                           "joined": sum(joined.values()), "left": sum(left.values()),
                           "unbalanced": unbalanced[:50], "flood_codes": dict(flood)},
                          f, indent=1, default=str)
        print("churn: OK" if not self.fails else f"churn: FAILED ({', '.join(self.fails)})",
              flush=True)
        return 0 if not self.fails else 1


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--duration", type=float, default=300, help="seconds of waves")
    ap.add_argument("--wave", type=int, default=3000, help="connections per wave")
    ap.add_argument("--interval", type=float, default=12, help="seconds from wave to wave")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=256, help="handshakes in flight")
    ap.add_argument("--kinds", default=",".join(KINDS), help="the endings mixed, in turn")
    ap.add_argument("--kill-worker-at", type=float, default=None, metavar="SECONDS",
                    help="kill -9 one worker this many seconds after the first wave starts")
    ap.add_argument("--ping-interval", type=float, default=2.0)
    ap.add_argument("--ping-timeout", type=float, default=2.0)
    ap.add_argument("--handshake-timeout", type=float, default=2.0)
    ap.add_argument("--header-timeout", type=float, default=2.0)
    ap.add_argument("--max-send-queue", type=int, default=256 * 1024)
    ap.add_argument("--flood-count", type=int, default=200, help="messages a flood asks for")
    ap.add_argument("--flood-size", type=int, default=32768, help="bytes per flood message")
    ap.add_argument("--flood-burst", type=int, default=4, help="flood messages between yields")
    ap.add_argument("--flood-wait", type=float, default=1.5,
                    help="seconds a flooded client reads nothing")
    ap.add_argument("--nonreader-mss", type=int, default=1024,
                    help="TCP_MAXSEG of the non-reading clients (0: the kernel's). On loopback"
                         " (64 KB segments) the server's send buffer starts at ~4 MB, which a"
                         " flooded non-reader would hold in the kernel; 1024 makes it ~70 KB")
    ap.add_argument("--collect-every", type=int, default=1,
                    help="ask the workers for gc.collect() every K waves (0: never; a collect"
                         " frees the cyclic garbage that would otherwise pile up)")
    ap.add_argument("--settle", type=float, default=10, help="seconds to wait for the baseline")
    ap.add_argument("--rss-target", type=float, default=5.0, help="percent")
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--keep-logs", action="store_true", help="keep the joined/left files")
    args = ap.parse_args(argv)
    args.kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(args.kinds) - set(KINDS)
    if unknown:
        ap.error(f"unknown kinds {sorted(unknown)}; known: {','.join(KINDS)}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    return Run(parse_args(argv)).main()


if __name__ == "__main__":
    sys.exit(main())
