"""Keep one broker running: ``python -m wse_sync.serve.broker_keeper --bind ENDPOINT``.

Runs ``python -m wse_sync broker --bind ENDPOINT`` as its child and starts it
again when it dies (with the 2.5 s sync window of a restarted broker, so the
map is rebuilt from the workers' tables). Stops the broker and exits on
SIGTERM/SIGINT, or when ``--parent`` (the process that started it, e.g.
gunicorn's master) is gone. Gives up (exit 1) when the broker keeps dying at
start, e.g. because the endpoint is taken.

Used by ``wse_sync.gunicorn_conf``; handy under any process manager that
does not restart children itself.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from typing import List, Optional

__all__ = ["main"]

log = logging.getLogger("wse_sync.serve.broker_keeper")


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
    fresh = True
    quick_deaths = 0
    while not stop:
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "wse_sync", "broker", "--bind", args.bind,
             "--parent", str(os.getpid()), "--log-level", args.log_level,
             "--sync-window", "0" if fresh else "2.5"])
        log.info("broker started (pid %d) on %s", proc.pid, args.bind)
        fresh = False
        while proc.poll() is None and not stop:
            if args.parent and os.getppid() != args.parent:
                log.warning("process %d is gone: stopping the broker", args.parent)
                stop.append(signal.SIGTERM)
                break
            time.sleep(0.2)
        if stop:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            break
        quick_deaths = quick_deaths + 1 if time.monotonic() - started < 5 else 0
        if quick_deaths >= 5:
            log.error("the broker keeps dying at start (exit code %s): giving up", proc.returncode)
            return 1
        log.error("broker (pid %d) exited with %s: restarting it", proc.pid, proc.returncode)
        time.sleep(0.2 * quick_deaths)
    log.info("broker keeper stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
