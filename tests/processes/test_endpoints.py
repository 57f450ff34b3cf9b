"""/healthz, /metrics and the JS client path: the pure parts (metrics core, the
broker keeping reports, the checks), the WSGI answers without sockets, then
real servers: two ``serve`` processes on one broker, each scraped on its own
port, both showing the whole cluster."""
import json
import re
import sys
import urllib.error
import urllib.request

import pytest

from helpers import UNIT, broker_of, serve_process, wait_for
from wse_sync import WseClient, WseServer, mount
from wse_sync.core.broker import BrokerCore
from wse_sync.core.checks import ROLE_WORKER, check
from wse_sync.core.link import Answer, LinkCore
from wse_sync.core.messages import Message
from wse_sync.core.metrics import BUCKETS, Histogram, WorkerMetrics, cluster_figures

pytestmark = pytest.mark.timeout(int(60 * UNIT))

APP = "tests/apps/cluster_app.py:server"


# -- pure ----------------------------------------------------------------------------

def test_histogram_buckets_are_upper_bounds():
    h = Histogram()
    for s in (0.0001, BUCKETS[0], BUCKETS[0] * 1.01, 99.0):
        h.observe(s)
    assert h.counts[0] == 2 and h.counts[1] == 1 and h.counts[-1] == 1
    assert sum(h.counts) == 4 and h.sum == pytest.approx(0.0001 + BUCKETS[0] * 2.01 + 99.0)


def test_report_keeps_named_counters_when_too_many():
    m = WorkerMetrics()
    m.counters["rpc_calls"] = 3
    for i in range(400):
        m.counters[f"refused.x{i}"] = 1
    r = m.report({"connections": 2})
    assert len(r["counters"]) == 256 and r["counters"]["rpc_calls"] == 3
    assert r["gauges"] == {"connections": 2.0}


def test_cluster_figures_uses_the_reports_for_counters_and_live_gauges_for_itself():
    stats = {"users": 3, "connections": 4,
             "workers": {"w1": {"pid": 1, "connections": 3, "role": "worker", "serves": True},
                         "w2": {"pid": 2, "connections": 1, "role": "worker", "serves": True},
                         "c1": {"pid": 3, "connections": 0, "role": "client", "serves": False}},
             "reports": {"w1": {"counters": {"rpc_calls": 1}},
                         "w2": {"counters": {"rpc_calls": 5}, "rpc": {"counts": [1], "sum": 0.1}}},
             "counters": {"workers.removed": 1}}
    mine = {"counters": {"rpc_calls": 7}, "gauges": {"connections": 3}}
    view = cluster_figures(stats, "w1", mine)
    assert (view.users, view.connections) == (3, 4)
    # counters as reported, even this worker's (w2 answering a scrape shows w1 at 1:
    # w1 answering must not show 7 first), gauges live for itself
    assert [(w.worker, w.counters.get("rpc_calls"), w.gauges.get("connections"), w.fresh)
            for w in view.workers] == [("w1", 1, 3, True), ("w2", 5, None, False)]
    seen_by_w2 = cluster_figures(stats, "w2", {"counters": {"rpc_calls": 9}})
    assert [w.counters.get("rpc_calls") for w in seen_by_w2.workers] == [1, 5]
    new = cluster_figures(stats, "w9", mine)  # not in the broker's list yet
    assert [(w.worker, w.counters.get("rpc_calls")) for w in new.workers][-1] == ("w9", None)
    assert view.workers[1].rpc_counts[0] == 1 and len(view.workers[1].rpc_counts) == len(BUCKETS) + 1
    alone = cluster_figures(None, "w1", mine)
    assert [w.worker for w in alone.workers] == ["w1"] and alone.users == 0


def test_broker_keeps_the_last_report_and_answers_the_request():
    core = BrokerCore(epoch="e1")
    core.handle("w1", Message("hello", {"pid": 1, "table": [], "base": 0}), 0.0)
    out = core.handle("w1", Message("stats", {"req": 9, "full": False,
                                              "report": {"counters": {"rpc_calls": 2}}}), 0.1)
    assert [(to, m.kind, m.body) for to, m in out] == [("w1", "stats", {"req": 9})]
    out = core.handle("w1", Message("stats", {"req": 10, "full": True}), 0.2)
    body = out[0][1].body
    assert body["req"] == 10 and body["reports"]["w1"]["counters"] == {"rpc_calls": 2}
    assert body["workers"]["w1"]["serves"] is True
    # `wse-sync stats` (an empty body) still gets the stats
    assert "users" in core.handle("x", Message("stats", {}), 0.3)[0][1].body
    core.remove_worker("w1")
    assert core.stats()["reports"] == {}


@pytest.mark.parametrize("body, what", [
    ({"report": []}, "dropped.malformed"),
    ({"report": {"counters": {"a": "x"}}}, "dropped.malformed"),
    ({"report": {"counters": {f"k{i}": 1 for i in range(300)}}}, "dropped.oversize"),
    ({"report": {"rpc": {"counts": [1] * 99}}}, "dropped.malformed"),
    ({"report": {"rpc": {"counts": [-1]}}}, "dropped.malformed"),
    ({"req": True}, "dropped.malformed"),
    ({"full": 1}, "dropped.malformed"),
])
def test_checks_refuse_bad_reports(body, what):
    refusal = check(Message("stats", body), ROLE_WORKER)
    assert refusal is not None and refusal.what == what


def test_link_core_gets_the_stats_answer():
    link = LinkCore("w1", lambda: [], 1, pid=1, now=0.0)
    req, out = link.stats({"counters": {}}, True)
    assert out[0].kind == "stats" and out[0].body["req"] == req and out[0].body["full"] is True
    step = link.handle(Message("stats", {"req": req, "users": 0}), 0.1)
    assert step.effects == [Answer(req, {"req": req, "users": 0})]


# -- WSGI, no sockets ------------------------------------------------------------------

def call(app, path, method="GET"):
    got = {}

    def start_response(status, headers, exc_info=None):
        got["status"], got["headers"] = status, dict(headers)
        return lambda data: None
    body = b"".join(app({"REQUEST_METHOD": method, "PATH_INFO": path}, start_response))
    return got["status"], got["headers"], body


def server(**kw):
    return WseServer(identify=lambda identity, accept, **_: accept(identity), **kw)


def test_client_path_serves_the_shipped_file_only_when_asked():
    assert call(server(), "/wse.js")[0].startswith("426")  # off by default: the wse endpoint
    status, headers, body = call(server(client_path="/js/wse.js"), "/js/wse.js")
    assert status == "200 OK" and headers["Content-Type"].startswith("text/javascript")
    assert b"WseClient" in body and headers["Content-Length"] == str(len(body))


def test_paths_turn_off_and_move():
    s = server(health_path=None, metrics_path="/m")
    assert call(s, "/healthz")[0].startswith("426")
    assert call(s, "/metrics")[0].startswith("426")
    assert call(s, "/m", method="POST")[0].startswith("405")


def test_metrics_without_prometheus_client_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    status, _, body = call(server(), "/metrics")
    assert status.startswith("501") and b"pip install 'wse_sync[metrics]'" in body


def test_mount_never_shadows_the_apps_own_routes():
    s = server()

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/metrics":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"the app's metrics"]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"no"]
    m = mount(app, s, "/ws")
    assert call(m, "/metrics") == ("200 OK", {"Content-Type": "text/plain"}, b"the app's metrics")
    assert call(m, "/other")[0].startswith("404")
    try:
        # the app has none: wse_sync answers (200 once the link has the broker's map)
        status, _, body = wait_for(lambda: (lambda r: r[0] == "200 OK" and r)(call(m, "/healthz")))
        assert json.loads(body)["broker"] == "up"
    finally:
        s.shutdown(timeout=2)


def test_health_is_503_while_stopping():
    s = server()
    first = call(s, "/healthz")  # the first request starts the hub: joining, then up
    assert first[0] == "200 OK" or json.loads(first[2])["broker"] == "joining"
    wait_for(lambda: call(s, "/healthz")[0] == "200 OK")
    s.shutdown(timeout=2)
    status, _, body = call(s, "/healthz")
    assert status.startswith("503") and json.loads(body)["status"] == "stopping"


# -- real processes ---------------------------------------------------------------

def get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10 * UNIT) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def samples(text):
    """{(name, labels): value} of a Prometheus text exposition."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})? (\S+)$", line)
        assert m, f"not a sample line: {line!r}"
        out[(m.group(1), m.group(2) or "")] = float(m.group(3))
    return out


def total(s, name):
    return sum(v for (n, _), v in s.items() if n == name)


def test_two_serves_on_one_broker_each_show_the_whole_cluster():
    with serve_process(APP, workers=1) as a:
        _, endpoint = broker_of(a)
        with serve_process(APP, workers=1, extra=["--broker", endpoint]) as b:
            clients = []
            try:
                for port, n in ((a.port, 3), (b.port, 2)):
                    for i in range(n):
                        c = WseClient(f"ws://127.0.0.1:{port}/")
                        c.connect(f"m{port}-{i}")
                        assert c.call("pid") > 0
                        clients.append(c)
                for port in (a.port, b.port):
                    status, body = get(port, "/healthz")
                    assert status == 200 and json.loads(body)["broker"] == "up"

                def cluster_seen(port):
                    status, text = get(port, "/metrics")
                    assert status == 200
                    s = samples(text)
                    return (s[("wse_users", "")] == 5 and s[("wse_workers", "")] == 2
                            and total(s, "wse_connections") == 5
                            and total(s, "wse_rpc_calls_total") == 5
                            and total(s, "wse_handshakes_total") == 5
                            and total(s, "wse_rpc_duration_seconds_count") == 5
                            and s[("wse_broker_up", "")] == 1) and s
                # each worker's report reaches the broker within a few seconds
                sa = wait_for(lambda: cluster_seen(a.port), timeout=20 * UNIT, interval=0.2)
                sb = wait_for(lambda: cluster_seen(b.port), timeout=20 * UNIT, interval=0.2)
                per_worker = sorted(v for (n, _), v in sa.items() if n == "wse_connections")
                assert per_worker == [2, 3] == sorted(
                    v for (n, _), v in sb.items() if n == "wse_connections")
            finally:
                for c in clients:
                    c.close()


def test_health_is_503_without_a_broker(tmp_path):
    missing = f"ipc://{tmp_path}/no-broker"
    with serve_process(APP, workers=1, extra=["--broker", missing]) as sp:
        status, body = get(sp.port, "/healthz")
        assert status == 503
        info = json.loads(body)
        assert info["status"] == "no-broker" and info["broker"] == "joining"
        assert info["endpoint"] == missing
