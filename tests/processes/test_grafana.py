"""workers/grafana/wse_sync.json against a real scrape: a 2-worker ``wse-sync
serve``, one client that makes an RPC (so counters and the RPC histogram have
samples) and one upgrade refused by a limit (so wse_limit_refusals_total has
one); every metric a panel or a template variable queries must be a sample
name of that /metrics, and every family /metrics exports must be on a panel."""
import copy
import http.client
import json
import os
import re
import urllib.request

import pytest

from helpers import ROOT, UNIT, serve_process, wait_for
from wse_sync import WseClient

pytestmark = pytest.mark.timeout(int(90 * UNIT))

DASHBOARD = os.path.join(ROOT, "workers", "grafana", "wse_sync.json")
APP = "tests/apps/cluster_app.py:server"
ALLOWED_ORIGIN = "https://app.example"

# a metric name inside a PromQL expression (labels and $variables are not wse_...)
METRIC = re.compile(r"(?<![\w$])wse_\w+")


def load():
    with open(DASHBOARD, encoding="utf-8") as f:
        return json.load(f)


def all_panels(dashboard):
    """Every panel, the ones inside collapsed rows too."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard):
    """(where, PromQL) of every panel target and every query template variable."""
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            yield f"panel {panel['id']} {panel.get('title')!r}", target["expr"]
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]
            yield f"variable {var['name']}", query["query"] if isinstance(query, dict) else query


def referenced(dashboard):
    """{metric name: [where it is queried]}."""
    names = {}
    for where, expr in queries(dashboard):
        for name in METRIC.findall(expr):
            names.setdefault(name, []).append(where)
    return names


def missing(dashboard, exported):
    """The names queried that the scrape does not have, with where."""
    return {name: where for name, where in referenced(dashboard).items()
            if name not in exported}


def parse(text):
    """({sample name: family name}, {sample name: sum over its labels}) of a
    Prometheus text exposition (a counter's samples are ``<family>_total``, a
    histogram's ``_bucket``/``_sum``/``_count``)."""
    from prometheus_client.parser import text_string_to_metric_families
    names, totals = {}, {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            names[s.name] = family.name
            totals[s.name] = totals.get(s.name, 0.0) + s.value
    return names, totals


# -- the file alone --------------------------------------------------------------

def test_dashboard_is_an_importable_grafana_dashboard():
    d = load()
    assert d["title"] == "wse_sync" and d["uid"] and 36 <= d["schemaVersion"] <= 41
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in all_panels(d)]
    assert len(ids) == len(set(ids)), f"panel ids repeat: {sorted(ids)}"
    shown = [p for p in all_panels(d) if p["type"] != "row"]
    assert len(shown) >= 15
    for p in all_panels(d):
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        if p["type"] == "row":  # layout only: a row queries nothing
            assert not p.get("targets"), p["title"]
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], f"panel {p['title']!r} has no target"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}" and t["expr"].strip()
    for where, expr in queries(d):
        assert METRIC.search(expr), f"{where} queries no wse_ metric: {expr}"
        for open_, close in ("()", "{}", "[]"):
            assert expr.count(open_) == expr.count(close), f"{where}: unbalanced {open_}: {expr}"


# -- against a real scrape ---------------------------------------------------------

def refused_upgrade(port):
    """An upgrade from an Origin the server does not allow: 403, counted as
    refused.allowed_origins (http.client: urllib would send Connection: close)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10 * UNIT)
    try:
        conn.request("GET", "/", headers={
            "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Protocol": "wse-default-json", "Origin": "https://elsewhere.example"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def metrics(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10 * UNIT) as r:
        assert r.status == 200
        return r.read().decode("utf-8")


@pytest.fixture(scope="module")
def scrape():
    """/metrics of a 2-worker serve once both workers' figures show an RPC, a
    welcome and a refusal (a worker's report reaches the broker within ~5 s)."""
    with serve_process(APP, workers=2, extra=["--allowed-origins", ALLOWED_ORIGIN]) as sp:
        client = WseClient(f"ws://127.0.0.1:{sp.port}/")
        client.connect("grafana")
        try:
            assert client.call("pid") > 0
            assert refused_upgrade(sp.port) == 403

            def complete():
                names, totals = parse(metrics(sp.port))
                ready = (totals.get("wse_workers") == 2 and totals.get("wse_broker_up") == 1
                         and totals.get("wse_rpc_calls_total", 0) >= 1
                         and totals.get("wse_rpc_duration_seconds_count", 0) >= 1
                         and totals.get("wse_limit_refusals_total", 0) >= 1)
                return ready and names
            return wait_for(complete, timeout=30 * UNIT, interval=0.25)
        finally:
            client.close()


def test_every_metric_the_dashboard_queries_is_exported(scrape):
    exported = scrape
    assert not missing(load(), exported), (
        f"the dashboard queries metrics /metrics does not export: {missing(load(), exported)}"
        f"\nexported: {sorted(exported)}")


def test_a_panel_naming_a_metric_that_does_not_exist_is_caught(scrape):
    exported = scrape
    d = copy.deepcopy(load())
    panel = next(p for p in all_panels(d) if p.get("targets"))
    # the family names without the sample suffixes, and a plain typo
    panel["targets"][0]["expr"] = ("rate(wse_messages_in[5m]) + wse_rpc_duration_seconds"
                                   " + wse_conections")
    caught = set(missing(d, exported)) - set(missing(load(), exported))
    assert caught == {"wse_messages_in", "wse_rpc_duration_seconds", "wse_conections"}


def test_every_exported_family_is_on_a_panel(scrape):
    """A new figure in core/metrics.py FIGURES (or a new family in
    worker/endpoints.py) needs a panel too."""
    exported = scrape
    queried_families = {exported[name] for name in referenced(load()) if name in exported}
    unshown = set(exported.values()) - queried_families
    assert not unshown, f"families /metrics exports that no panel shows: {sorted(unshown)}"
