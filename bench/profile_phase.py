"""Profile one worker of wse_sync (or the bare gevent baseline) during one bench phase.

    python bench/profile_phase.py --scenario connect --conns 10000 -- py-spy record --rate 200 --format raw -o out.txt --pid {pid}
    python bench/profile_phase.py --scenario connect --conns 10000 -- strace -c -f -o out.txt -p {pid}

Starts the server as bench/run.py does (pinned to CPU 0, the generator bench/node/loadgen.js on
CPU 1), waits for the generator's window to start, runs the command given after ``--``
(``{pid}``: the worker's pid) for the window, stops it with SIGINT at the window's end, and
prints the server's CPU per operation of the window. Not a benchmark (the profiler's own
overhead is in that figure); a way to attribute the server's time.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", default="wse_sync", choices=["wse_sync", "gevent"])
    ap.add_argument("--scenario", default="connect")
    ap.add_argument("--conns", type=int, default=10000)
    ap.add_argument("--app", default=None, help="wse_sync app (default: bench/bench_app.py:server)")
    ap.add_argument("--settle", type=float, default=1.0, help="s after the window, before stopping")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    run.raise_fd_limit(args.conns)
    os.sched_setaffinity(0, {1})

    class A:  # what start_servers reads of run.py's arguments
        gevent_wsaccel = False
        peer_python = None
        asyncio_uvloop = False

    if args.app:
        server = run.Server(args.server, app=args.app)
        probe = run.Gen(server, "probe", {"timeout": 30, "expect-pids": 1}, windows=1, timeout=40)
        probe.finish()
        probe.close()
    else:
        server = run.start_servers([args.server], A)[args.server]
    opts = {"conns": args.conns, "concurrency": 200, "warmup": 0.3}
    gen = run.Gen(server, args.scenario, opts, windows=1, timeout=run.time_budget(opts, 1))
    prof = None
    try:
        gen.expect("ready")
        run.wait_all_idle([server])
        worker = server.workers()[0]
        gen.go()
        gen.expect("start")
        if cmd:
            prof = subprocess.Popen([c.replace("{pid}", str(worker)) for c in cmd])
            time.sleep(0.5)  # let the profiler attach
        t0, c0 = time.monotonic(), run.cpu_ticks(worker)
        gen.go()
        end = gen.expect("end")
        t1, c1 = time.monotonic(), run.cpu_ticks(worker)
        if prof:
            prof.send_signal(signal.SIGINT)
            prof.wait(30)
        gen.go()
        res = gen.finish()
        us = (c1 - c0) / run.CLK_TCK * 1e6 / end["ops"]
        print(f"{end['ops']} ops in {t1 - t0:.2f} s, worker {worker}: {us:.0f} us/op of worker CPU"
              f" (profiler attached), p50 {res['windows'][0].get('p50_ms')} ms", file=sys.stderr)
    finally:
        if prof and prof.poll() is None:
            prof.kill()
        gen.close()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
