"""core.metrics.FIGURES is the one table of what a worker reports: every counter
and gauge the worker code reports has an entry (read from the sources, so a
figure added without one fails here, not at scrape time), and /metrics shows
each entry with its help and kind."""
import ast
from pathlib import Path

import pytest

from wse_sync.core.metrics import (BUCKETS, COUNTER, COUNTERS, FIGURES, GAUGE, REFUSED,
                                   ClusterFigures, Tally, WorkerMetrics,
                                   WorkerReport)

ROOT = Path(__file__).resolve().parents[2] / "wse_sync"
# where a worker counts (the broker's own counters are another thing: wse_broker_events)
WORKER_SIDE = ("socket", "worker", "integrations")
# core modules that count into a worker's counters
WORKER_CORE = ("refusals.py",)


def _worker_sources():
    paths = [p for layer in WORKER_SIDE for p in sorted((ROOT / layer).rglob("*.py"))]
    for path in paths + [ROOT / "core" / name for name in WORKER_CORE]:
        yield path, ast.parse(path.read_text())


def _counted():
    """Counter keys the worker code uses: ``...counters["name"]`` (exact names),
    ``...counters["prefix" + x]`` (prefixes) and ``...tally.name += 1``."""
    names, prefixes = set(), set()
    for path, tree in _worker_sources():
        for node in ast.walk(tree):
            if (isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Attribute)
                    and isinstance(node.target.value, (ast.Attribute, ast.Name))):
                owner = node.target.value
                if (owner.attr if isinstance(owner, ast.Attribute) else owner.id).endswith("tally"):
                    names.add((node.target.attr, path.name))
            if not isinstance(node, ast.Subscript):
                continue
            target = node.value
            attr = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
            if not attr.endswith("counters"):
                continue
            key = node.slice
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                names.add((key.value, path.name))
            elif (isinstance(key, ast.BinOp) and isinstance(key.left, ast.Constant)
                  and isinstance(key.left.value, str)):
                prefixes.add((key.left.value, path.name))
            else:
                raise AssertionError(f"{path.name}:{node.lineno}: a counter key this test"
                                     " cannot read; name it with a string")
    return names, prefixes


def _gauges():
    """The gauge keys ``metrics_report`` hands to ``WorkerMetrics.report``."""
    found = set()
    for path, tree in _worker_sources():
        for fn in ast.walk(tree):
            if not (isinstance(fn, ast.FunctionDef) and fn.name == "metrics_report"):
                continue
            for node in ast.walk(fn):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "report"):
                    for arg in node.args:
                        assert isinstance(arg, ast.Dict), f"{path.name}: report() of a dict literal"
                        found.update((k.value, path.name) for k in arg.keys)
    return found


def test_every_counter_the_worker_counts_has_a_table_entry():
    names, prefixes = _counted()
    assert any(name == "messages_in" for name, _ in names)  # the scan sees the tally
    assert any(name == "handshakes" for name, _ in names)  # ... and the counters
    table = {f.name for f in FIGURES if f.kind == COUNTER}
    missing = sorted(f"{name} ({where})" for name, where in names
                     if name not in table and not name.startswith(REFUSED))
    assert not missing, f"counters with no entry in core.metrics.FIGURES: {missing}"
    assert {prefix for prefix, _ in prefixes} <= {REFUSED}, prefixes


def test_every_gauge_the_worker_reports_has_a_table_entry():
    gauges = _gauges()
    assert gauges, "no metrics_report(...) calling report({...}) found"
    table = {f.name for f in FIGURES if f.kind == GAUGE}
    missing = sorted(f"{name} ({where})" for name, where in gauges if name not in table)
    assert not missing, f"gauges with no entry in core.metrics.FIGURES: {missing}"


def test_the_table_is_well_formed():
    assert len({f.name for f in FIGURES}) == len(FIGURES)
    assert len({f.metric for f in FIGURES}) == len(FIGURES)
    assert all(f.kind in (COUNTER, GAUGE) and f.help and f.metric.startswith("wse_")
               for f in FIGURES)
    assert COUNTERS == tuple(f.name for f in FIGURES if f.kind == COUNTER)


def test_a_report_of_every_figure_renders_each_entry():
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry, generate_latest

    from wse_sync.worker.endpoints import _Collector

    m = WorkerMetrics()
    for name in COUNTERS:
        m.counters[name] += 2
    m.counters[REFUSED + "max_rpc"] += 1
    report = m.report({f.name: 1.5 for f in FIGURES if f.kind == GAUGE})
    row = WorkerReport("w1", 1, 3, report["counters"], report["gauges"],
                       [0] * (len(BUCKETS) + 1), 0.0, True)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(ClusterFigures(3, 3, [row], {}), True, ["up"]))
    text = generate_latest(registry).decode()
    for f in FIGURES:
        exposed = f.metric + ("_total" if f.kind == COUNTER else "")
        assert f"# HELP {exposed} {f.help}\n" in text
        assert f"# TYPE {exposed} {f.kind}\n" in text
        value = "2.0" if f.kind == COUNTER else "1.5"
        assert f'{exposed}{{worker="w1"}} {value}\n' in text
    assert 'wse_limit_refusals_total{limit="max_rpc",worker="w1"} 1.0' in text


def test_the_tally_counts_table_counters_and_reports_them_with_the_others():
    assert set(Tally.__slots__) <= set(COUNTERS)
    m = WorkerMetrics()
    m.tally.messages_in += 3
    m.tally.rpc_errors += 1
    m.counters["handshakes"] += 2
    m.counters["refused.max_rpc"] += 1
    assert m.report({})["counters"] == {"messages_in": 3, "rpc_errors": 1, "handshakes": 2,
                                        "refused.max_rpc": 1}
