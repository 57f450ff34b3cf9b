"""Keep one broker running: ``python -m wse_sync.serve.broker_keeper --bind ENDPOINT``.

Runs ``python -m wse_sync broker --bind ENDPOINT`` as its child and starts it
again when it dies (with the sync window of a restarted broker, 2.5 s, so the
map is rebuilt from the workers' tables). Stops the broker and exits on
SIGTERM/SIGINT, or when ``--parent`` (the process that started it, e.g.
gunicorn's master) is gone. Gives up (exit 1) when the broker keeps dying at
start, e.g. because the endpoint is taken.

Used by ``wse_sync.gunicorn_conf``; handy under any process manager that
does not restart children itself. ``wse-sync serve`` keeps its own broker
with the same ``BrokerKeeper``.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from typing import List, Optional, Sequence

from ..core.broker import SYNC_WINDOW
from ..core.children import python_cmd

__all__ = ["BrokerKeeper", "main"]

log = logging.getLogger("wse_sync.serve.broker_keeper")

# a broker that dies sooner than this after its start died "at start"
QUICK_DEATH = 5.0


class BrokerKeeper:
    """One broker process, started again when it dies.

    ``start()`` starts the first broker with no sync window (a fresh
    cluster); each restart gets ``SYNC_WINDOW``, so the new broker rebuilds
    the map from the workers' tables before it routes. ``check()``, called
    in a loop, notices a dead broker and restarts it: at once and for ever
    when ``give_up_after`` is None; otherwise after 0.2 s per death at start
    in a row, giving up at ``give_up_after`` of them.
    """

    def __init__(self, bind: str, log_args: Sequence[str], logger: logging.Logger = log, *,
                 new_session: bool = False, give_up_after: Optional[int] = None) -> None:
        self.bind = bind
        # the logging flags the broker gets (--log-level, --log-format, --log-config)
        self.log_args = list(log_args)
        self.log = logger
        # its own session: a terminal's Ctrl-C reaches only the parent, which
        # stops the broker last
        self.new_session = new_session
        self.give_up_after = give_up_after
        self.proc: Optional["subprocess.Popen[bytes]"] = None
        self.gave_up = False
        self._started_at = 0.0
        self._quick_deaths = 0
        self._restart_at: Optional[float] = None

    def start(self) -> None:
        """Start the first broker (a fresh cluster: no sync window)."""
        self._start("0")

    def _start(self, window: str) -> None:
        self.proc = subprocess.Popen(
            python_cmd("broker", "--bind", self.bind, *self.log_args,
                       "--parent", str(os.getpid()), "--sync-window", window),
            start_new_session=self.new_session)
        self._started_at = time.monotonic()
        self.log.info("broker started (pid %d) on %s", self.proc.pid, self.bind)

    def check(self) -> bool:
        """Restart the broker if it died (or its backoff is over); False once given up."""
        if self.gave_up:
            return False
        now = time.monotonic()
        if self._restart_at is not None:
            if now >= self._restart_at:
                self._restart_at = None
                self._start(str(SYNC_WINDOW))
            return True
        proc = self.proc
        if proc is None or proc.poll() is None:
            return True
        if self.give_up_after is not None:
            quick = now - self._started_at < QUICK_DEATH
            self._quick_deaths = self._quick_deaths + 1 if quick else 0
            if self._quick_deaths >= self.give_up_after:
                self.log.error("the broker keeps dying at start (exit code %s): giving up",
                               proc.returncode)
                self.gave_up = True
                return False
        self.log.error("broker (pid %d) exited with %s: restarting it", proc.pid, proc.returncode)
        if self._quick_deaths:
            self._restart_at = now + 0.2 * self._quick_deaths
        else:
            self._start(str(SYNC_WINDOW))
        return True

    def stop(self, timeout: float) -> None:
        """SIGTERM the broker; kill it if it is still there after ``timeout`` seconds."""
        self._restart_at = None
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.log.warning("pid %d did not stop in %.0fs: killing it", proc.pid, timeout)
            proc.kill()
            proc.wait()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m wse_sync.serve.broker_keeper", description=__doc__)
    p.add_argument("--bind", required=True)
    p.add_argument("--parent", type=int, default=None,
                   help="exit (stopping the broker) when this process is gone")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format=f"%(asctime)s %(levelname)s [%(name)s:{os.getpid()}] %(message)s",
                        stream=sys.stderr)
    stop: List[int] = []
    signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))
    signal.signal(signal.SIGINT, lambda s, f: stop.append(s))
    keeper = BrokerKeeper(args.bind, ["--log-level", args.log_level], give_up_after=5)
    keeper.start()
    while not stop:
        if args.parent and os.getppid() != args.parent:
            log.warning("process %d is gone: stopping the broker", args.parent)
            break
        if not keeper.check():
            return 1
        time.sleep(0.2)
    keeper.stop(10)
    log.info("broker keeper stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
