"""Attacks against one real worker, with well-behaved clients running meanwhile.

    python bench/attack.py --quick              # about 2 minutes
    python bench/attack.py                      # the full counts
    python bench/attack.py --tls --quick        # over TLS (needs serve --certfile)
    python bench/attack.py --only slowloris,ping-flood --json /tmp/attack.json
    python bench/attack.py --server-option max_connections_per_ip=50

Each attack runs alone against a fresh ``wse-sync serve bench/attack_app.py:server
--workers 1`` on 127.0.0.1, while 20 good clients (WseClient, from 127.0.0.1,
in a process of their own) call ``echo`` in a loop and a probe opens a new
connection every second. Attackers bind 127.0.0.2, 127.0.0.3, ... as their
source address, so per-IP limits hit them and not the good clients.

Per attack it reports what the attacker saw, the worker's RSS (VmRSS)
before / peak / after, the good clients' RPC errors and the longest gap
between two successful good-client RPC completions, the probe's connects,
and whether the server log shows a Traceback or the broker declaring the
worker silent. It measures and never asserts: exit code 0 unless the harness
itself breaks. Every wait has a timeout; the whole run has a hard deadline.
"""
from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import base64  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import gevent  # noqa: E402
import gevent.socket  # noqa: E402
from gevent.event import Event  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
APP = "bench/attack_app.py:server"
HOST = "127.0.0.1"
SLOW_IDENTIFY = 5.0      # attack_app's identify waits this long for "slow..." identities
SINK_SLEEP = 2.0         # attack_app's "sink" channel handler sleeps this long
PING_PAYLOAD = b"p" * 8

# one source address per attack (the good clients and the monitor use 127.0.0.1)
ATTACK_IPS = {
    "slowloris": "127.0.0.2", "tls-silent": "127.0.0.3", "rpc-flood": "127.0.0.4",
    "channel-flood": "127.0.0.5", "empty-continuations": "127.0.0.6",
    "ping-flood": "127.0.0.7", "identify-flood": "127.0.0.8", "non-readers": "127.0.0.9",
    "malformed-upgrades": "127.0.0.10",
}
ORDER = list(ATTACK_IPS)

# the counts and durations, full and --quick
PARAMS = {
    False: dict(slowloris_n=200, slowloris_s=45, tls_n=100, tls_s=45, rpc_n=10_000,
                chan_n=400, chan_size=250_000, chan_watch=15, cont_n=6_000_000, cont_s=120,
                ping_s=5, ident_n=200, nonread_n=30, bcast_size=5_000_000, nonread_watch=12,
                settle=3),
    True: dict(slowloris_n=200, slowloris_s=14, tls_n=100, tls_s=14, rpc_n=10_000,
               chan_n=100, chan_size=250_000, chan_watch=8, cont_n=1_000_000, cont_s=25,
               ping_s=5, ident_n=200, nonread_n=30, bcast_size=5_000_000, nonread_watch=6,
               settle=2),
}


# -- small tools -----------------------------------------------------------------
def mono() -> float:
    return time.monotonic()


def proc_status(pid: int, field: str) -> int:
    """A kB field of /proc/PID/status (VmRSS, VmHWM); 0 when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def children_of(pid: int) -> dict:
    """{child pid: cmdline} of a process, from /proc."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            if ppid != pid:
                continue
            with open(f"/proc/{name}/cmdline") as f:
                out[int(name)] = f.read().replace("\0", " ")
        except (OSError, ValueError):
            continue
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def client_ssl_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def mask_bytes(data: bytes, key: bytes) -> bytes:
    n = len(data)
    if not n:
        return b""
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(k, "big")).to_bytes(n, "big")


def cframe(opcode: int, payload: bytes = b"", fin: bool = True, key: bytes = None) -> bytes:
    """A masked client frame (RFC 6455 §5.2)."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes((b0, 0x80 | n))
    elif n < 65536:
        head = bytes((b0, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, 0x80 | 127)) + n.to_bytes(8, "big")
    key = os.urandom(4) if key is None else key
    return head + key + mask_bytes(payload, key)


def wse(type_, payload=None, stamp=None) -> bytes:
    return cframe(0x1, json.dumps([type_, payload, stamp]).encode())


class Frames:
    """Server frames (unmasked) -> events: ("text", bytes), ("binary", bytes),
    ("ping", b), ("pong", b), ("close", code, reason)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pos = 0
        self.parts: list = []
        self.op = 0
        self.bytes = 0

    def feed(self, data: bytes) -> list:
        self.bytes += len(data)
        self.buf += data
        out = []
        b = self.buf
        while True:
            p, n = self.pos, len(b)
            if n - p < 2:
                break
            b0, b1 = b[p], b[p + 1]
            op, ln, h = b0 & 0x0F, b1 & 0x7F, 2
            if ln == 126:
                if n - p < 4:
                    break
                ln, h = int.from_bytes(b[p + 2:p + 4], "big"), 4
            elif ln == 127:
                if n - p < 10:
                    break
                ln, h = int.from_bytes(b[p + 2:p + 10], "big"), 10
            key = None
            if b1 & 0x80:
                if n - p < h + 4:
                    break
                key = bytes(b[p + h:p + h + 4])
                h += 4
            if n - p < h + ln:
                break
            payload = bytes(b[p + h:p + h + ln])
            if key:
                payload = mask_bytes(payload, key)
            self.pos = p + h + ln
            if op == 0x8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                out.append(("close", code, payload[2:].decode("utf-8", "replace")))
            elif op == 0x9:
                out.append(("ping", payload))
            elif op == 0xA:
                out.append(("pong", payload))
            else:
                if op != 0:
                    self.op, self.parts = op, []
                self.parts.append(payload)
                if b0 & 0x80:
                    out.append(("text" if self.op == 1 else "binary", b"".join(self.parts)))
                    self.parts = []
        if self.pos and (self.pos == len(b) or self.pos > (1 << 20)):
            del b[:self.pos]
            self.pos = 0
        return out


def describe(exc: BaseException) -> str:
    """A WseError's code (and message), else the exception's type."""
    code = getattr(exc, "code", None)
    if not code:
        return type(exc).__name__
    details = getattr(exc, "details", None)
    msg = details.get("message") if isinstance(details, dict) else None
    return f"{code}: {str(msg)[:50]}" if msg else str(code)


def err_name(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout):
        return "timeout"
    return type(exc).__name__


class Raw:
    """One attacker socket from ``src`` (TLS-wrapped when the server runs TLS)."""

    def __init__(self, ctx: "Ctx", src: str, timeout: float = 5.0, tls: bool = None) -> None:
        self.ctx = ctx
        sock = socket.create_connection((HOST, ctx.server.port), timeout=timeout,
                                        source_address=(src, 0))
        if (ctx.tls if tls is None else tls):
            try:
                sock = client_ssl_context().wrap_socket(sock, server_hostname=HOST)
            except BaseException:
                sock.close()
                raise
        self.sock = sock
        self.frames = Frames()
        self.events: list = []
        self.status = 0
        self.head = ""
        self.eof = False
        self.close_frame = None
        self.error = None

    def upgrade(self, timeout: float = 5.0, extra: str = "") -> int:
        key = base64.b64encode(os.urandom(16)).decode()
        req = (f"GET / HTTP/1.1\r\nHost: {HOST}:{self.ctx.server.port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
               f"Sec-WebSocket-Protocol: wse-default-json\r\n{extra}\r\n")
        self.sock.settimeout(timeout)
        self.sock.sendall(req.encode())
        buf = b""
        deadline = mono() + timeout
        while b"\r\n\r\n" not in buf:
            self.sock.settimeout(max(0.01, deadline - mono()))
            chunk = self.sock.recv(65536)
            if not chunk:
                self.eof = True
                break
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        self.head = head.decode("latin-1")
        first = self.head.split("\r\n", 1)[0]
        parts = first.split(" ")
        self.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        self.status_line = first
        if rest and self.status == 101:
            self.events += self.frames.feed(rest)
        return self.status

    def send(self, data: bytes, timeout: float = 10.0) -> None:
        self.sock.settimeout(timeout)
        self.sock.sendall(data)

    def read(self, timeout: float) -> bool:
        """One recv; False on EOF/reset (recorded), True otherwise (also on timeout)."""
        if self.eof:
            return False
        self.sock.settimeout(max(0.001, timeout))
        try:
            data = self.sock.recv(262144)
        except socket.timeout:
            return True
        except ssl.SSLWantReadError:
            return True
        except OSError as exc:
            self.eof, self.error = True, err_name(exc)
            return False
        if not data:
            self.eof = True
            return False
        for ev in self.frames.feed(data):
            if ev[0] == "close" and self.close_frame is None:
                self.close_frame = (ev[1], ev[2])
            self.events.append(ev)
        return True

    def next_event(self, timeout: float):
        deadline = mono() + timeout
        while not self.events:
            left = deadline - mono()
            if left <= 0 or not self.read(left):
                break
        return self.events.pop(0) if self.events else None

    def hi(self, identity: str, timeout: float = 10.0):
        """Send ~wse:hi; the welcome payload, or raise with what came instead."""
        self.send(wse("~wse:hi", {"identity": identity, "meta": {}}))
        deadline = mono() + timeout
        while mono() < deadline:
            ev = self.next_event(deadline - mono())
            if ev is None:
                break
            if ev[0] == "text":
                msg = json.loads(ev[1])
                if msg[0] == "~wse:welcome":
                    return msg[1]
            elif ev[0] == "close":
                raise RuntimeError(f"close {ev[1]} {ev[2]!r}")
        raise RuntimeError("eof" if self.eof else "no welcome in time")

    def drain(self, idle: float = 2.0, total: float = 10.0, until=None) -> None:
        """Read (and keep the events) until EOF, a close frame, ``until()`` or idle."""
        deadline = mono() + total
        while mono() < deadline and self.close_frame is None:
            before = self.frames.bytes
            if not self.read(min(idle, deadline - mono())):
                break
            if until is not None and until():
                break
            if self.frames.bytes == before:
                break  # idle
        return None

    def state(self) -> str:
        if self.close_frame is not None:
            code, reason = self.close_frame
            return f"close {code} {reason!r}"
        if self.eof:
            return f"cut ({self.error})" if self.error else "cut (eof)"
        return "open"

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def ws_user(ctx: "Ctx", name: str, identity: str):
    """(an authenticated Raw from the attack's address, None) or (None, what happened)."""
    try:
        r = Raw(ctx, ATTACK_IPS[name])
    except Exception as exc:
        return None, f"connect failed ({err_name(exc)})"
    try:
        if r.upgrade() != 101:
            r.close()
            return None, f"upgrade refused: {r.status_line!r}"
        r.hi(identity)
    except Exception as exc:
        r.close()
        return None, f"no welcome: {exc if isinstance(exc, RuntimeError) else err_name(exc)}"
    return r, None


def abbreviate(outcome: str) -> str:
    """A short form of one attacker outcome, for the table."""
    m = re.search(r"HTTP/1\.[01] (\d{3})", outcome)
    if m:
        return m.group(1)
    m = re.match(r"close (\d+) '([^']*)'", outcome)
    if m:
        return f"{m.group(1)} {m.group(2).replace('wse.', '')}".strip()
    if outcome.startswith("closed by server"):
        return "closed"
    if outcome.startswith("open"):
        return "open"
    return outcome.split(" (")[0][:24]


def short_counts(outcomes: list) -> str:
    c = collections.Counter(abbreviate(o) for o in outcomes)
    return ", ".join(f"{k} x{v}" for k, v in c.most_common())


def summarize(outcomes: list) -> str:
    c = collections.Counter(outcomes)
    return ", ".join(f"{k} x{v}" for k, v in c.most_common())


def times_str(ts: list) -> str:
    if not ts:
        return ""
    ts = sorted(ts)
    return f" (at {ts[0]:.1f}/{statistics.median(ts):.1f}/{ts[-1]:.1f} s min/med/max)"


# -- the server ----------------------------------------------------------------
class Server:
    """One ``wse-sync serve`` run, its output in a log file."""

    def __init__(self, cfg: "Config", name: str, tls: bool) -> None:
        self.port = free_port()
        self.log_path = os.path.join(cfg.logdir, f"{name}.log")
        args = [sys.executable, "-m", "wse_sync", "serve", APP, "--workers", "1", "--host", HOST,
                "--port", str(self.port), "--grace", "2"]
        if tls:
            args += ["--certfile", cfg.certfile, "--keyfile", cfg.keyfile]
        env = dict(os.environ, WSE_ATTACK_OPTIONS=json.dumps(cfg.server_options),
                   WSE_ATTACK_SLOW=str(SLOW_IDENTIFY), WSE_ATTACK_SINK=str(SINK_SLEEP))
        env.pop("WSE_SYNC_BROKER", None)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env=env, stdin=subprocess.DEVNULL)
        self.worker_pid = 0
        cfg.live_servers.append(self)

    def log(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 30.0) -> int:
        deadline = mono() + timeout
        while mono() < deadline:
            m = re.search(r"worker (\d+) serving", self.log())
            if m:
                self.worker_pid = int(m.group(1))
                return self.worker_pid
            if self.proc.poll() is not None:
                break
            gevent.sleep(0.05)
        raise RuntimeError("server did not start:\n" + self.log()[-3000:])

    def workers(self) -> list:
        return [p for p, cmd in children_of(self.proc.pid).items() if " _worker " in cmd]

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except OSError:
                pass
            deadline = mono() + timeout
            while self.proc.poll() is None and mono() < deadline:
                gevent.sleep(0.1)
        if self.proc.poll() is None:
            kids = list(children_of(self.proc.pid))
            self.proc.kill()
            for pid in kids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            try:
                self.proc.wait(5)
            except Exception:
                pass
        self._log.close()


# -- the good clients: a process of their own ----------------------------------------
def good_main(argv: list) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--pause", type=float, default=0.02)
    ap.add_argument("--probe", type=float, default=1.0)
    ap.add_argument("--tls", action="store_true")
    a = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    from wse_sync import WseClient

    kw = dict(rpc_timeout=5, connect_timeout=5)
    if a.tls:
        kw["ssl_context"] = client_ssl_context()
    completions: list = []
    errors: list = []       # (t, what)
    reconnects: list = []
    probes: list = []       # (t, ms or None, error)
    stop = Event()

    def new_client(i: int):
        c = WseClient(a.url, **kw)
        c.connect(f"good{i}")
        return c

    clients = [None] * a.n

    def connect_all():
        for i in range(a.n):
            deadline = mono() + 10
            while clients[i] is None and mono() < deadline:
                try:
                    clients[i] = new_client(i)
                except Exception:
                    gevent.sleep(0.2)

    connect_all()
    print(json.dumps({"ready": sum(c is not None for c in clients)}), flush=True)

    def loop(i: int) -> None:
        k = 0
        while not stop.is_set():
            c = clients[i]
            try:
                if c is None or not c.ready:
                    if c is not None:
                        try:
                            c.close()
                        except Exception:
                            pass
                    clients[i] = None
                    c = clients[i] = new_client(i)
                    reconnects.append(mono())
                k += 1
                if c.call("echo", k, timeout=5) != k:
                    raise RuntimeError("wrong answer")
                completions.append(mono())
            except Exception as exc:
                errors.append((mono(), describe(exc)))
                stop.wait(0.2)
            stop.wait(a.pause)

    def probe() -> None:
        n = 0
        while not stop.wait(a.probe):
            n += 1
            t = mono()
            c = WseClient(a.url, **kw)
            try:
                c.connect(f"probe{n}")
                probes.append((t, (mono() - t) * 1000, None))
            except Exception as exc:
                probes.append((t, None, describe(exc)))
            finally:
                try:
                    c.close()
                except Exception:
                    pass

    jobs = [gevent.spawn(loop, i) for i in range(a.n)] + [gevent.spawn(probe)]
    # wait for "stop T0 T1" on stdin (EOF stops too)
    line = b""
    while b"\n" not in line:
        try:
            gevent.socket.wait_read(0, timeout=600)
        except Exception:
            break
        chunk = os.read(0, 4096)
        if not chunk:
            break
        line += chunk
    stop.set()
    gevent.joinall(jobs, timeout=8)
    gevent.killall(jobs, timeout=2)
    parts = line.decode().split()
    t0, t1 = (float(parts[1]), float(parts[2])) if len(parts) >= 3 else (0.0, mono())
    inside = sorted(t for t in completions if t0 <= t <= t1)
    points = [t0] + inside + [t1]
    gap, at = 0.0, 0.0
    for x, y in zip(points, points[1:]):
        if y - x > gap:
            gap, at = y - x, x - t0
    errs = collections.Counter(what for t, what in errors if t0 <= t <= t1)
    pr = [p for p in probes if t0 <= p[0] <= t1]
    lat = [p[1] for p in pr if p[1] is not None]
    result = {
        "calls": len(inside), "max_gap_ms": round(gap * 1000, 1), "gap_at_s": round(at, 2),
        "errors": sum(errs.values()), "error_kinds": dict(errs),
        "errors_before": sum(1 for t, _ in errors if t < t0),
        "reconnects": sum(1 for t in reconnects if t0 <= t <= t1),
        "probe_n": len(pr), "probe_fail": len(pr) - len(lat),
        "probe_fail_kinds": dict(collections.Counter(p[2] for p in pr if p[2])),
        "probe_max_ms": round(max(lat), 1) if lat else None,
    }
    for c in clients:
        try:
            if c is not None:
                c.close()
        except Exception:
            pass
    print(json.dumps(result), flush=True)
    return 0


class Good:
    def __init__(self, cfg: "Config", url: str, tls: bool) -> None:
        args = [sys.executable, os.path.abspath(__file__), "_good", "--url", url,
                "--n", str(cfg.good), "--pause", str(cfg.pause)]
        if tls:
            args.append("--tls")
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     cwd=ROOT)
        cfg.live_goods.append(self)

    def _line(self, timeout: float):
        try:
            with gevent.Timeout(timeout):
                line = self.proc.stdout.readline()
        except gevent.Timeout:
            return None
        try:
            return json.loads(line)
        except ValueError:
            return None

    def wait_ready(self, timeout: float = 40.0) -> int:
        msg = self._line(timeout)
        return (msg or {}).get("ready", 0)

    def stop(self, t0: float, t1: float, timeout: float = 20.0) -> dict:
        try:
            self.proc.stdin.write(f"stop {t0} {t1}\n".encode())
            self.proc.stdin.flush()
            self.proc.stdin.close()
        except OSError:
            pass
        result = self._line(timeout)
        self.kill()
        return result or {"calls": 0, "max_gap_ms": None, "errors": None,
                          "error_kinds": {"no report from the good clients": 1}}

    def kill(self) -> None:
        if self.proc.poll() is None:
            deadline = mono() + 5
            while self.proc.poll() is None and mono() < deadline:
                gevent.sleep(0.1)
        if self.proc.poll() is None:
            self.proc.kill()


# -- the run --------------------------------------------------------------------------
class Config:
    pass


class Ctx:
    """What an attack gets: the server, a monitor client, the parameters."""

    def __init__(self, cfg: Config, server: Server, monitor, tls: bool) -> None:
        self.cfg = cfg
        self.server = server
        self.monitor = monitor
        self.p = PARAMS[cfg.quick]
        self.tls = tls
        self.rss_samples: list = []   # (t, kB)

    def rss(self) -> int:
        return proc_status(self.server.worker_pid, "VmRSS")

    def stats(self):
        """attack_app's counters (None when the RPC fails)."""
        try:
            return self.monitor.call("stats", timeout=10)
        except Exception:
            return None


def slow_sockets(ctx: Ctx, name: str, n: int, seconds: float, tls: bool, send_prefix) -> dict:
    """n connections that dribble ``send_prefix`` a byte a second (or send nothing)."""
    ip = ATTACK_IPS[name]
    outcomes: list = [None] * n
    closed_at: list = []
    socks: list = []

    def one(i: int) -> None:
        try:
            r = Raw(ctx, ip, timeout=5, tls=tls)
        except Exception as exc:
            outcomes[i] = f"connect failed ({err_name(exc)})"
            return
        socks.append(r)
        start = mono()   # each socket's clock starts once it is connected (TLS included)
        end = start + seconds
        sent = 0
        while mono() < end:
            if send_prefix:
                try:
                    r.sock.settimeout(5)
                    r.sock.send(send_prefix[sent % len(send_prefix):][:1])
                    sent += 1
                except OSError as exc:
                    outcomes[i] = f"closed by server (send: {err_name(exc)})"
                    closed_at.append(mono() - start)
                    return
            r.sock.settimeout(max(0.01, min(1.0, end - mono())))
            try:
                data = r.sock.recv(4096)
            except (socket.timeout, ssl.SSLWantReadError):
                continue
            except OSError as exc:
                outcomes[i] = f"closed by server ({err_name(exc)})"
                closed_at.append(mono() - start)
                return
            if not data:
                outcomes[i] = "closed by server (eof)"
                closed_at.append(mono() - start)
                return
            first = data.split(b"\r\n", 1)[0].decode("latin-1")[:40]
            outcomes[i] = f"answered {first!r}"
            closed_at.append(mono() - start)
            return
        outcomes[i] = "open at end"

    jobs = [gevent.spawn(one, i) for i in range(n)]
    gevent.joinall(jobs, timeout=seconds + 30)
    gevent.killall(jobs, timeout=2)
    for r in socks:
        r.close()
    outs = [o or "harness timeout" for o in outcomes]
    med = f" @{statistics.median(closed_at):.1f}s" if closed_at else ""
    return {"outcome": f"{summarize(outs)} (each held {seconds:.0f} s){times_str(closed_at)}",
            "short": short_counts(outs) + med,
            "detail": {"outcomes": dict(collections.Counter(outs)),
                       "closed_after_s": sorted(round(t, 2) for t in closed_at)}}


def a_slowloris(ctx: Ctx) -> dict:
    prefix = (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Version: 13\r\nX-Slow: " + b"a" * 4000)
    return slow_sockets(ctx, "slowloris", ctx.p["slowloris_n"], ctx.p["slowloris_s"], None, prefix)


def a_tls_silent(ctx: Ctx) -> dict:
    return slow_sockets(ctx, "tls-silent", ctx.p["tls_n"], ctx.p["tls_s"], False, b"")


def a_rpc_flood(ctx: Ctx) -> dict:
    n = ctx.p["rpc_n"]
    r, why = ws_user(ctx, "rpc-flood", "flood-rpc")
    if r is None:
        return {"outcome": why}
    try:
        data = b"".join(wse("nap", 1, f"s{i:08d}") for i in range(n))
        t = mono()
        note = ""
        try:
            r.send(data, timeout=30)
        except OSError as exc:
            note = f" (send failed: {err_name(exc)})"
        send_s = mono() - t
        gevent.sleep(2)  # not reading
        answers = collections.Counter()

        def count() -> bool:
            while r.events:
                ev = r.events.pop(0)
                if ev[0] == "text":
                    msg = json.loads(ev[1])
                    if msg[0] == "~wse:response":
                        answers["ok"] += 1
                    elif msg[0] == "~wse:response-err":
                        answers[str((msg[1] or {}).get("code"))] += 1
                elif ev[0] == "close":
                    return True
            return sum(answers.values()) >= n

        r.drain(idle=5, total=30, until=count)
        count()
        got = ", ".join(f"{k} {v}" for k, v in answers.most_common()) or "none"
        short = ", ".join(f"{k.replace('wse.server.', '')} {v}" for k, v in answers.most_common())
        return {"short": f"{short or 'no answers'}; {abbreviate(r.state())}",
                "outcome": f"sent {n} calls ('nap' 1 s) in {send_s:.2f} s{note}; answers: {got};"
                           f" then {r.state()}",
                "detail": {"answers": dict(answers), "send_s": round(send_s, 3),
                           "state": r.state()}}
    finally:
        r.close()


def a_channel_flood(ctx: Ctx) -> dict:
    n, size, watch = ctx.p["chan_n"], ctx.p["chan_size"], ctx.p["chan_watch"]
    r, why = ws_user(ctx, "channel-flood", "flood-chan")
    if r is None:
        return {"outcome": why}
    try:
        frame = wse("sink", "x" * size)
        t = mono()
        sent, note = 0, ""
        for _ in range(n):
            try:
                r.send(frame, timeout=30)
            except OSError as exc:
                note = f" (send stopped: {err_name(exc)})"
                break
            sent += 1
        send_s = mono() - t
        r.read(0.2)
        state_at_leave = r.state()
    finally:
        r.close()
    left_wall, left_mono = time.time(), mono()
    rss_leave = ctx.rss()
    s_leave = ctx.stats()
    series = []
    s = s_leave
    while mono() - left_mono < watch:
        gevent.sleep(0.5)
        s_now = ctx.stats()
        if s_now is None:
            continue
        s = s_now
        s_leave = s_leave or s_now
        series.append((round(mono() - left_mono, 1), s["sink_calls"], ctx.rss()))
    if s is None:
        return {"outcome": f"sent {sent}/{n} in {send_s:.1f} s{note} ({state_at_leave});"
                           " the stats RPC never answered after the client left"}
    after = s["sink_calls"] - s_leave["sink_calls"]
    last = s["sink_last"] or 0
    since_last = s["now"] - last if last else None
    still = bool(last) and since_last is not None and since_last < SINK_SLEEP + 1.0
    last_after = round(last - left_wall, 1) if last and last > left_wall else None
    rss_end = ctx.rss()
    text = (f"sent {sent}/{n} x {size // 1000} kB in {send_s:.1f} s{note} ({state_at_leave});"
            f" handler calls: {s_leave['sink_calls']} before leaving, {after} after"
            + (f" (last +{last_after} s after leaving)" if last_after is not None else "")
            + f"; still called at +{watch} s: {'YES' if still else 'no'}"
            + f"; RSS at leave {rss_leave / 1024:.0f} MB -> {rss_end / 1024:.0f} MB at +{watch} s;"
            f" {n - s['sink_calls']} messages never handled")
    short = (f"{abbreviate(state_at_leave)}; {after} calls after leaving"
             + ("; STILL CALLED" if still else ""))
    return {"outcome": text, "settle": 0.5, "short": short,
            "detail": {"sent": sent, "send_s": round(send_s, 2), "calls_at_leave": s_leave["sink_calls"],
                       "calls_after_leave": after, "last_call_after_leave_s": last_after,
                       "still_called": still, "rss_leave_kb": rss_leave, "rss_end_kb": rss_end,
                       "series_t_calls_rsskb": series}}


def a_empty_continuations(ctx: Ctx) -> dict:
    n, limit = ctx.p["cont_n"], ctx.p["cont_s"]
    r, why = ws_user(ctx, "empty-continuations", "flood-cont")
    if r is None:
        return {"outcome": why}
    try:
        r.send(cframe(0x1, b'["echo","', fin=False))
        per = 10_000
        chunk = (b"\x00\x80" + b"\x00\x00\x00\x00") * per   # FIN=0, opcode 0, masked, empty
        t = mono()
        deadline = t + limit
        sent_bytes, why = 0, ""
        pending = memoryview(chunk)
        total_bytes = n * 6
        while sent_bytes < total_bytes and mono() < deadline:
            try:
                r.sock.settimeout(1.0)
                k = r.sock.send(pending[:total_bytes - sent_bytes])
            except socket.timeout:
                k = 0
            except OSError as exc:
                why = f"send failed at +{mono() - t:.2f} s: {err_name(exc)}"
                break
            sent_bytes += k
            pending = pending[k:]
            if not len(pending):
                pending = memoryview(chunk)
                if not r.read(0.001) or r.close_frame is not None:
                    break
        frames = sent_bytes // 6
        elapsed = mono() - t
        r.drain(idle=2, total=5)
        stopped = "stopped early" if frames < n else "all sent"
        if not why and frames < n and mono() >= deadline and r.state() == "open":
            why = f"time limit {limit} s"
        return {"short": f"{abbreviate(r.state())} after <={frames:,} frames",
                "outcome": f"{frames:,} empty continuations in {elapsed:.1f} s ({stopped}"
                           f"{': ' + why if why else ''}); then {r.state()}",
                "detail": {"frames_sent": frames, "seconds": round(elapsed, 2),
                           "state": r.state()}}
    finally:
        r.close()


def a_ping_flood(ctx: Ctx) -> dict:
    seconds = ctx.p["ping_s"]
    r, why = ws_user(ctx, "ping-flood", "flood-ping")
    if r is None:
        return {"outcome": why}
    try:
        one = cframe(0x9, PING_PAYLOAD)
        per = 2000
        chunk = one * per
        t = mono()
        deadline = t + seconds
        sent_bytes, why, blocked = 0, "", 0.0
        pending = memoryview(chunk)
        while mono() < deadline:
            try:
                r.sock.settimeout(max(0.01, min(0.5, deadline - mono())))
                s0 = mono()
                k = r.sock.send(pending)
            except socket.timeout:
                blocked += mono() - s0
                continue
            except OSError as exc:
                why = f"send failed at +{mono() - t:.2f} s: {err_name(exc)}"
                break
            sent_bytes += k
            pending = pending[k:]
            if not len(pending):
                pending = memoryview(chunk)
        pings = sent_bytes // len(one)
        flood_s = mono() - t
        pongs = [0]

        def count() -> bool:
            while r.events:
                ev = r.events.pop(0)
                if ev[0] == "pong":
                    pongs[0] += 1
            return False

        r.drain(idle=2, total=15, until=count)
        count()
        return {"short": f"{abbreviate(r.state())} at +{flood_s:.1f}s, {pings // 1000}k pings",
                "outcome": f"{pings:,} pings in {flood_s:.1f} s (send blocked {blocked:.1f} s"
                           f"{'; ' + why if why else ''}), not reading; read afterwards:"
                           f" {pongs[0]:,} pongs, then {r.state()}",
                "detail": {"pings": pings, "pongs": pongs[0], "blocked_s": round(blocked, 2),
                           "state": r.state()}}
    finally:
        r.close()


def a_identify_flood(ctx: Ctx) -> dict:
    n = ctx.p["ident_n"]
    ip = ATTACK_IPS["identify-flood"]
    outcomes: list = [None] * n
    lat: list = []
    socks: list = []
    wait = SLOW_IDENTIFY + 15

    def one(i: int) -> None:
        t = mono()
        try:
            r = Raw(ctx, ip, timeout=5)
        except Exception as exc:
            outcomes[i] = f"connect failed ({err_name(exc)})"
            return
        socks.append(r)
        try:
            st = r.upgrade(timeout=10)
        except Exception as exc:
            outcomes[i] = f"upgrade failed ({err_name(exc)})"
            return
        if st != 101:
            outcomes[i] = f"HTTP {r.status_line!r}"
            return
        try:
            r.hi(f"slow{i}", timeout=wait)
            outcomes[i] = "welcome"
            lat.append(mono() - t)
        except Exception as exc:
            outcomes[i] = str(exc)[:60]

    jobs = [gevent.spawn(one, i) for i in range(n)]
    gevent.joinall(jobs, timeout=wait + 15)
    gevent.killall(jobs, timeout=2)
    for r in socks:
        r.close()
    outs = [o or "harness timeout" for o in outcomes]
    span = f" in {min(lat):.1f}-{max(lat):.1f}s" if lat else ""
    return {"short": short_counts(outs) + span,
            "outcome": f"{n} hellos with slow identify: {summarize(outs)}"
                       + (f" (welcome after {times_str(lat)[5:-1]})" if lat else ""),
            "detail": {"outcomes": dict(collections.Counter(outs)),
                       "welcome_after_s": sorted(round(x, 2) for x in lat)}}


def a_non_readers(ctx: Ctx) -> dict:
    n, size, watch = ctx.p["nonread_n"], ctx.p["bcast_size"], ctx.p["nonread_watch"]
    ip = ATTACK_IPS["non-readers"]
    conns: list = []
    failed = collections.Counter()
    try:
        def one(i: int) -> None:
            try:
                r = Raw(ctx, ip)
            except Exception as exc:
                failed[f"connect failed ({err_name(exc)})"] += 1
                return
            conns.append(r)
            try:
                if r.upgrade() != 101:
                    failed[f"HTTP {r.status_line!r}"] += 1
                    return
                r.hi(f"deaf{i}")
                r.ok = True
            except Exception as exc:
                failed[str(exc)[:60]] += 1

        gevent.joinall([gevent.spawn(one, i) for i in range(n)], timeout=30)
        ready = [r for r in conns if getattr(r, "ok", False)]
        t = mono()
        try:
            ctx.monitor.call("bcast", size, timeout=60)
            note = f"bcast RPC answered in {mono() - t:.2f} s"
        except Exception as exc:
            note = f"bcast RPC failed: {getattr(exc, 'code', None) or err_name(exc)}"
        gevent.sleep(watch)

        def look(r: Raw) -> None:
            r.drain(idle=2, total=15)

        gevent.joinall([gevent.spawn(look, r) for r in ready], timeout=25)
        states = []
        for r in ready:
            msgs = [e for e in r.events if e[0] == "text" and e[1][:8] == b'["big","']
            full = any(len(e[1]) >= size for e in msgs)
            st = r.state()
            states.append(f"{st}, " + ("got the message" if full else
                                        f"got {r.frames.bytes // 1024} KiB, not the message"))
        outs = summarize(states)
        if failed:
            outs += f"; setup: {summarize(list(failed.elements()))}"
        short_states = collections.Counter(
            st.split(",")[0] + ("" if "got the message" in st else ", no msg") for st in states)
        return {"short": ", ".join(f"{k} x{v}" for k, v in short_states.most_common())
                         + ("" if note.startswith("bcast RPC answered") else "; bcast RPC failed"),
                "outcome": f"{len(ready)} non-readers, {size / 1e6:.0f} MB broadcast ({note});"
                           f" after {watch} s, read: {outs}",
                "detail": {"states": dict(collections.Counter(states)), "setup_failed": dict(failed),
                           "note": note}}
    finally:
        for r in conns:
            r.close()


def a_malformed(ctx: Ctx) -> dict:
    ip = ATTACK_IPS["malformed-upgrades"]
    port = ctx.server.port

    def req(first: str, version: bool = True, key: str = None, extra: str = "") -> bytes:
        key = key or base64.b64encode(os.urandom(16)).decode()
        lines = [first, f"Host: {HOST}:{port}", "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Protocol: wse-default-json"]
        if version:
            lines.append("Sec-WebSocket-Version: 13")
        return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()

    cases = [
        ("HTTP/1.0 upgrade", req("GET / HTTP/1.0")),
        ("two-word request line", req("GET /")),
        ("no Sec-WebSocket-Version", req("GET / HTTP/1.1", version=False)),
        ("non-base64 key", req("GET / HTTP/1.1", key="not*base64*at*all!!")),
        ("huge header (1 MiB)", req("GET / HTTP/1.1", extra="X-Huge: " + "a" * (1 << 20) + "\r\n")),
    ]
    results: dict = {}

    def one(name: str, data: bytes) -> None:
        try:
            r = Raw(ctx, ip)
        except Exception as exc:
            results[name] = {"status": f"connect failed ({err_name(exc)})", "body": 0,
                             "conn": "-"}
            return
        sent = "sent"
        try:
            r.send(data, timeout=5)
        except OSError as exc:
            sent = f"send cut ({err_name(exc)})"
        buf = b""
        conn = "open"
        deadline = mono() + 6
        r.sock.settimeout(2)
        while mono() < deadline:
            try:
                chunk = r.sock.recv(65536)
            except (socket.timeout, ssl.SSLWantReadError):
                break
            except OSError as exc:
                conn = f"closed ({err_name(exc)})"
                break
            if not chunk:
                conn = "closed"
                break
            buf += chunk
        if conn == "open":
            # one more look: did the server close after its answer?
            try:
                r.sock.settimeout(1)
                if r.sock.recv(1) == b"":
                    conn = "closed"
            except (socket.timeout, ssl.SSLWantReadError):
                pass
            except OSError as exc:
                conn = f"closed ({err_name(exc)})"
        r.close()
        head, sep, body = buf.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0].decode("latin-1")[:60] if buf else "(no answer)"
        blen = len(body) if sep else (len(buf) if buf and not buf.startswith(b"HTTP/") else 0)
        results[name] = {"status": status, "body": blen, "conn": conn, "request": sent}

    jobs = [gevent.spawn(one, name, data) for name, data in cases]
    gevent.joinall(jobs, timeout=30)
    gevent.killall(jobs, timeout=2)
    parts = []
    for name, _ in cases:
        res = results.get(name) or {"status": "harness timeout", "body": 0, "conn": "-"}
        results[name] = res
        extra = "" if res.get("request", "sent") == "sent" else f", {res['request']}"
        parts.append(f"{name}: {res['status']!r} body {res['body']} B, {res['conn']}{extra}")
    short = " ".join(str(abbreviate(results[name]["status"])) for name, _ in cases)
    closed = sum(1 for res in results.values() if str(res.get("conn", "")).startswith("closed"))
    return {"outcome": "; ".join(parts), "detail": results,
            "short": f"{short}; {closed}/{len(cases)} closed"}


ATTACKS = {
    "slowloris": a_slowloris, "tls-silent": a_tls_silent, "rpc-flood": a_rpc_flood,
    "channel-flood": a_channel_flood, "empty-continuations": a_empty_continuations,
    "ping-flood": a_ping_flood, "identify-flood": a_identify_flood,
    "non-readers": a_non_readers, "malformed-upgrades": a_malformed,
}


def scan_log(text: str) -> dict:
    notable = collections.Counter()
    for line in text.splitlines():
        m = re.search(r" (WARNING|ERROR|CRITICAL) \[[^\]]*\] (.*)", line)
        if m:  # numbers and addresses out, so that alike lines count together
            notable[re.sub(r"\d+(\.\d+)?", "N", m.group(2))[:100]] += 1
    return {
        "log_warnings": dict(notable.most_common(5)),
        "traceback": text.count("Traceback"),
        "broker_silent": len(re.findall(r"worker \S+ \(pid \d+\) silent for", text)),
        "silent_lines": text.count("silent for"),
        # the supervisor: "worker (pid N) exited with ...: starting a replacement"
        "worker_died": len(re.findall(r"worker \(pid \d+\) exited", text)),
    }


def run_attack(cfg: Config, name: str) -> dict:
    from wse_sync import WseClient

    res: dict = {"attack": name, "ip": ATTACK_IPS[name]}
    # tls-silent always needs TLS: a TLS server of its own unless --tls made them all TLS
    tls = cfg.tls or name == "tls-silent"
    res["tls"] = tls
    if tls and not cfg.tls_available:
        res.update(skipped=cfg.tls_skip, outcome=f"not run: {cfg.tls_skip}")
        return res
    server = Server(cfg, name, tls)
    good = monitor = None
    res["log"] = server.log_path
    try:
        server.wait_ready()
        url = f"{'wss' if tls else 'ws'}://{HOST}:{server.port}/"
        kw = {"ssl_context": client_ssl_context()} if tls else {}
        monitor = WseClient(url, rpc_timeout=10, connect_timeout=10, **kw)
        monitor.connect("monitor")
        st = monitor.call("stats")
        res["server_options"] = {"applied": st.get("options_applied"),
                                 "ignored": st.get("options_ignored"),
                                 "limits": st.get("limits")}
        good = Good(cfg, url, tls)
        res["good_ready"] = good.wait_ready()
        ctx = Ctx(cfg, server, monitor, tls)
        gevent.sleep(1.0)
        pid = server.worker_pid
        res["worker_pid"] = pid
        rss_before = ctx.rss()
        peak = [rss_before]
        sampling = Event()

        def sampler() -> None:
            while not sampling.wait(0.1):
                peak[0] = max(peak[0], ctx.rss())

        sam = gevent.spawn(sampler)
        t0 = mono()
        try:
            with gevent.Timeout(cfg.attack_timeout):
                out = ATTACKS[name](ctx)
        except gevent.Timeout:
            out = {"outcome": f"harness timeout after {cfg.attack_timeout} s"}
        except Exception as exc:
            out = {"outcome": f"harness error: {type(exc).__name__}: {exc}",
                   "trace": traceback.format_exc()}
        res["attack_s"] = round(mono() - t0, 1)
        gevent.sleep(out.pop("settle", ctx.p["settle"]))
        t1 = mono()
        rss_after = ctx.rss()
        sampling.set()
        sam.join(2)
        peak_kb = max(peak[0], proc_status(pid, "VmHWM"), rss_after)
        res.update(out)
        res["rss_kb"] = {"before": rss_before, "peak": peak_kb, "after": rss_after}
        res["good"] = good.stop(t0, t1)
        good = None
        workers = server.workers()
        res["worker_alive"] = pid in workers
        if pid not in workers:
            res["worker_replaced_by"] = workers
    except Exception as exc:
        res.setdefault("outcome", f"harness error: {type(exc).__name__}: {exc}")
        res["trace"] = traceback.format_exc()
    finally:
        if good is not None:
            good.kill()
        if monitor is not None:
            try:
                monitor.close()
            except Exception:
                pass
        server.stop()
        res.update(scan_log(server.log()))
    return res


def mb(kb) -> str:
    return f"{kb / 1024:.0f}" if kb else "-"


def print_table(results: list, elapsed: float) -> None:
    rows = [("attack", "attacker saw", "RSS MB b/peak/a", "good err", "gap ms",
             "probe fail", "Tb", "silent")]
    for r in results:
        rss = r.get("rss_kb") or {}
        g = r.get("good") or {}
        short = r.get("short") or r.get("outcome", "")
        if len(short) > 52:
            short = short[:49] + "..."
        rows.append((
            r["attack"], short,
            f"{mb(rss.get('before'))}/{mb(rss.get('peak'))}/{mb(rss.get('after'))}" if rss else "-",
            "-" if "skipped" in r else str(g.get("errors", "-")),
            "-" if "skipped" in r else str(g.get("max_gap_ms", "-")),
            "-" if "skipped" in r else f"{g.get('probe_fail', '-')}/{g.get('probe_n', '-')}",
            "-" if "skipped" in r else ("YES" if r.get("traceback") else "no"),
            "-" if "skipped" in r else ("YES" if r.get("broker_silent") else "no"),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for k, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths))
    print()
    print("Details (gap = longest time between two good-client RPC completions in the attack"
          " window; probe = a new good connection every second):")
    for r in results:
        print(f"\n[{r['attack']}] from {r['ip']}: {r.get('outcome', '')}")
        if "skipped" in r:
            continue
        g = r.get("good") or {}
        print(f"  good clients: {g.get('calls')} calls, errors {g.get('errors')} "
              f"{g.get('error_kinds') or ''}, reconnects {g.get('reconnects')}, max gap "
              f"{g.get('max_gap_ms')} ms at +{g.get('gap_at_s')} s; probe: "
              f"{g.get('probe_fail')}/{g.get('probe_n')} failed {g.get('probe_fail_kinds') or ''},"
              f" slowest {g.get('probe_max_ms')} ms")
        print(f"  worker {r.get('worker_pid')} alive at end: {r.get('worker_alive')}"
              f"{' replaced by ' + str(r['worker_replaced_by']) if r.get('worker_replaced_by') else ''};"
              f" log: {r.get('traceback', 0)} Traceback, {r.get('broker_silent', 0)} broker"
              f" 'worker ... silent for', {r.get('silent_lines', 0)} 'silent for' lines;"
              f" {r.get('log')}")
        for line, k in (r.get("log_warnings") or {}).items():
            print(f"  log x{k}: {line}")
        if r.get("trace"):
            print("  " + r["trace"].replace("\n", "\n  "))
    print(f"\ntotal {elapsed:.0f} s")


def setup_tls(cfg: Config) -> tuple:
    """(True, "") with a self-signed cert in cfg.certfile/keyfile, or (False, why not)."""
    try:
        help_text = subprocess.run([sys.executable, "-m", "wse_sync", "serve", "--help"],
                                   capture_output=True, text=True, cwd=ROOT, timeout=60).stdout
    except Exception as exc:
        return False, f"serve --help failed: {err_name(exc)}"
    if "--certfile" not in help_text:
        return False, "no --certfile flag"
    cfg.certfile = os.path.join(cfg.logdir, "cert.pem")
    cfg.keyfile = os.path.join(cfg.logdir, "key.pem")
    try:
        out = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                              "-keyout", cfg.keyfile, "-out", cfg.certfile, "-days", "2",
                              "-subj", "/CN=127.0.0.1"], capture_output=True, text=True,
                             timeout=60)
    except Exception as exc:
        return False, f"openssl failed: {err_name(exc)}"
    if out.returncode != 0:
        return False, "openssl failed: " + out.stderr.strip()[-200:]
    return True, ""


def main(argv: list) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller counts, shorter waits")
    ap.add_argument("--tls", action="store_true", help="serve TLS (self-signed, openssl CLI)")
    ap.add_argument("--json", metavar="PATH", help="write the results there")
    ap.add_argument("--only", help="comma-separated attacks: " + ",".join(ORDER))
    ap.add_argument("--good", type=int, default=20, help="good clients (20)")
    ap.add_argument("--pause", type=float, default=0.02,
                    help="seconds a good client waits between calls (0.02)")
    ap.add_argument("--server-option", action="append", default=[], metavar="KEY=JSON",
                    help="a WseServer option for attack_app (dropped if unknown)")
    args = ap.parse_args(argv)

    cfg = Config()
    cfg.quick = args.quick
    cfg.good = args.good
    cfg.pause = args.pause
    cfg.live_servers, cfg.live_goods = [], []
    cfg.server_options = {}
    for item in args.server_option:
        k, _, v = item.partition("=")
        try:
            cfg.server_options[k] = json.loads(v)
        except ValueError:
            cfg.server_options[k] = v
    cfg.attack_timeout = 150 if args.quick else 400
    cfg.logdir = tempfile.mkdtemp(prefix="wse-attack-")
    # TLS: tls-silent always runs on a TLS server; --tls puts every attack over TLS
    cfg.tls_available, cfg.tls_skip = setup_tls(cfg)
    cfg.tls = args.tls and cfg.tls_available
    names = ORDER if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        ap.error(f"unknown attacks {unknown}; known: {ORDER}")

    def cleanup(*_a) -> None:
        for g in cfg.live_goods:
            try:
                g.proc.kill()
            except OSError:
                pass
        for s in cfg.live_servers:
            if s.proc.poll() is None:
                for pid in list(children_of(s.proc.pid)) + [s.proc.pid]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass

    def on_alarm(*_a) -> None:
        sys.stderr.write("attack.py: hard deadline passed, stopping\n")
        cleanup()
        os._exit(3)

    # a hard deadline for the whole run, whatever blocks
    hard = 300 if args.quick else 1500
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(hard)
    signal.signal(signal.SIGTERM, lambda *a: (cleanup(), os._exit(4)))

    started = mono()
    if cfg.tls:
        tls_note = "every attack over TLS"
    elif cfg.tls_available:
        tls_note = "only tls-silent, on a TLS server of its own; --tls for all"
    else:
        tls_note = f"none: {cfg.tls_skip}"
    print(f"attack.py: {'quick' if args.quick else 'full'} mode; TLS: {tls_note};"
          f" {cfg.good} good clients; logs in {cfg.logdir}", flush=True)
    results = []
    try:
        for name in names:
            t = mono()
            res = run_attack(cfg, name)
            results.append(res)
            print(f"  {name}: {mono() - t:.0f} s — {res.get('outcome', '')[:150]}", flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    finally:
        cleanup()
    elapsed = mono() - started
    signal.alarm(0)
    opts = next((r["server_options"] for r in results if r.get("server_options")), None)
    if opts:
        limits = opts.get("limits") or {}
        print("server limits (attack_app's options): "
              + (", ".join(f"{k}={v}" for k, v in sorted(limits.items())) or "unknown"))
        if opts.get("applied") or opts.get("ignored"):
            print(f"--server-option applied: {opts.get('applied')}, ignored (unknown to this"
                  f" WseServer): {opts.get('ignored')}")
    print()
    print_table(results, elapsed)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mode": "quick" if args.quick else "full", "tls": cfg.tls,
                       "tls_skip": cfg.tls_skip, "elapsed_s": round(elapsed, 1),
                       "server_options": cfg.server_options, "results": results}, f, indent=2)
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_good":
        sys.exit(good_main(sys.argv[2:]))
    sys.exit(main(sys.argv[1:]))
