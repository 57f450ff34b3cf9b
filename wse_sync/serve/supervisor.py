"""The supervisor: one listening socket, a broker process, N worker processes.

Signal handlers only record the signal; the main loop acts on it:
SIGTERM/SIGINT stop everything gracefully (workers close their connections
with 1012, then the broker stops), SIGHUP replaces the workers one at a time.
A worker or broker that dies is restarted (the broker by a
``broker_keeper.BrokerKeeper``).
"""
from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any, Dict, List, Optional

from . import runfile
from ..core.children import python_cmd
from .broker_keeper import BrokerKeeper
from .reload import Watcher
from .worker import probe_app

__all__ = ["Supervisor"]

log = logging.getLogger("wse_sync.supervisor")


class Supervisor:
    def __init__(self, app: str, host: str, port: int, workers: int,
                 broker: Optional[str] = None, options: Optional[dict] = None,
                 grace: float = 10.0, log_level: str = "info",
                 log_args: Optional[List[str]] = None,
                 reload_dirs: Optional[List[str]] = None,
                 runinfo: Optional[Dict[str, Any]] = None) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.n_workers = max(1, workers)
        self.external_broker = broker
        self.options = options or {}
        self.grace = grace
        self.log_level = log_level
        # the logging flags every child gets (--log-level, --log-format, --log-config)
        self.log_args = log_args or ["--log-level", log_level]
        self.reload_dirs = reload_dirs
        # what runfile records for `wse-sync stats` (the broker endpoint is added)
        self.runinfo = dict(runinfo or {})
        self._runfile: Optional[str] = None
        self.signals: List[int] = []
        self.workers: Dict[int, subprocess.Popen] = {}
        # our own broker (none with an external one), restarted when it dies
        self.broker_keeper: Optional[BrokerKeeper] = None
        self._tmpdir: Optional[str] = None
        self.sock: Optional[socket.socket] = None
        self.broker_endpoint = broker or ""
        self._started_at: Dict[int, float] = {}
        # workers that died soon after starting, in a row
        self._quick_deaths = 0

    # -- processes --------------------------------------------------------------
    def _listen(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(2048)
        sock.set_inheritable(True)
        return sock

    def _start_worker(self, wait_ready: float = 0) -> subprocess.Popen:
        """Start a worker; with ``wait_ready``, wait that long for it to serve."""
        fd = self.sock.fileno()
        ready_r, ready_w = os.pipe()
        # children get their own session: a terminal's Ctrl-C reaches only the
        # supervisor, which then stops workers first and the broker last
        proc = subprocess.Popen(
            python_cmd("_worker", self.app, "--fd", str(fd), "--broker", self.broker_endpoint,
                        "--options", json.dumps(self.options), "--grace", str(self.grace),
                        *self.log_args, "--ready-fd", str(ready_w)),
            pass_fds=(fd, ready_w), start_new_session=True)
        os.close(ready_w)
        self.workers[proc.pid] = proc
        self._started_at[proc.pid] = time.monotonic()
        log.info("worker started (pid %d)", proc.pid)
        if wait_ready:
            ready, _, _ = select.select([ready_r], [], [], wait_ready)
            if not ready or not os.read(ready_r, 1):
                log.error("worker (pid %d) did not become ready in %.0fs", proc.pid, wait_ready)
        os.close(ready_r)
        return proc

    def _stop_proc(self, proc: subprocess.Popen, timeout: float) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("pid %d did not stop in %.0fs: killing it", proc.pid, timeout)
                proc.kill()
                proc.wait()

    # -- main loop ----------------------------------------------------------------
    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda s, f: self.signals.append(s))
        self.sock = self._listen()
        self.port = self.sock.getsockname()[1]
        if not self.external_broker:
            self._tmpdir = tempfile.mkdtemp(prefix="wse-sync-")
            self.broker_endpoint = f"ipc://{self._tmpdir}/broker.sock"
            self.broker_keeper = BrokerKeeper(self.broker_endpoint, self.log_args, log,
                                              new_session=True)
            self.broker_keeper.start()
        for _ in range(self.n_workers):
            self._start_worker()
        log.info("wse-sync serving %s on %s:%d with %d worker(s)",
                 self.app, self.host, self.port, self.n_workers)
        self._runfile = runfile.write(dict(self.runinfo, host=self.host, port=self.port,
                                           app=self.app, broker=self.broker_endpoint))
        watcher = None
        if self.reload_dirs:
            watcher = Watcher(self.reload_dirs)
            log.info("--reload: watching *.py under %s", ", ".join(watcher.dirs))
        next_scan = time.monotonic()
        try:
            while True:
                if watcher is not None and time.monotonic() >= next_scan:
                    next_scan = time.monotonic() + 0.5
                    changed = watcher.changed()
                    if changed:
                        self._reload(changed)
                while self.signals:
                    sig = self.signals.pop(0)
                    if sig == signal.SIGHUP:
                        self._roll()
                    elif sig == -1:
                        self._shutdown(signal.SIGTERM)
                        return 1
                    else:
                        return self._shutdown(sig)
                self._reap()
                time.sleep(0.1)
        finally:
            runfile.remove(self._runfile)
            if self._tmpdir:
                shutil.rmtree(self._tmpdir, ignore_errors=True)

    def _reload(self, changed: List[str]) -> None:
        """--reload: replace the workers, unless the changed app does not import."""
        shown = ", ".join(os.path.relpath(p) for p in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        error = probe_app(self.app)[1]
        if error:
            log.error("--reload: %s%s changed, but the app does not load: %s (the workers"
                      " keep the old code)", shown, more, error)
            return
        log.info("--reload: %s%s changed", shown, more)
        self._roll()

    def _reap(self) -> None:
        if self.broker_keeper is not None:
            self.broker_keeper.check()
        for pid, proc in list(self.workers.items()):
            if proc.poll() is not None:
                del self.workers[pid]
                lived = time.monotonic() - self._started_at.pop(pid, 0.0)
                self._quick_deaths = self._quick_deaths + 1 if lived < 5 else 0
                if self._quick_deaths >= 5:
                    log.error("workers keep dying at start (last exit code %s): giving up",
                              proc.returncode)
                    self.signals.append(-1)
                    return
                log.error("worker (pid %d) exited with %s: starting a replacement",
                          pid, proc.returncode)
                self._start_worker()

    def _roll(self) -> None:
        """Every new worker first (the old ones close nothing until then), then
        the old ones stop accepting (SIGUSR2) and stop one at a time, each
        closing its connections over stop_spread: a client reconnects once,
        to a new worker, never to an old one about to close it again."""
        old = list(self.workers.items())
        log.info("SIGHUP: starting %d new worker(s), then stopping the old ones one at a time",
                 len(old))
        for _ in old:
            self._start_worker(wait_ready=30)
        for _pid, proc in old:
            if proc.poll() is None:
                proc.send_signal(signal.SIGUSR2)
        for pid, proc in old:
            self.workers.pop(pid, None)
            self._stop_proc(proc, self.grace + 5)
        log.info("rolling restart done")

    def _shutdown(self, sig: int) -> int:
        log.info("%s: stopping %d worker(s)", signal.Signals(sig).name, len(self.workers))
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace + 5
        for proc in self.workers.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.workers.clear()
        self.sock.close()
        if self.broker_keeper is not None:
            self.broker_keeper.stop(5)
        log.info("wse-sync stopped")
        return 0
