"""App for bench/churn.py (and tests/processes/test_churn.py).

- Every ``joined`` and ``left`` is appended, one line each, to a file of its
  own per worker process: ``$WSE_CHURN_LOG.<pid>`` (one ``os.write`` per line
  on an O_APPEND descriptor, so a line is on disk the moment the handler ran,
  even if the worker is killed -9 right after).
- ``identify`` accepts every identity; one starting with ``slow:`` is decided
  after ``$WSE_CHURN_SLOW_IDENTIFY`` seconds (0.3), so a client can hang up
  before its welcome.
- RPC ``slow`` answers after ``payload`` seconds (a client hangs up meanwhile).
- RPC ``flood`` ``{"count", "size", "burst"}`` sends ``count`` messages of
  ``size`` bytes to the caller, yielding to the other greenlets every
  ``burst`` messages (so the writer greenlet is waiting on the socket when the
  queue overflows), and stops when a send says the connection is gone;
  ``"group": TAG`` floods every local connection of users ``TAG...`` at once.
- RPC ``stats`` ``{"collect": bool}``: this worker's figures for the harness:
  fds, greenlets (and how many of them wait parked in wse_sync's bounded pool
  of handler greenlets), ``gc.garbage``, the automatic GC's counters and, only when
  asked, what a ``gc.collect()`` finds (with the types of that garbage).
"""
import gc
import os
import time
from collections import Counter

import gevent
import greenlet

from wse_sync import WseServer
from wse_sync.socket import runner

LOG_PREFIX = os.environ.get("WSE_CHURN_LOG", "")
SLOW_IDENTIFY = float(os.environ.get("WSE_CHURN_SLOW_IDENTIFY", "0.3"))

_log_fd = None
_log_pid = None


def _log(line: str) -> None:
    global _log_fd, _log_pid
    if not LOG_PREFIX:
        return
    if _log_pid != os.getpid():  # (opened in the worker, never before a fork)
        _log_fd = os.open(f"{LOG_PREFIX}.{os.getpid()}", os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                          0o644)
        _log_pid = os.getpid()
    os.write(_log_fd, (line + "\n").encode("utf-8", "replace"))


def identify(identity, meta, accept, refuse, **kwargs):
    if not identity:
        refuse()
        return
    if identity.startswith("slow:"):
        gevent.sleep(SLOW_IDENTIFY)
    accept(identity, {"pid": os.getpid()})


server = WseServer(identify=identify, conn_per_user=2)


@server.when.joined
def _joined(client, meta):
    _log(f"joined {client.cid}")


@server.when.left
def _left(client, code, reason):
    _log(f"left {client.cid} {code} {reason or '-'}")


@server.register("slow")
def _slow(conn, payload):
    gevent.sleep(float(payload or 0.5))
    return "late"


_BLOBS: dict = {}


_FLOODED_GROUPS: set = set()


@server.register("flood")
def _flood(conn, payload):
    """Flood the caller; with ``"group": TAG``, every connection of this
    worker whose user starts with TAG at once, from this one greenlet (as a
    broadcast's fan-out does: their cuts then come in one pass); a later call
    for the same TAG returns 0."""
    count = int(payload.get("count", 200))
    size = int(payload.get("size", 32768))
    burst = max(1, int(payload.get("burst", 4)))
    blob = _BLOBS.get(size)
    if blob is None:
        blob = _BLOBS[size] = "x" * size
    group = payload.get("group")
    if group is None:
        targets = [conn]
    elif group in _FLOODED_GROUPS:
        return 0
    else:
        _FLOODED_GROUPS.add(group)
        targets = [c for c in server.hub.connections() if str(c.cid).startswith(group)]
    sent = 0
    for i in range(count):
        targets = [c for c in targets if c.send("flood", blob)]
        if not targets:
            break
        sent += len(targets)
        if i % burst == burst - 1:
            gevent.sleep(0)
    return sent


def _greenlets() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, greenlet.greenlet))


@server.register("stats")
def _stats(conn, payload):
    payload = payload or {}
    out = {
        "pid": os.getpid(),
        "fds": len(os.listdir("/proc/self/fd")),
        "garbage": len(gc.garbage),
        "gc_count": list(gc.get_count()),
        # the automatic collections so far, and what they found, per generation
        "gc_runs": [s["collections"] for s in gc.get_stats()],
        "gc_found": [s["collected"] for s in gc.get_stats()],
        "connections": len(list(server.hub.connections())),
        "greenlets_before": _greenlets(),
    }
    if payload.get("collect"):
        t0 = time.perf_counter()
        before = len(gc.garbage)
        gc.set_debug(gc.DEBUG_SAVEALL)  # what it finds lands in gc.garbage: name it, then free it
        try:
            found = gc.collect()
        finally:
            gc.set_debug(0)
        kinds = Counter(type(o).__name__ for o in gc.garbage[before:])
        del gc.garbage[before:]
        gc.collect()
        out["collected"] = found
        # (the counters again: the next report's "since" starts after this collect)
        out["gc_runs_after"] = [st["collections"] for st in gc.get_stats()]
        out["gc_found_after"] = [st["collected"] for st in gc.get_stats()]
        out["collected_types"] = kinds.most_common(5)
        out["collect_ms"] = round((time.perf_counter() - t0) * 1000, 1)
    out["greenlets"] = _greenlets()
    # of which parked in wse_sync's pool of reusable handler greenlets (bounded:
    # runner.MAX_IDLE); the rest is what the baseline compares
    out["parked"] = len(runner._idle)
    if payload.get("detail"):  # what the greenlets are: type, dead or alive, what they run
        kinds = Counter()
        for o in gc.get_objects():
            if isinstance(o, greenlet.greenlet):
                run = getattr(o, "_run", None) or getattr(o, "run", None)
                name = getattr(run, "__qualname__", None)
                if name is None:  # a started plain greenlet: where it waits
                    frame = o.gr_frame
                    name = (f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:"
                            f"{frame.f_code.co_name}" if frame is not None else
                            f"main={o.parent is None}")
                state = "dead" if o.dead else "running" if o else "unstarted"
                kinds[f"{type(o).__name__}:{state}:{name}"] += 1
        out["greenlet_kinds"] = kinds.most_common(8)
    return out
