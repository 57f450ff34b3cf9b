"""The plain HTTP answers of a WseServer: health, metrics and the JS client.

On the server's own port, for requests that are not WebSocket upgrades:

- ``health_path`` (``/healthz``): 200 and a JSON body while this worker is
  in sync with the broker, 503 (with the reason) while it has no broker,
  is joining, or is stopping;
- ``metrics_path`` (``/metrics``): the Prometheus text format, the whole
  cluster's figures seen from this worker (one broker round trip; each other
  worker as of its last report, at most a few seconds old). Needs the
  ``prometheus-client`` package (``pip install wse_sync[metrics]``);
  without it the answer is 501 saying so;
- ``client_path`` (off unless set, e.g. ``/wse.js``): the JavaScript client
  shipped in the package.

Each option set to None turns its path off. In a ``WseMount`` beside an app,
the app answers these paths first; wse_sync answers only where the app said
404 (a mounted app's own routes are never shadowed).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Tuple

import ujson

from ..core.metrics import BUCKETS, COUNTERS, ClusterView, cluster_view

if TYPE_CHECKING:  # pragma: no cover
    from .server import WseServer

__all__ = ["answer", "paths_of", "client_file", "render_metrics", "METRICS_MISSING"]

Headers = List[Tuple[str, str]]

CLIENT_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "static", "wse.js")

METRICS_MISSING = ("/metrics needs the prometheus-client package:"
                   " pip install 'wse_sync[metrics]' (or prometheus-client)\n")

_HELP = {
    "messages_in": "WebSocket messages received from clients",
    "messages_out": "WebSocket messages queued to clients",
    "rpc_calls": "RPC calls from clients handled",
    "rpc_errors": "RPC calls from clients answered with an error",
    "handshakes": "connections welcomed (identify accepted and the broker joined)",
    "auth_refused": "logins refused (identify or challenge said no, or raised)",
    "resends": "cross-worker commands sent again to a broker that had lost them",
}

_GAUGE_HELP = {
    "unauthenticated": "connections upgraded and not yet welcomed",
    "send_queue_bytes": "bytes waiting in the send queues of slow clients",
    "broker_outbox": "cross-worker commands the broker has not acknowledged",
    "rpc_running": "RPC handlers running now",
    "broker_rtt_seconds": "the last round trip to the broker, seconds",
}


def paths_of(server: "WseServer") -> Dict[str, str]:
    """path -> what it serves ("health", "metrics", "client"), for the paths turned on."""
    options = server.options
    out: Dict[str, str] = {}
    for what in ("health", "metrics", "client"):
        path = options.get(what + "_path")
        if path:
            out[path] = what
    return out


def answer(server: "WseServer", what: str, environ: dict,
           start_response: Callable) -> Iterable[bytes]:
    """Answer a plain request for one of ``paths_of(server)``."""
    if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
        return _send(start_response, "405 Method Not Allowed", "text/plain; charset=utf-8",
                     b"GET only\n", [("Allow", "GET, HEAD")], environ)
    if what == "health":
        ok, body = server.hub.health()
        return _send(start_response, "200 OK" if ok else "503 Service Unavailable",
                     "application/json", ujson.dumps(body).encode("utf-8") + b"\n",
                     [("Cache-Control", "no-store")], environ)
    if what == "metrics":
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            return _send(start_response, "501 Not Implemented", "text/plain; charset=utf-8",
                         METRICS_MISSING.encode("utf-8"), [], environ)
        body, content_type = render_metrics(server)
        return _send(start_response, "200 OK", content_type, body,
                     [("Cache-Control", "no-store")], environ)
    data = client_file()
    return _send(start_response, "200 OK", "text/javascript; charset=utf-8", data,
                 [("Cache-Control", "public, max-age=300")], environ)


def client_file() -> bytes:
    """The JavaScript client shipped in the package."""
    with open(CLIENT_FILE, "rb") as f:
        return f.read()


def _send(start_response: Callable, status: str, content_type: str, body: bytes,
          headers: Headers, environ: dict) -> List[bytes]:
    start_response(status, [("Content-Type", content_type),
                            ("Content-Length", str(len(body)))] + headers)
    return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]


# -- Prometheus ------------------------------------------------------------------

def render_metrics(server: "WseServer") -> Tuple[bytes, str]:
    """(body, content type) of /metrics: the cluster as this worker sees it."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    hub = server.hub
    stats = None
    link = hub.link
    if link is not None and link.state in ("up", "partial"):  # partial: the shards that answer
        stats = link.stats(full=True, timeout=min(2.0, server.options["broker_timeout"]))
    view = cluster_view(stats, hub.worker_id, hub.metrics_report())
    registry = CollectorRegistry(auto_describe=False)
    shard_states = link.shard_states if link is not None else []
    registry.register(_Collector(view, stats is not None, shard_states))
    return generate_latest(registry), CONTENT_TYPE_LATEST


class _Collector:
    """prometheus_client's custom-collector protocol over one ClusterView."""

    def __init__(self, view: ClusterView, broker_answered: bool,
                 shard_states: List[str]) -> None:
        self.view = view
        self.broker_answered = broker_answered
        self.shard_states = shard_states

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)
        view = self.view
        up = GaugeMetricFamily("wse_broker_up", "1 when this worker's broker answered this scrape")
        up.add_metric([], 1.0 if self.broker_answered else 0.0)
        yield up
        g = GaugeMetricFamily("wse_broker_shard_up",
                              "1 while this worker is in sync with broker shard i (one broker:"
                              " shard 0)", labels=["shard"])
        for i, state in enumerate(self.shard_states):
            g.add_metric([str(i)], 1.0 if state == "up" else 0.0)
        yield g
        g = GaugeMetricFamily("wse_users", "users connected to the cluster (the broker's map)")
        g.add_metric([], view.users)
        yield g
        g = GaugeMetricFamily("wse_workers", "workers serving sockets in the cluster")
        g.add_metric([], len(view.workers))
        yield g
        g = GaugeMetricFamily("wse_connections",
                              "welcomed connections per worker (the broker's map)",
                              labels=["worker"])
        for w in view.workers:
            g.add_metric([w.worker], w.connections)
        yield g
        g = GaugeMetricFamily("wse_sockets", "WebSocket connections per worker, in any state",
                              labels=["worker"])
        for w in view.workers:
            g.add_metric([w.worker], w.gauges.get("connections", 0.0))
        yield g
        for name, text in _GAUGE_HELP.items():
            g = GaugeMetricFamily("wse_" + name, text, labels=["worker"])
            for w in view.workers:
                g.add_metric([w.worker], w.gauges.get(name, 0.0))
            yield g
        for name in COUNTERS:
            c = CounterMetricFamily("wse_" + name, _HELP[name], labels=["worker"])
            for w in view.workers:
                c.add_metric([w.worker], w.counters.get(name, 0))
            yield c
        c = CounterMetricFamily("wse_limit_refusals",
                                "what the limits refused, per limit (README, Limits)",
                                labels=["worker", "limit"])
        for w in view.workers:
            for key, value in sorted(w.counters.items()):
                if key.startswith("refused."):
                    c.add_metric([w.worker, key[len("refused."):]], value)
        yield c
        h = HistogramMetricFamily("wse_rpc_duration_seconds",
                                  "time RPC handlers took, per worker", labels=["worker"])
        for w in view.workers:
            cumulative, buckets = 0, []
            for bound, count in zip(list(BUCKETS) + [float("inf")], w.rpc_counts):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            h.add_metric([w.worker], buckets, w.rpc_sum)
        yield h
        c = CounterMetricFamily("wse_broker_events",
                                "the broker's own counters (refusals, drops, removed workers)",
                                labels=["event"])
        for key, value in sorted(view.broker_counters.items()):
            c.add_metric([key], value)
        yield c
