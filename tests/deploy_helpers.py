"""Helpers for the embedding, deployment and example tests: any command as a
real process with its output collected line by line, gunicorn runs, HTTP
requests, and a headless Chromium for the browser test."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, Iterator, List, Optional

from gevent import socket as gsocket

from helpers import ROOT, UNIT, free_port

BIN = os.path.dirname(sys.executable)


def tool(name: str) -> str:
    """A console script of this interpreter's environment (gunicorn, supervisord...)."""
    path = os.path.join(BIN, name)
    if os.path.exists(path):
        return path
    found = shutil.which(name)
    if not found:
        raise AssertionError(f"{name} is not installed (pip install '.[test]')")
    return found


def child_env(**extra: str) -> Dict[str, str]:
    env = os.environ.copy()
    env.pop("WSE_SYNC_BROKER", None)
    env.pop("WSE_SYNC_BROKER_BIND", None)
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Proc:
    """A process whose stdout and stderr are collected (merged) line by line."""

    def __init__(self, args: List[str], env: Optional[dict] = None, cwd: str = ROOT) -> None:
        self.args = args
        self.lines: List[str] = []
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, cwd=cwd, env=env or child_env(),
                                     start_new_session=True)
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_line(self, pattern: str, count: int = 1, timeout: float = 30 * UNIT) -> List[str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = [line for line in list(self.lines) if rx.search(line)]
            if len(found) >= count:
                return found
            if self.proc.poll() is not None and not self._reader.is_alive():
                raise AssertionError(f"{self.args[:3]} exited ({self.proc.returncode}) before"
                                     f" {pattern!r}:\n{self.output}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {count} line(s) matching {pattern!r}:\n{self.output}")
            time.sleep(0.02)

    def wait(self, timeout: float = 30 * UNIT) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.args[:3]} still running:\n{self.output}") from None
        self._reader.join(5)
        return rc

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30 * UNIT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()
            self._reader.join(5)

    def kill(self) -> None:
        """Kill what is left of the process group (cleanup after a failed test)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pid: int, timeout: float = 15 * UNIT) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} still running")
        time.sleep(0.05)


@contextlib.contextmanager
def gunicorn(app: str, *args: str, workers: int = 2, conf: Optional[str] = "python:wse_sync.gunicorn_conf",
             env: Optional[dict] = None, wait_workers: bool = True, chdir: Optional[str] = None
             ) -> Iterator[Proc]:
    """gunicorn serving ``app`` on a free port until the workers joined the broker.

    HOME points to a temporary folder so that gunicorn's control socket
    (~/.gunicorn) does not collide with another run."""
    port = free_port()
    home = tempfile.mkdtemp(prefix="wse-gunicorn-home-")
    cmd = [tool("gunicorn")]
    if conf:
        cmd += ["-c", conf]
    cmd += ["-w", str(workers), "-b", f"127.0.0.1:{port}", "--graceful-timeout", "10"]
    if chdir:
        cmd += ["--chdir", chdir]
    cmd += [*args, app]
    p = Proc(cmd, env=env or child_env(HOME=home))
    p.port = port
    p.url = f"ws://127.0.0.1:{port}/ws"
    try:
        if wait_workers:
            p.wait_line(r"wse_sync: worker \d+ serves", count=workers)
        yield p
    finally:
        p.stop()
        shutil.rmtree(home, ignore_errors=True)


def http(port: int, method: str, path: str, body: bytes = b"", headers: Optional[dict] = None,
         timeout: float = 10 * UNIT, source: str = "127.0.0.1"):
    """One HTTP/1.1 request; returns (status, headers {lower: [values]}, body, raw chunks)."""
    sock = gsocket.create_connection(("127.0.0.1", port), timeout=timeout,
                                     source_address=(source, 0))
    try:
        lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
        if body or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body)}")
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    hdrs: Dict[str, List[str]] = {}
    for line in header_lines:
        k, _, v = line.partition(":")
        hdrs.setdefault(k.strip().lower(), []).append(v.strip())
    chunks: List[bytes] = []
    if hdrs.get("transfer-encoding") == ["chunked"]:
        out = b""
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            chunks.append(rest[:size])
            out, rest = out + rest[:size], rest[size + 2:]
        rest = out
    return int(status_line.split(" ")[1]), hdrs, rest, chunks


def upgrade_request(port: int, path: str = "/ws", protocol: str = "wse-default-json"):
    """A WebSocket upgrade request; returns (status, headers, body) of the answer."""
    import base64
    headers = {"Upgrade": "websocket", "Connection": "Upgrade",
               "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
               "Sec-WebSocket-Version": "13", "Sec-WebSocket-Protocol": protocol}
    sock = gsocket.create_connection(("127.0.0.1", port), timeout=10 * UNIT)
    try:
        lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ")[1])
        hdrs = {}
        for line in head.decode("latin-1").split("\r\n")[1:]:
            k, _, v = line.partition(":")
            hdrs[k.strip().lower()] = v.strip()
        if status != 101:
            length = int(hdrs.get("content-length", "0") or 0)
            while len(rest) < length:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                rest += chunk
        return status, hdrs, rest
    finally:
        sock.close()


def python(*args: str) -> List[str]:
    return [sys.executable, *args]
