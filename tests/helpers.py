"""Test helpers: servers in-process and as real processes, a raw WebSocket peer.

All waits are bounded by multiples of UNIT seconds (WSE_TEST_UNIT scales them
on slow machines).
"""
from __future__ import annotations

import base64
import contextlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
from typing import Any, Iterator, List, Optional

import gevent
from gevent import socket as gsocket

from wse_sync.core.children import python_cmd
from wse_sync.core.frames import OP_TEXT, FrameReader, build_close, build_frame
from wse_sync.wsgi import make_wsgi_server

UNIT = float(os.environ.get("WSE_TEST_UNIT", "1.0"))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APPS = os.path.join(ROOT, "tests", "apps")


def wait_for(predicate, timeout: float = 5 * UNIT, interval: float = 0.01) -> Any:
    """Poll ``predicate`` (cooperatively) until truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        gevent.sleep(interval)


@contextlib.contextmanager
def inproc_server(server, path: str = "/") -> Iterator[str]:
    """Serve ``server`` (a WseServer or WSGI app) in this process; yields ws://... url."""
    http = make_wsgi_server(server, ("127.0.0.1", 0))
    http.start()
    try:
        yield f"ws://127.0.0.1:{http.server_port}{path}"
    finally:
        shutdown = getattr(server, "shutdown", None)
        if shutdown is not None:
            shutdown(1001, "", timeout=2)
        http.stop(timeout=2)


class ServerProcess:
    """A ``wse-sync serve`` run: stderr is collected line by line."""

    def __init__(self, args: List[str], env: Optional[dict] = None) -> None:
        self.lines: List[str] = []
        # (the package this test imports, not the checkout's as python -m would
        # take from the working directory: under tox, the build under test)
        self.proc = subprocess.Popen(
            python_cmd(*args), stderr=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env or os.environ.copy())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_line(self, pattern: str, count: int = 1, timeout: float = 20 * UNIT) -> List[str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = [line for line in list(self.lines) if rx.search(line)]
            if len(found) >= count:
                return found
            if self.proc.poll() is not None and not self._reader.is_alive():
                raise AssertionError("server exited:\n" + "\n".join(self.lines))
            if time.monotonic() > deadline:
                raise AssertionError(f"no {count} line(s) matching {pattern!r}:\n"
                                     + "\n".join(self.lines))
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20 * UNIT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._reader.join(5)

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_process(app: str, workers: int = 1, extra: Optional[List[str]] = None
                  ) -> Iterator[ServerProcess]:
    """Run ``wse-sync serve app`` on a free port until the workers serve."""
    port = free_port()
    sp = ServerProcess(["serve", app, "--host", "127.0.0.1", "--port", str(port),
                        "--workers", str(workers), *(extra or [])])
    sp.port = port
    sp.url = f"ws://127.0.0.1:{port}/"
    try:
        sp.wait_line(r"worker \d+ serving", count=workers)
        yield sp
    finally:
        sp.stop()


class RawWS:
    """A WebSocket peer that sends exactly the frames a test asks for."""

    def __init__(self, url: str, protocol: Optional[str] = "wse-default-json",
                 headers: Optional[dict] = None, source: Optional[str] = None) -> None:
        m = re.match(r"ws://([^:/]+):(\d+)(/.*)?", url)
        host, port, path = m.group(1), int(m.group(2)), m.group(3) or "/"
        self.sock = gsocket.create_connection((host, port), timeout=10 * UNIT,
                                              source_address=(source, 0) if source else None)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Upgrade: websocket",
                 "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
        if protocol:
            lines.append(f"Sec-WebSocket-Protocol: {protocol}")
        for k, v in (headers or {}).items():
            lines.append(f"{k}: {v}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        self.response_head = head.decode("latin-1")
        self.status = int(self.response_head.split(" ")[1]) if self.response_head else 0
        self.reader = FrameReader(None, expect_mask=False)
        self.events: List[tuple] = []
        self._rest = rest
        # an HTTP answer's body (what came with the head), when not upgraded
        self.body = rest.decode("utf-8", "replace") if self.status != 101 else ""
        if rest and self.status == 101:  # else: an HTTP body, not frames
            self.events += self.reader.feed(rest)

    def send_text(self, text: str) -> None:
        self.sock.sendall(build_frame(OP_TEXT, text.encode(), mask=True))

    def send_frame(self, opcode: int, payload: bytes) -> None:
        self.sock.sendall(build_frame(opcode, payload, mask=True))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self, code: int = 1000, reason: str = "") -> None:
        self.sock.sendall(build_close(code, reason, mask=True))

    def recv(self, timeout: float = 5 * UNIT) -> tuple:
        """The next event: ("text", str), ("close", code, reason), ("eof",)."""
        deadline = time.monotonic() + timeout
        while not self.events:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("no frame in time")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                return ("eof",)
            self.events += self.reader.feed(data)
        return self.events.pop(0)

    def recv_until_close(self, timeout: float = 5 * UNIT) -> tuple:
        """Skip messages until the close frame (or EOF); returns it."""
        while True:
            ev = self.recv(timeout)
            if ev[0] in ("close", "eof"):
                return ev

    def shutdown(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def broker_stats(endpoint: str, timeout: float = 5 * UNIT) -> Optional[dict]:
    """``wse-sync stats`` as a dict, or None when the broker does not answer."""
    import json
    out = subprocess.run([*python_cmd("stats", "--broker", endpoint),
                          "--timeout", str(timeout)], capture_output=True, text=True,
                         timeout=timeout + 10)
    return json.loads(out.stdout) if out.returncode == 0 else None


def broker_of(sp: "ServerProcess") -> tuple:
    """(pid, endpoint) of the newest broker a ``serve`` process started."""
    line = sp.wait_line(r"broker started \(pid \d+\) on")[-1]
    m = re.search(r"pid (\d+)\) on (\S+)", line)
    return int(m.group(1)), m.group(2)


def worker_pid(sp: "ServerProcess") -> int:
    """The pid of the newest worker a ``serve`` process reported serving."""
    line = sp.wait_line(r"worker \d+ serving")[-1]
    return int(re.search(r"worker (\d+) serving", line).group(1))


@contextlib.contextmanager
def serve_cluster(app: str, n: int = 2, extra: Optional[List[str]] = None
                  ) -> Iterator[List[ServerProcess]]:
    """``n`` single-worker ``wse-sync serve`` processes, each on its own port,
    joined by one broker: the first serve's own (its supervisor restarts it if
    it dies), which the others attach to with ``--broker``.

    A connection to ``sps[i].url`` lands on worker ``sps[i].worker_pid``, so a
    test knows where each user is without hoping the kernel spreads
    connections over a shared port. ``sps[0].broker_pid`` / ``.broker`` are
    the broker's pid and endpoint. The attached serves stop first, the
    broker's serve last."""
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(serve_process(app, 1, extra))
        first.broker_pid, first.broker = broker_of(first)
        sps = [first]
        for _ in range(n - 1):
            sps.append(stack.enter_context(
                serve_process(app, 1, [*(extra or []), "--broker", first.broker])))
        for sp in sps:
            sp.worker_pid = worker_pid(sp)
        yield sps


def _listening_inodes(port: int) -> set:
    """Inodes of the TCP sockets listening on ``port`` (IPv4 and IPv6)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                inodes.add(fields[9])
    return inodes


def listening_workers(port: int) -> List[int]:
    """The worker processes of a shared listening socket on ``port``: the
    processes holding it whose parent holds it too (the supervisor or the
    gunicorn master binds it, its children inherit it)."""
    targets = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    holders = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
            held = any(os.readlink(f"/proc/{entry}/fd/{fd}") in targets for fd in fds)
            if held:
                with open(f"/proc/{entry}/stat") as f:
                    holders[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:  # gone, or not ours
            continue
    return sorted(pid for pid, ppid in holders.items() if ppid in holders)


def _stopped(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except OSError:
        return True  # gone: it accepts nothing either


def workers_of(url: str, workers: int = 2) -> List[int]:
    """The pids of the ``workers`` worker processes sharing the port of ``url``
    (``listening_workers``), once that many hold it."""
    port = int(re.match(r"wss?://[^:/]+:(\d+)", url).group(1))
    found: List[int] = []

    def enough() -> bool:
        found[:] = listening_workers(port)
        return len(found) == workers

    try:
        wait_for(enough, timeout=10 * UNIT, interval=0.05)
    except AssertionError:
        raise AssertionError(f"expected {workers} worker processes sharing port {port},"
                             f" found {found}") from None
    return list(found)


@contextlib.contextmanager
def only_worker(target: int, pids: List[int]) -> Iterator[None]:
    """Within the block only worker ``target`` of ``pids`` runs: the others are
    stopped (SIGSTOP) so that a connection made to their shared port can only
    be accepted by ``target``; they continue (SIGCONT) at the end. Keep the
    block short (handshakes): a stopped worker sends no heartbeat, and the
    broker declares it dead after 3 s."""
    others = [p for p in pids if p != target]
    try:
        for p in others:
            os.kill(p, signal.SIGSTOP)
        wait_for(lambda: all(_stopped(p) for p in others), timeout=5 * UNIT)
        yield
    finally:
        for p in others:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGCONT)


def spread_clients(url: str, workers: int, per_worker: int, prefix: str = "u",
                   pids: Optional[List[int]] = None, **client_kw) -> dict:
    """``per_worker`` clients (identities prefix+n) on each of the ``workers``
    worker processes sharing the port of ``url``; returns {pid: [client, ...]}.

    Placement does not depend on how the kernel hands out connections on a
    shared socket: each worker in turn is the only one running
    (``only_worker``) while its clients connect. The workers are ``pids``,
    else the processes holding the listening socket (``workers_of``). The
    app's welcome must carry ``{"pid": os.getpid()}``, which is checked."""
    from wse_sync import WseClient
    if pids is None:
        pids = workers_of(url, workers)
    by_pid: dict = {}
    n = 0
    for target in pids:
        with only_worker(target, pids):
            for _ in range(per_worker):
                c = WseClient(url, **client_kw)
                welcome = c.connect(f"{prefix}{n}")
                n += 1
                if welcome.get("pid") != target:
                    raise AssertionError(f"worker {target} was the only one running, but"
                                         f" {welcome.get('pid')} welcomed {prefix}{n - 1}:"
                                         f" the workers of {url} are not {pids}")
                by_pid.setdefault(target, []).append(c)
    return by_pid
