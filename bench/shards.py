"""Shards in the scale harness: K broker processes, fake workers joined to all.

    PYTHONPATH=. python bench/shards.py               # K=1 then K=4, 100k users
    PYTHONPATH=. python bench/shards.py --quick       # 20k users, shorter phases

Each fake worker holds one ``LinkCore`` per shard (as ``ShardedLink`` does:
its table split by ``shard_of(cid)``, the shard named in every hello) on its
own DEALER socket, all driven by bench/scale.py's poll loop. Every broker is
a real ``python -m wse_sync broker --shard I/K`` process.

For K = 1 and K = 4 (the same users, the same offered load): W fake workers
load N users, then join new users (routed to each user's shard) for a few
seconds, then send routed ``send`` commands from one worker to users of
another (32 per ZeroMQ message). The operations in flight grow with K, so
each shard sees the queue depth the single broker saw (a broker's CPU per
operation depends on how many it finds per read). For each phase:

- **capacity**: operations per second if every shard had a core of its own,
  that is, operations done / the largest CPU seconds one shard spent on them
  (read from /proc/<pid>/stat). K=4 carrying 4× K=1 means ratio 4.0.
- **balance**: the busiest shard's share of the broker CPU (1/K is perfect).
- **wall**: what this 2-core machine delivered, harness included (K brokers
  and the harness share two cores, so the wall rate cannot grow with K here).
"""
from __future__ import annotations

import argparse
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from scale import FRAME, Fake, Harness, cpu_seconds  # noqa: E402

from wse_sync.core.shards import shard_of  # noqa: E402


class ShardedFake:
    """One fake worker joined to K shards: a Fake (LinkCore + socket) per shard."""

    def __init__(self, h: "ShardHarness", wid: str) -> None:
        k = len(h.endpoints)
        self.id = wid
        self.parts = [Fake(h.ctx, ep, wid, replica=False) for ep in h.endpoints]
        for i, part in enumerate(self.parts):
            part.core.shard = (i, k)

    def of(self, cid: Any) -> Fake:
        return self.parts[shard_of(cid, len(self.parts))]

    @property
    def joined(self) -> int:
        return sum(p.joined for p in self.parts)

    @property
    def delivered(self) -> int:
        return sum(p.delivered for p in self.parts)

    @property
    def in_flight(self) -> int:
        return sum(len(p.joins) for p in self.parts)


class ShardHarness(Harness):
    """bench/scale.py's Harness with K brokers."""

    def __init__(self, python: str, workdir: str, deadline: float, log, k: int) -> None:
        super().__init__(python, workdir, deadline, log)
        self.endpoints = [f"ipc://{workdir}/shard{i}-of-{k}.sock" for i in range(k)]
        self.procs: List[subprocess.Popen] = []
        self.pids: List[int] = []
        self.workers: List[ShardedFake] = []

    def start_brokers(self) -> None:
        k = len(self.endpoints)
        remaining = max(10, int(self.deadline - time.monotonic()))
        log = open(os.path.join(self.workdir, "brokers.log"), "ab")
        for i, ep in enumerate(self.endpoints):
            p = subprocess.Popen(
                ["timeout", "-s", "KILL", str(remaining), self.python, "-m", "wse_sync",
                 "broker", "--bind", ep, "--shard", f"{i}/{k}", "--sync-window", "0",
                 "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT)
            self.procs.append(p)
            self.pids.append(self._child_of(p.pid))

    def stop(self) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.procs:
            p.wait(10)
        super().stop()

    def add_workers(self, count: int, users: int) -> None:
        at = time.time()
        self.workers = [ShardedFake(self, f"w{i}") for i in range(count)]
        for n in range(users):
            w = self.workers[n % count]
            cid = f"u{n}"
            w.of(cid).table[f"c{n}"] = (cid, None, at)
        self.fakes = [p for w in self.workers for p in w.parts]

    def cpu(self) -> List[float]:
        return [cpu_seconds(pid) for pid in self.pids]

    def joins(self, seconds: float, window: int = 64) -> Dict[str, Any]:  # type: ignore[override]
        ids = itertools.count()
        start = sum(w.joined for w in self.workers)

        # the same depth of joins in flight at each shard whatever K (a shard's
        # CPU per join depends on how many it finds per read)
        window *= len(self.endpoints)

        def work(now: float) -> None:
            for w in self.workers:
                while w.in_flight < window:
                    n = next(ids)
                    cid = f"j{n}"
                    w.of(cid).start_join(f"jc{n}", cid, now)

        cpu0, t0 = self.cpu(), time.monotonic()
        self.pump(seconds, work=work)
        done = sum(w.joined for w in self.workers) - start
        return self._phase(done, cpu0, t0, lambda: all(not w.in_flight for w in self.workers))

    def sends(self, seconds: float, per_msg: int = 32,  # type: ignore[override]
              window: int = 4000) -> Dict[str, Any]:
        sender, target = self.workers[0], self.workers[1]
        cids = [cid for part in target.parts
                for (cid, _m, _a) in itertools.islice(part.table.values(), 1000)]
        cycle = itertools.cycle(cids)
        sent = [0]
        base = target.delivered
        window *= len(self.endpoints)

        def work(now: float) -> None:
            while sent[0] - (target.delivered - base) < window:
                for _ in range(per_msg):
                    cid = next(cycle)
                    part = sender.of(cid)
                    part.queue(part.core.command("send", {"cid": cid}, FRAME, now))
                sent[0] += per_msg
                for part in sender.parts:
                    part.flush()

        cpu0, t0 = self.cpu(), time.monotonic()
        self.pump(seconds, work=work)
        done = target.delivered - base
        return self._phase(done, cpu0, t0, lambda: target.delivered - base >= sent[0])

    def _phase(self, done: int, cpu0: List[float], t0: float, drained) -> Dict[str, Any]:
        elapsed = time.monotonic() - t0
        used = [b - a for a, b in zip(cpu0, self.cpu())]
        self.pump(10, drained)
        busiest = max(used) or 1e-9
        return {"done": done, "wall": done / elapsed, "capacity": done / busiest,
                "cpu_us": 1e6 * sum(used) / max(1, done),
                "balance": busiest / (sum(used) or 1e-9)}


def run(k: int, args, python: str, log) -> Dict[str, Any]:
    workdir = tempfile.mkdtemp(prefix=f"wse-shards{k}-")
    h = ShardHarness(python, workdir, time.monotonic() + args.time_limit, log, k)
    try:
        h.start_brokers()
        h.add_workers(args.workers, args.users)
        for f in h.fakes:
            f.hello()
        if h.wait_synced(h.fakes, {}, 60) is None:
            raise SystemExit(f"K={k}: the workers never had their snapshots")
        row: Dict[str, Any] = {"k": k}
        row["joins"] = h.joins(args.phase_seconds)
        log(f"K={k}: joins {row['joins']}")
        row["sends"] = h.sends(args.phase_seconds)
        log(f"K={k}: sends {row['sends']}")
        return row
    finally:
        h.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="20k users, 2 s phases")
    p.add_argument("--users", type=int, default=None, help="users held (default 100k)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--shards", default="1,4", help="the K to compare, the first is the base")
    p.add_argument("--phase-seconds", type=float, default=None)
    p.add_argument("--time-limit", type=float, default=600.0, help="seconds for each K")
    args = p.parse_args()
    args.users = args.users or (20000 if args.quick else 100000)
    args.phase_seconds = args.phase_seconds or (2.0 if args.quick else 4.0)
    import logging
    logging.getLogger("wse_sync").setLevel(logging.CRITICAL)
    rows = [run(int(k), args, sys.executable, lambda s: print("#", s, flush=True))
            for k in args.shards.split(",")]
    base = rows[0]
    print(f"\n{args.users:,} users, W={args.workers} fake workers\n")
    print("| K | joins: capacity/s | × K=%d | balance | µs/join | wall/s "
          "| sends: capacity/s | × K=%d | balance | µs/send | wall/s |" % (base["k"], base["k"]))
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [str(r["k"])]
        for phase in ("joins", "sends"):
            m, b = r[phase], base[phase]
            cells += [f"{m['capacity']:,.0f}", f"{m['capacity'] / b['capacity']:.2f}",
                      f"{m['balance']:.2f}", f"{m['cpu_us']:.1f}", f"{m['wall']:,.0f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
