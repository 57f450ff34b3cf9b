"""One client process of bench/crowd.py: users ``u<first>`` .. ``u<first+count-1>``.

Each user is one gevent greenlet holding one raw WebSocket (no WseClient):
the HTTP upgrade with subprotocol ``wse-default-json``, ``["~wse:hi",
{"identity": "u<N>", "meta": {}}, null]``, then the welcome; server pings
are answered with pongs. The wse JS client's reconnect rule: after a close
with code 1005, 1006, 1011, 1012, 1013, 1014 or 4000 (a dropped TCP
connection, a refused connect and an upgrade answered with another status
than 101 count as 1006, as in a browser) the user connects again 1 to 2 s
later; after any other code (e.g. 1000 wse.not-authorized) it never does:
the user is "lost for good". User N's socket is bound to source address
127.0.0.(1 + N % addresses) before it connects.

Driven by bench/crowd.py through stdin / stdout, one JSON object per line:
each command ``{"id": .., "cmd": .., ...}`` is answered by ``{"id": .., ...}``.

- ``status``: counts (ready, connecting, waiting, lost), closes by code;
- ``welcomed``: [[cid, conn_id, pid], ...] of the ready users, and the
  welcomed connections each user lost so far (``disc``: {cid: n});
- ``tables`` {pids?}: the ``table`` RPC of each worker (through one ready
  user on that worker), {pid: {worker, conns}};
- ``send`` {phase, mode: paced|closed, senders, rate, duration}: ``senders``
  users call RPC ``note`` towards users of this process on another worker,
  ``rate`` calls per second each (paced, not waiting for answers), or one
  after the other as fast as the answers come (closed); answers when done;
- ``notes`` {phase}: what became of the notes of a phase;
- ``quit``.

Exits by itself at ``--deadline`` (a time.time() value) or when stdin closes.
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import base64  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
from gevent.event import AsyncResult  # noqa: E402
from gevent.fileobject import FileObjectPosix  # noqa: E402
from gevent.lock import Semaphore  # noqa: E402

from wse_sync.core.frames import (OP_PONG, OP_TEXT, FrameError, FrameReader,  # noqa: E402
                                  build_close, build_frame)

RETRY_CODES = frozenset((1005, 1006, 1011, 1012, 1013, 1014, 4000))
IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h: the port is picked at connect(), per 4-tuple


class User:
    __slots__ = ("idx", "cid", "src", "sock", "lock", "state", "conn_id", "pid", "epoch",
                 "disconnects", "lost", "stamps")

    def __init__(self, idx: int, src: str) -> None:
        self.idx = idx
        self.cid = f"u{idx}"
        self.src = src
        self.sock = None
        self.lock = Semaphore()
        self.state = "connecting"   # connecting | ready | waiting | lost
        self.conn_id = None
        self.pid = None
        self.epoch = 0              # welcomes so far
        self.disconnects = 0        # welcomed connections that closed
        self.lost = None            # (code, reason) of the close that ended it
        self.stamps = set()         # calls in flight on the current connection


class Crowd:
    def __init__(self, args) -> None:
        self.args = args
        m = args.url.split("//", 1)[1].split("/", 1)
        host, _, port = m[0].partition(":")
        self.host, self.port = host, int(port)
        self.path = "/" + (m[1] if len(m) > 1 else "")
        self.users = [User(i, f"127.0.0.{1 + i % args.addresses}")
                      for i in range(args.first, args.first + args.count)]
        self.by_cid = {u.cid: u for u in self.users}
        self.connect_slots = Semaphore(args.connect_concurrency)
        self.stopping = False
        self.closes = collections.Counter()        # "code reason" -> n (every close)
        self.failures = collections.Counter()      # connect / upgrade failures by kind
        self.pending = {}                          # stamp -> (AsyncResult, user)
        self.stamp_n = 0
        # notes: phase -> {note id: [target cid, target epoch at send, answer]}
        self.sent = collections.defaultdict(dict)
        self.received = collections.Counter()      # note id -> deliveries
        self.misdelivered = 0
        self.welcome_times = []                    # seconds from connect to welcome

    # -- one connection ------------------------------------------------------------
    def _connect_once(self, u: User, first: bool):
        """Returns (code, reason, welcomed)."""
        args = self.args
        held = False
        if first:
            self.connect_slots.acquire()
            held = True
        sock = None
        welcomed = False
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            except OSError:
                pass
            sock.bind((u.src, 0))
            sock.settimeout(args.connect_timeout)
            started = time.monotonic()
            try:
                sock.connect((self.host, self.port))
            except OSError as exc:
                self.failures[f"connect {type(exc).__name__}"] += 1
                return 1006, "connect failed", False
            key = base64.b64encode(os.urandom(16)).decode()
            request = (f"GET {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                       "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                       f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                       "Sec-WebSocket-Protocol: wse-default-json\r\n\r\n")
            buf = b""
            try:
                sock.sendall(request.encode())
                while b"\r\n\r\n" not in buf:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    buf += chunk
            except OSError as exc:
                self.failures[f"upgrade {type(exc).__name__}"] += 1
                return 1006, "upgrade failed", False
            head, _, rest = buf.partition(b"\r\n\r\n")
            status = head.split(b" ", 2)[1].decode() if head.count(b" ") >= 1 else "none"
            if status != "101":
                self.failures[f"http {status}"] += 1
                return 1006, f"http {status}", False
            u.sock = sock
            hi = json.dumps(["~wse:hi", {"identity": u.cid, "meta": {}}, None])
            try:
                with u.lock:
                    sock.sendall(build_frame(OP_TEXT, hi.encode(), mask=True))
            except OSError:
                self.failures["hi not sent"] += 1
                return 1006, "hi not sent", False
            sock.settimeout(args.welcome_timeout)
            reader = FrameReader(None, expect_mask=False)
            events = reader.feed(rest) if rest else []
            while True:
                for ev in events:
                    kind = ev[0]
                    if kind == "text":
                        if self._message(u, ev[1]) and not welcomed:
                            welcomed = True
                            self.welcome_times.append(time.monotonic() - started)
                            sock.settimeout(None)
                            if held:
                                self.connect_slots.release()
                                held = False
                    elif kind == "ping":
                        try:
                            with u.lock:
                                sock.sendall(build_frame(OP_PONG, ev[1], mask=True))
                        except OSError:
                            pass
                    elif kind == "close":
                        code, reason = ev[1], ev[2]
                        try:
                            with u.lock:
                                sock.sendall(build_close(code, "", mask=True))
                        except OSError:
                            pass
                        return code, reason, welcomed
                try:
                    data = sock.recv(65536)
                except socket.timeout:
                    self.failures["no welcome in time"] += 1
                    return 1006, "no welcome in time", welcomed
                except OSError:
                    data = b""
                if not data:
                    return 1006, "eof", welcomed
                try:
                    events = reader.feed(data)
                except FrameError as exc:
                    self.failures["bad frame"] += 1
                    return 1006, f"bad frame: {exc}", welcomed
        finally:
            if held:
                self.connect_slots.release()
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass
            u.sock = None
            if u.state == "ready":
                u.state = "waiting"
            for stamp in list(u.stamps):
                entry = self.pending.get(stamp)
                if entry is not None:
                    entry[0].set((False, {"code": "client.closed"}))
            u.stamps.clear()

    def _message(self, u: User, text: str) -> bool:
        """Handle one text message; True for the welcome."""
        try:
            msg = json.loads(text)
            type_, payload = msg[0], msg[1] if len(msg) > 1 else None
            stamp = msg[2] if len(msg) > 2 else None
        except (ValueError, IndexError, TypeError):
            self.failures["bad message"] += 1
            return False
        if type_ == "~wse:welcome":
            u.conn_id = payload.get("conn_id") if isinstance(payload, dict) else None
            u.pid = payload.get("pid") if isinstance(payload, dict) else None
            u.epoch += 1
            u.state = "ready"
            return True
        if type_ in ("~wse:response", "~wse:response-err"):
            entry = self.pending.get(stamp)
            if entry is not None:
                entry[0].set((type_ == "~wse:response", payload))
            return False
        if type_ == "note":
            note_id = payload.get("id")
            self.received[note_id] += 1
            if payload.get("to") != u.cid:
                self.misdelivered += 1
            return False
        self.failures[f"unexpected message {type_}"] += 1
        return False

    def life(self, u: User) -> None:
        first = True
        while not self.stopping:
            u.state = "connecting"
            code, reason, welcomed = self._connect_once(u, first)
            first = False
            if self.stopping:
                return
            if welcomed:
                u.disconnects += 1
            self.closes[f"{code} {reason}"] += 1
            if code not in RETRY_CODES:
                u.state = "lost"
                u.lost = (code, reason)
                return
            u.state = "waiting"
            gevent.sleep(random.uniform(1.0, 2.0))

    # -- RPC -------------------------------------------------------------------------
    def call(self, u: User, rp: str, payload, timeout: float):
        """(ok, value); ok is None on a timeout or when the user is not connected."""
        sock = u.sock
        if sock is None or u.state != "ready":
            return None, "not ready"
        self.stamp_n += 1
        stamp = f"s{self.args.first}-{self.stamp_n}"
        ar = AsyncResult()
        self.pending[stamp] = (ar, u)
        u.stamps.add(stamp)
        try:
            data = build_frame(OP_TEXT, json.dumps([rp, payload, stamp]).encode(), mask=True)
            try:
                with u.lock:
                    sock.sendall(data)
            except OSError:
                return None, "send failed"
            try:
                return ar.get(timeout=timeout)
            except gevent.Timeout:
                return None, "timeout"
        finally:
            self.pending.pop(stamp, None)
            u.stamps.discard(stamp)

    # -- commands ----------------------------------------------------------------------
    def status(self, cmd) -> dict:
        states = collections.Counter(u.state for u in self.users)
        lost = [[u.cid, u.lost[0], u.lost[1]] for u in self.users if u.state == "lost"]
        wt = sorted(self.welcome_times)
        return {"ready": states["ready"], "connecting": states["connecting"],
                "waiting": states["waiting"], "lost": states["lost"], "lost_users": lost[:50],
                "closes": dict(self.closes), "failures": dict(self.failures),
                "welcomes": sum(u.epoch for u in self.users),
                "welcome_p50": wt[len(wt) // 2] if wt else None,
                "welcome_p99": wt[int(len(wt) * 0.99)] if wt else None,
                "welcome_max": wt[-1] if wt else None}

    def welcomed(self, cmd) -> dict:
        return {"users": [[u.cid, u.conn_id, u.pid] for u in self.users if u.state == "ready"],
                "disc": {u.cid: u.disconnects for u in self.users if u.disconnects},
                "lost": [u.cid for u in self.users if u.state == "lost"]}

    def tables(self, cmd) -> dict:
        wanted = cmd.get("pids")
        by_pid = {}
        for u in self.users:
            if u.state == "ready" and u.pid not in by_pid and (wanted is None
                                                               or u.pid in wanted):
                by_pid[u.pid] = u
        out = {}
        errors = {}

        def ask(pid, u):
            ok, value = self.call(u, "table", None, self.args.rpc_timeout * 2)
            if ok:
                out[str(pid)] = value
            else:
                errors[str(pid)] = value if isinstance(value, str) else json.dumps(value)

        gevent.joinall([gevent.spawn(ask, pid, u) for pid, u in by_pid.items()])
        return {"tables": out, "errors": errors}

    def send(self, cmd) -> dict:
        phase, mode = cmd["phase"], cmd["mode"]
        n_senders, rate, duration = cmd["senders"], cmd.get("rate", 1.0), cmd["duration"]
        ready = [u for u in self.users if u.state == "ready"]
        random.shuffle(ready)
        senders = ready[:n_senders]
        sent = self.sent[phase]
        answers = collections.Counter()
        end = time.monotonic() + duration
        seq = [0]
        lat = []

        by_pid = collections.defaultdict(list)
        for u in ready:
            by_pid[u.pid].append(u)

        def target_for(s: User):
            """A ready user of this process on another worker (any other user
            with one worker)."""
            pids = [p for p in by_pid if p != s.pid] or list(by_pid)
            for _ in range(10):
                t = random.choice(by_pid[random.choice(pids)])
                if t.state == "ready" and t is not s:
                    return t
            return None

        def one(s: User) -> None:
            t = target_for(s) if by_pid else None
            if t is None:
                answers["no target"] += 1
                gevent.sleep(0.1)
                return
            seq[0] += 1
            note_id = f"{phase}-{self.args.first}-{seq[0]}"
            entry = sent[note_id] = [t.cid, t.epoch, None]
            started = time.monotonic()
            ok, value = self.call(s, "note", {"to": t.cid, "id": note_id}, self.args.rpc_timeout)
            lat.append(time.monotonic() - started)
            if ok and isinstance(value, dict) and value.get("ok"):
                entry[2] = "ok"
            elif ok:
                entry[2] = str(value.get("code") if isinstance(value, dict) else value)
            elif ok is False:
                entry[2] = str(value.get("code") if isinstance(value, dict) else value)
            else:
                entry[2] = f"client: {value}"
            answers[entry[2]] += 1

        def paced(s: User) -> None:
            period = 1.0 / rate
            nxt = time.monotonic() + random.uniform(0, period)
            jobs = []
            while True:
                now = time.monotonic()
                if now >= end:
                    break
                if now < nxt:
                    gevent.sleep(nxt - now)
                    continue
                nxt += period
                jobs.append(gevent.spawn(one, s))
            gevent.joinall(jobs)

        def closed(s: User) -> None:
            while time.monotonic() < end:
                if s.state != "ready":
                    answers["sender not ready"] += 1
                    gevent.sleep(0.2)
                    continue
                one(s)

        loop = paced if mode == "paced" else closed
        gevent.joinall([gevent.spawn(loop, s) for s in senders])
        lat.sort()
        return {"senders": len(senders), "calls": sum(answers.values()), "answers": dict(answers),
                "rpc_p50": lat[len(lat) // 2] if lat else None,
                "rpc_p99": lat[int(len(lat) * 0.99)] if lat else None}

    def notes(self, cmd) -> dict:
        sent = self.sent.get(cmd["phase"], {})
        out = collections.Counter()
        examples = collections.defaultdict(list)
        for note_id, (target, epoch, answer) in sent.items():
            got = self.received.get(note_id, 0)
            t = self.by_cid[target]
            moved = t.epoch != epoch or t.state != "ready"
            if answer == "ok":
                out["accepted"] += 1
                if got == 1:
                    out["delivered once"] += 1
                elif got == 0 and moved:
                    out["undelivered, target reconnected"] += 1
                elif got == 0:
                    out["lost"] += 1
                    if len(examples["lost"]) < 5:
                        examples["lost"].append([note_id, target])
                else:
                    out["duplicated"] += 1
                    if len(examples["duplicated"]) < 5:
                        examples["duplicated"].append([note_id, target, got])
            else:
                out["refused"] += 1
                if got:
                    out["refused yet delivered"] += 1
        out["misdelivered (all phases)"] = self.misdelivered
        return {"notes": dict(out), "examples": dict(examples)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--first", type=int, required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--addresses", type=int, default=8)
    ap.add_argument("--connect-concurrency", type=int, default=100,
                    help="first connections of this process in flight at once")
    ap.add_argument("--connect-timeout", type=float, default=30)
    ap.add_argument("--welcome-timeout", type=float, default=60)
    ap.add_argument("--rpc-timeout", type=float, default=10)
    ap.add_argument("--deadline", type=float, default=0, help="time.time() to exit at")
    args = ap.parse_args()
    crowd = Crowd(args)
    out = FileObjectPosix(sys.stdout.fileno(), "wb", close=False)
    stdin = FileObjectPosix(sys.stdin.fileno(), "rb", close=False)
    out_lock = Semaphore()

    def reply(obj) -> None:
        with out_lock:
            out.write((json.dumps(obj) + "\n").encode())
            out.flush()

    def handle(cmd) -> None:
        try:
            fn = {"status": crowd.status, "welcomed": crowd.welcomed, "tables": crowd.tables,
                  "send": crowd.send, "notes": crowd.notes}[cmd["cmd"]]
            answer = fn(cmd)
        except Exception as exc:  # said to the harness, which fails the step
            answer = {"error": repr(exc)}
        answer["id"] = cmd.get("id")
        reply(answer)

    def deadline() -> None:
        if args.deadline:
            gevent.sleep(max(0.0, args.deadline - time.time()))
            sys.stderr.write("crowd_client: deadline reached\n")
            os._exit(3)

    gevent.spawn(deadline)
    for u in crowd.users:
        gevent.spawn(crowd.life, u)
    reply({"id": "started", "users": len(crowd.users)})
    while True:
        line = stdin.readline()
        if not line:
            break
        cmd = json.loads(line)
        if cmd.get("cmd") == "quit":
            break
        gevent.spawn(handle, cmd)
    crowd.stopping = True
    os._exit(0)  # sockets close with the process


if __name__ == "__main__":
    sys.exit(main())
