"""What one worker counts, and the report of it that the broker keeps (pure code).

Each worker counts into a ``WorkerMetrics``: monotonic counters by name, an
RPC latency histogram and a few gauges read when a report is made. What is
counted per message goes to ``tally``, plain integer slots (an increment
there costs a sixth of a ``Counter``'s), merged into the counters only when
a report is made. Every few
seconds it sends ``report()`` to the broker with a ``stats`` request; the
broker keeps the last report of each worker and hands all of them out with
its map figures, so any worker can show the whole cluster (``cluster_figures``).

``FIGURES`` is the one table of what a worker reports: each counter and
gauge with its kind and the help line /metrics gives it. Besides those,
``refused.<limit>`` counts every limit hit (one /metrics family, labelled
by limit).
"""
from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple

__all__ = ["BUCKETS", "Figure", "FIGURES", "COUNTER", "GAUGE", "COUNTERS", "REFUSED",
           "Histogram", "Tally", "WorkerMetrics", "WorkerReport", "ClusterFigures", "cluster_figures",
           "MAX_REPORT_KEYS"]

# RPC latency buckets in seconds (upper bounds; one more bucket is +Inf)
BUCKETS: Tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                              0.5, 1.0, 2.5, 5.0, 10.0)

COUNTER = "counter"   # monotonic, counted as things happen
GAUGE = "gauge"       # read when a report is made


class Figure(NamedTuple):
    """One figure of a worker's report, and its /metrics family (labelled by worker)."""
    name: str             # its key in the report's "counters" or "gauges"
    kind: str             # COUNTER or GAUGE
    help: str             # the HELP line on /metrics
    exposed_as: str = ""  # the family's name when it is not "wse_<name>"

    @property
    def metric(self) -> str:
        """The /metrics family name."""
        return self.exposed_as or "wse_" + self.name


# every figure a worker reports, in /metrics order
FIGURES: Tuple[Figure, ...] = (
    Figure("connections", GAUGE, "WebSocket connections per worker, in any state",
           "wse_sockets"),
    Figure("unauthenticated", GAUGE, "connections upgraded and not yet welcomed"),
    Figure("send_queue_bytes", GAUGE, "bytes waiting in the send queues of slow clients"),
    Figure("broker_outbox", GAUGE, "cross-worker commands the broker has not acknowledged"),
    Figure("rpc_running", GAUGE, "RPC handlers running now"),
    Figure("broker_rtt_seconds", GAUGE, "the last round trip to the broker, seconds"),
    Figure("messages_in", COUNTER, "WebSocket messages received from clients"),
    Figure("messages_out", COUNTER, "WebSocket messages queued to clients"),
    Figure("rpc_calls", COUNTER, "RPC calls from clients handled"),
    Figure("rpc_errors", COUNTER, "RPC calls from clients answered with an error"),
    Figure("handshakes", COUNTER,
           "connections welcomed (identify accepted and the broker joined)"),
    Figure("auth_refused", COUNTER, "logins refused (identify or challenge said no, or raised)"),
    Figure("resends", COUNTER,
           "cross-worker commands sent again to a broker that had lost them"),
)

# the counters of the table (a report keeps them first when it has too many)
COUNTERS: Tuple[str, ...] = tuple(f.name for f in FIGURES if f.kind == COUNTER)

# the prefix of the counters of limit hits: "refused.<limit>"
REFUSED = "refused."

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


class Tally:
    """The counters bumped per message (``tally.messages_in += 1``): each
    slot is a counter of ``FIGURES`` by the same name."""

    __slots__ = ("messages_in", "messages_out", "rpc_calls", "rpc_errors")

    def __init__(self) -> None:
        self.messages_in = self.messages_out = self.rpc_calls = self.rpc_errors = 0

    def items(self) -> List[Tuple[str, int]]:
        return [(name, getattr(self, name)) for name in self.__slots__]


class WorkerMetrics:
    """One worker's counters (``counters[name] += 1``, per-message ones
    ``tally.name += 1``) and RPC latencies."""

    def __init__(self) -> None:
        self.counters: "Counter[str]" = Counter()
        self.tally = Tally()
        self.rpc_seconds = Histogram()

    def counted(self) -> Dict[str, int]:
        """Every counter that is not zero, the tally's included."""
        counters = {k: v for k, v in self.counters.items() if v}
        counters.update((k, v) for k, v in self.tally.items() if v)
        return counters

    def report(self, gauges: Mapping[str, float]) -> Dict[str, Any]:
        """The body the broker keeps for this worker (JSON-ready)."""
        counters = self.counted()
        if len(counters) > MAX_REPORT_KEYS:  # keep the named ones, then the first others
            named = {k: counters[k] for k in COUNTERS if k in counters}
            rest = [k for k in counters if k not in named]
            named.update((k, counters[k]) for k in rest[:MAX_REPORT_KEYS - len(named)])
            counters = named
        return {"counters": counters, "gauges": {k: float(v) for k, v in gauges.items()},
                "rpc": self.rpc_seconds.snapshot()}


class WorkerReport(NamedTuple):
    """One worker's row of the cluster's figures."""
    worker: str
    pid: int
    connections: int           # in the broker's map (welcomed connections)
    counters: Dict[str, float]
    gauges: Dict[str, float]
    rpc_counts: List[int]      # per bucket, not cumulative
    rpc_sum: float
    fresh: bool                # this worker's own row: its gauges live


class ClusterFigures(NamedTuple):
    """The cluster's figures as one worker sees them (what /metrics shows)."""
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


def cluster_figures(stats: Optional[Mapping[str, Any]], me: str,
                    mine: Mapping[str, Any]) -> ClusterFigures:
    """Merge the broker's ``stats`` answer (None: no broker: ``mine`` alone)
    with this worker's live report ``mine``.

    Every worker's counters and RPC histogram come from its last report to
    the broker (none yet: zeros), this worker's too: whichever worker a
    scrape lands on, a counter never reads lower than it did before (a live
    value here and an older report there would look like a reset to
    Prometheus). Only this worker's gauges are live. Clients of the cluster
    (``connect_cluster`` handles) are left out."""
    rows: List[WorkerReport] = []
    if stats is None:
        counters, gauges, counts, total = _report_parts(mine)
        rows.append(WorkerReport(me, 0, int(gauges.get("connections", 0)), counters, gauges,
                                 counts, total, True))
        return ClusterFigures(0, 0, rows, {})
    reports = stats.get("reports") or {}
    for worker, info in sorted((stats.get("workers") or {}).items()):
        if info.get("role", "worker") != "worker" or not info.get("serves", True):
            continue
        own = worker == me
        counters, gauges, counts, total = _report_parts(reports.get(worker))
        if own:
            gauges = _report_parts(mine)[1]
        rows.append(WorkerReport(worker, int(info.get("pid", 0)),
                                 int(info.get("connections", 0)), counters, gauges, counts,
                                 total, own))
    if all(r.worker != me for r in rows):  # not (yet) in the broker's list
        counters, _, counts, total = _report_parts(reports.get(me))
        rows.append(WorkerReport(me, 0, 0, counters, _report_parts(mine)[1], counts, total,
                                 True))
    return ClusterFigures(int(stats.get("users", 0)), int(stats.get("connections", 0)), rows,
                          dict(stats.get("counters") or {}))
