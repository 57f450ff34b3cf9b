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
from typing import Any, Callable, Dict, Iterable, List, Optional, Protocol, Tuple

import ujson

from ..core.config import Config
from ..core.metrics import BUCKETS, FIGURES, GAUGE, REFUSED, ClusterFigures, cluster_figures

__all__ = ["Served", "answer", "paths_of", "client_file", "render_metrics", "METRICS_MISSING"]

Headers = List[Tuple[str, str]]

CLIENT_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "static", "wse.js")

METRICS_MISSING = ("/metrics needs the prometheus-client package:"
                   " pip install 'wse_sync[metrics]' (or prometheus-client)\n")


class _Link(Protocol):
    """What the answers read of the broker link (one broker or shards)."""

    @property
    def state(self) -> str: ...

    @property
    def shard_states(self) -> List[str]: ...

    def stats(self, full: bool = True,
              timeout: Optional[float] = None) -> Optional[Dict[str, Any]]: ...


class _Hub(Protocol):
    """What the answers read of the server's hub."""

    @property
    def worker_id(self) -> str: ...

    @property
    def link(self) -> Optional[_Link]: ...

    def health(self) -> Tuple[bool, Dict[str, Any]]: ...

    def metrics_report(self) -> Dict[str, Any]: ...


class Served(Protocol):
    """What the answers read of the server (a WseServer)."""

    @property
    def config(self) -> Config: ...

    @property
    def hub(self) -> _Hub: ...


def paths_of(server: Served) -> Dict[str, str]:
    """path -> what it serves ("health", "metrics", "client"), for the paths turned on."""
    config = server.config
    paths = (("health", config.health_path), ("metrics", config.metrics_path),
             ("client", config.client_path))
    return {path: what for what, path in paths if path}


def answer(server: Served, what: str, environ: Dict[str, Any],
           start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Answer a plain request for one of ``paths_of(server)``."""
    if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
        return _send(start_response, "405 Method Not Allowed", "text/plain; charset=utf-8",
                     b"GET only\n", [("Allow", "GET, HEAD")], environ)
    if what == "health":
        ok, state = server.hub.health()
        return _send(start_response, "200 OK" if ok else "503 Service Unavailable",
                     "application/json", ujson.dumps(state).encode("utf-8") + b"\n",
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


def _send(start_response: Callable[..., Any], status: str, content_type: str, body: bytes,
          headers: Headers, environ: Dict[str, Any]) -> List[bytes]:
    start_response(status, [("Content-Type", content_type),
                            ("Content-Length", str(len(body)))] + headers)
    return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]


# -- Prometheus ------------------------------------------------------------------

def render_metrics(server: Served) -> Tuple[bytes, str]:
    """(body, content type) of /metrics: the cluster as this worker sees it."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    hub = server.hub
    stats = None
    link = hub.link
    if link is not None and link.state in ("up", "partial"):  # partial: the shards that answer
        stats = link.stats(full=True, timeout=min(2.0, server.config.broker_timeout))
    view = cluster_figures(stats, hub.worker_id, hub.metrics_report())
    registry = CollectorRegistry(auto_describe=False)
    shard_states = link.shard_states if link is not None else []
    registry.register(_Collector(view, stats is not None, shard_states))
    return generate_latest(registry), CONTENT_TYPE_LATEST


class _Collector:
    """prometheus_client's custom-collector protocol over one ClusterFigures."""

    def __init__(self, view: ClusterFigures, broker_answered: bool,
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
        for figure in FIGURES:  # core.metrics: every figure a worker reports
            if figure.kind == GAUGE:
                g = GaugeMetricFamily(figure.metric, figure.help, labels=["worker"])
                for w in view.workers:
                    g.add_metric([w.worker], w.gauges.get(figure.name, 0.0))
                yield g
            else:
                c = CounterMetricFamily(figure.metric, figure.help, labels=["worker"])
                for w in view.workers:
                    c.add_metric([w.worker], w.counters.get(figure.name, 0))
                yield c
        c = CounterMetricFamily("wse_limit_refusals",
                                "what the limits refused, per limit (README, Limits)",
                                labels=["worker", "limit"])
        for w in view.workers:
            for key, value in sorted(w.counters.items()):
                if key.startswith(REFUSED):
                    c.add_metric([w.worker, key[len(REFUSED):]], value)
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
