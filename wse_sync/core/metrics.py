"""What one worker counts, and the report of it that the broker keeps (pure code).

Each worker counts into a ``WorkerMetrics``: monotonic counters by name, an
RPC latency histogram and a few gauges read when a report is made. Every few
seconds it sends ``report()`` to the broker with a ``stats`` request; the
broker keeps the last report of each worker and hands all of them out with
its map figures, so any worker can show the whole cluster (``cluster_view``).

Counter names (``COUNTERS``, plus ``refused.<limit>`` for every limit hit):
messages in and out, RPC calls and errors, handshakes (welcomes), auth
refusals, commands resent to a restarted broker.
"""
from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple

__all__ = ["BUCKETS", "COUNTERS", "GAUGES", "Histogram", "WorkerMetrics", "WorkerReport",
           "ClusterView", "cluster_view", "MAX_REPORT_KEYS"]

# RPC latency buckets in seconds (upper bounds; one more bucket is +Inf)
BUCKETS: Tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                              0.5, 1.0, 2.5, 5.0, 10.0)

COUNTERS = ("messages_in", "messages_out", "rpc_calls", "rpc_errors", "handshakes",
            "auth_refused", "resends")

# read when a report is made: connections in this worker (any state),
# those not yet welcomed, bytes waiting in send queues, commands the broker
# has not acked, RPC handlers running, the last broker round trip (seconds)
GAUGES = ("connections", "unauthenticated", "send_queue_bytes", "broker_outbox",
          "rpc_running", "broker_rtt_seconds")

# a report has at most this many counters (the broker refuses bigger ones)
MAX_REPORT_KEYS = 256


class Histogram:
    """Counts of observations per bucket of ``BUCKETS`` (not cumulative), and their sum."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts: List[int] = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds

    def snapshot(self) -> Dict[str, Any]:
        return {"counts": list(self.counts), "sum": self.sum}


class WorkerMetrics:
    """One worker's counters (``counters[name] += 1``) and RPC latencies."""

    def __init__(self) -> None:
        self.counters: "Counter[str]" = Counter()
        self.rpc_seconds = Histogram()

    def report(self, gauges: Mapping[str, float]) -> Dict[str, Any]:
        """The body the broker keeps for this worker (JSON-ready)."""
        counters = {k: v for k, v in self.counters.items() if v}
        if len(counters) > MAX_REPORT_KEYS:  # keep the named ones, then the first others
            named = {k: counters[k] for k in COUNTERS if k in counters}
            rest = [k for k in counters if k not in named]
            named.update((k, counters[k]) for k in rest[:MAX_REPORT_KEYS - len(named)])
            counters = named
        return {"counters": counters, "gauges": {k: float(v) for k, v in gauges.items()},
                "rpc": self.rpc_seconds.snapshot()}


class WorkerReport(NamedTuple):
    """One worker as the cluster view shows it."""
    worker: str
    pid: int
    connections: int           # in the broker's map (welcomed connections)
    counters: Dict[str, float]
    gauges: Dict[str, float]
    rpc_counts: List[int]      # per bucket, not cumulative
    rpc_sum: float
    fresh: bool                # this worker's own live figures, not its last report


class ClusterView(NamedTuple):
    users: int
    connections: int
    workers: List[WorkerReport]
    broker_counters: Dict[str, float]


def _report_parts(report: Optional[Mapping[str, Any]]) -> Tuple[Dict[str, float],
                                                                Dict[str, float],
                                                                List[int], float]:
    if not report:
        return {}, {}, [0] * (len(BUCKETS) + 1), 0.0
    rpc = report.get("rpc") or {}
    counts = list(rpc.get("counts") or [])
    counts = (counts + [0] * (len(BUCKETS) + 1))[:len(BUCKETS) + 1]
    return (dict(report.get("counters") or {}), dict(report.get("gauges") or {}), counts,
            float(rpc.get("sum") or 0.0))


def cluster_view(stats: Optional[Mapping[str, Any]], me: str,
                 mine: Mapping[str, Any]) -> ClusterView:
    """Merge the broker's ``stats`` answer (None: no broker) with this worker's
    live report ``mine``: this worker's row uses ``mine``, the others their
    last report to the broker (none yet: zeros). Clients of the cluster
    (``connect_cluster`` handles) are left out."""
    rows: List[WorkerReport] = []
    if stats is None:
        counters, gauges, counts, total = _report_parts(mine)
        rows.append(WorkerReport(me, 0, int(gauges.get("connections", 0)), counters, gauges,
                                 counts, total, True))
        return ClusterView(0, 0, rows, {})
    reports = stats.get("reports") or {}
    for worker, info in sorted((stats.get("workers") or {}).items()):
        if info.get("role", "worker") != "worker" or not info.get("serves", True):
            continue
        own = worker == me
        counters, gauges, counts, total = _report_parts(mine if own else reports.get(worker))
        rows.append(WorkerReport(worker, int(info.get("pid", 0)),
                                 int(info.get("connections", 0)), counters, gauges, counts,
                                 total, own))
    if all(r.worker != me for r in rows):  # not (yet) in the broker's list
        counters, gauges, counts, total = _report_parts(mine)
        rows.append(WorkerReport(me, 0, 0, counters, gauges, counts, total, True))
    return ClusterView(int(stats.get("users", 0)), int(stats.get("connections", 0)), rows,
                       dict(stats.get("counters") or {}))
