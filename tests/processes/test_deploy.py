"""Deployment: gunicorn (one command through wse_sync.gunicorn_conf, our
worker and gevent-websocket's, misuse), and the files of workers/: the
gunicorn config, the supervisord config, the systemd units."""
import configparser
import os
import re
import shutil
import subprocess
import tempfile

import pytest

from deploy_helpers import Proc, alive, child_env, gunicorn, tool, upgrade_request, wait_gone
from helpers import (APPS, ROOT, UNIT, broker_stats, free_port, only_worker, spread_clients,
                     wait_for)
from wse_sync import WSE_REASON, WseClient, connect_cluster

pytest.importorskip("gunicorn")

APP = "embed_app:application"
WORKERS_DIR = os.path.join(ROOT, "workers")


def _closes(clients):
    seen = {}
    for c in clients:
        c.when.closed(lambda code, reason, c=c: seen.setdefault(c.identity, (code, reason)))
    return seen


def _pid_from(p, pattern):
    return int(re.search(pattern, p.wait_line(pattern)[-1]).group(1))


def test_gunicorn_one_command_makes_one_cluster():
    with gunicorn(APP, chdir=APPS, workers=2) as g:
        assert "Using worker: wse_sync.gunicorn.Worker" in g.output
        keeper = _pid_from(g, r"broker keeper \(pid (\d+)\)")
        broker = _pid_from(g, r"broker started \(pid (\d+)\)")
        by_pid = spread_clients(g.url, workers=2, per_worker=1, prefix="g")
        (pid_a, (a, *_)), (pid_b, (b, *_)) = sorted(by_pid.items())[:2]
        everyone = [c for cs in by_pid.values() for c in cs]
        inbox = {c.identity: [] for c in everyone}
        for c in everyone:
            c.channel.on("notice", inbox[c.identity].append)
        events = []
        a.channel.on("event", events.append)
        # send to a user held by the other worker; broadcast reaches both workers
        assert a.call("send_to", {"cid": b.identity, "type": "notice", "payload": "a->b"})
        wait_for(lambda: inbox[b.identity] == ["a->b"])
        b.call("broadcast", {"type": "notice", "payload": "all"})
        wait_for(lambda: all(box[-1:] == ["all"] for box in inbox.values()))
        assert inbox[b.identity] == ["a->b", "all"]
        # the user map is the cluster's, in every worker
        cids = sorted(c.identity for c in everyone)
        wait_for(lambda: a.call("clients") == cids and b.call("clients") == cids)
        # joined and left fire once in the whole cluster
        solo = WseClient(g.url)
        solo.connect("solo")
        wait_for(lambda: ["joined", "solo"] in [e[:2] for e in events])
        solo.close()
        wait_for(lambda: ["left", "solo"] in [e[:2] for e in events])
        assert [e[:2] for e in events].count(["joined", "solo"]) == 1
        # conn_per_user (2) is cluster-wide: two "multi" connections on worker a,
        # then one on b (each placed with the other worker stopped, not left to
        # the kernel); the one past the limit evicted the oldest
        multi, pids, evicted = [], set(), []
        for target in (pid_a, pid_a, pid_b):
            with only_worker(target, [pid_a, pid_b]):
                c = WseClient(g.url)
                c.when.closed(lambda code, reason: evicted.append(reason))
                pids.add(c.connect("multi")["pid"])
            multi.append(c)
        assert pids == {pid_a, pid_b}
        wait_for(lambda: len(evicted) == len(multi) - 2)
        assert set(evicted) == {WSE_REASON.CLIENTS_CONCURRENCY}
        wait_for(lambda: a.call("conn_count", "multi") == 2 and b.call("conn_count", "multi") == 2)
        # SIGTERM: every socket closed with 1012, workers first, then the broker
        closes = _closes(everyone)
        assert g.stop() == 0, g.output
        wait_for(lambda: len(closes) == len(everyone))
        assert {code for code, _ in closes.values()} == {1012}
        wait_gone(keeper)
        wait_gone(broker)
        assert "wse_sync: broker stopped" in g.output


def test_gunicorn_with_gevent_websocket_worker_class():
    with gunicorn(APP, "-k", "geventwebsocket.gunicorn.workers.GeventWebSocketWorker",
                  chdir=APPS, workers=2) as g:
        by_pid = spread_clients(g.url, workers=2, per_worker=1, prefix="k")
        (_, (a, *_)), (_, (b, *_)) = sorted(by_pid.items())[:2]
        got = []
        b.channel.on("notice", got.append)
        a.call("send_to", {"cid": b.identity, "type": "notice", "payload": "cross"})
        wait_for(lambda: got == ["cross"])
        closes = _closes([a, b])
        assert g.stop() == 0, g.output
        wait_for(lambda: len(closes) == 2)
        assert {code for code, _ in closes.values()} == {1012}


@pytest.mark.parametrize("worker_class, message", [
    ("sync", r"cannot run in gunicorn's gunicorn\.workers\.sync\.SyncWorker worker"),
    ("gthread", r"cannot run in gunicorn's .*ThreadWorker worker"),
    ("gevent", r"is gevent but has no WebSocket handler"),
])
def test_gunicorn_refuses_worker_classes_that_cannot_serve(worker_class, message):
    p = Proc([tool("gunicorn"), "-c", "python:wse_sync.gunicorn_conf", "-k", worker_class,
              "-w", "1", "-b", f"127.0.0.1:{free_port()}", "--chdir", APPS, APP],
             env=child_env(HOME=tempfile.mkdtemp(prefix="wse-gunicorn-home-")))
    try:
        rc = p.wait(60 * UNIT)
    finally:
        p.kill()
    assert rc != 0
    assert re.search(message, p.output), p.output
    assert "-k wse_sync.gunicorn.Worker" in p.output
    keeper = re.search(r"broker keeper \(pid (\d+)\)", p.output)
    if keeper:  # the master stopped the broker it started
        wait_gone(int(keeper.group(1)))


def test_gunicorn_sync_worker_without_the_config_answers_upgrades_with_a_clear_500():
    with gunicorn(APP, "-k", "sync", conf=None, chdir=APPS, workers=1, wait_workers=False) as g:
        g.wait_line(r"Booting worker with pid")
        status, _, body = wait_for(lambda: _try_upgrade(g.port))
        assert status == 500
        assert b"does not do WebSocket" in body and b"gunicorn/" in body
        assert b"-k wse_sync.gunicorn.Worker" in body
        g.wait_line(r"does not do WebSocket")


def _try_upgrade(port):
    try:
        return upgrade_request(port, "/ws")
    except OSError:
        return None


def test_several_gunicorn_workers_without_a_shared_broker_are_refused():
    p = Proc([tool("gunicorn"), "-k", "wse_sync.gunicorn.Worker", "-w", "2",
              "-b", f"127.0.0.1:{free_port()}", "--chdir", APPS, APP],
             env=child_env(HOME=tempfile.mkdtemp(prefix="wse-gunicorn-home-")))
    try:
        rc = p.wait(60 * UNIT)
    finally:
        p.kill()
    assert rc != 0
    assert "2 gunicorn workers but no shared broker" in p.output, p.output
    assert "-c python:wse_sync.gunicorn_conf" in p.output


def test_gunicorn_joins_the_broker_named_by_WSE_SYNC_BROKER(tmp_path):
    endpoint = f"ipc://{tmp_path}/broker.sock"
    broker = Proc([tool("wse-sync"), "broker", "--bind", endpoint, "--sync-window", "0"])
    try:
        broker.wait_line("broker listening")
        env = child_env(HOME=str(tmp_path), WSE_SYNC_BROKER=endpoint)
        with gunicorn(APP, chdir=APPS, workers=2, env=env) as g:
            assert "broker keeper" not in g.output
            assert f"workers join the broker at {endpoint}" in g.output
            wait_for(lambda: len((broker_stats(endpoint) or {}).get("workers", {})) == 2)
            c = WseClient(g.url)
            got = []
            c.channel.on("notice", got.append)
            c.connect("ext")
            with connect_cluster(endpoint) as cluster:
                wait_for(lambda: "ext" in cluster.clients)
                cluster.send("ext", "notice", "from outside")
            wait_for(lambda: got == ["from outside"])
            c.close()
        assert alive(broker.pid)  # not gunicorn's to stop
    finally:
        assert broker.stop() == 0


# -- workers/ ------------------------------------------------------------------------

def test_workers_gunicorn_conf_py(tmp_path):
    port = free_port()
    endpoint = f"ipc://{tmp_path}/known.sock"
    env = child_env(HOME=str(tmp_path), WSE_SYNC_BIND=f"127.0.0.1:{port}", WEB_CONCURRENCY="2",
                    WSE_SYNC_BROKER_BIND=endpoint)
    p = Proc([tool("gunicorn"), "-c", os.path.join(WORKERS_DIR, "gunicorn.conf.py"),
              "--chdir", APPS, APP], env=env)
    try:
        p.wait_line(r"wse_sync: worker \d+ serves", count=2)
        assert f"on {endpoint}" in p.output
        url = f"ws://127.0.0.1:{port}/ws"
        by_pid = spread_clients(url, workers=2, per_worker=1, prefix="conf")
        clients = [c for cs in by_pid.values() for c in cs]
        inbox = []
        clients[0].channel.on("notice", inbox.append)
        # the broker is at the known endpoint: a script can reach the users
        with connect_cluster(endpoint) as cluster:
            cluster.send(clients[0].identity, "notice", "via the known endpoint")
        wait_for(lambda: inbox == ["via the known endpoint"])
        closes = _closes(clients)
        assert p.stop() == 0, p.output
        wait_for(lambda: len(closes) == len(clients))
        assert {code for code, _ in closes.values()} == {1012}
    finally:
        p.kill()


def _file_lines(path, pattern, count=1, timeout=30 * UNIT):
    rx = re.compile(pattern)

    def found():
        try:
            with open(path) as f:
                hits = [line for line in f if rx.search(line)]
        except FileNotFoundError:
            return None
        return hits if len(hits) >= count else None
    return wait_for(found, timeout)


def test_workers_supervisord_conf():
    pytest.importorskip("supervisor")
    run = tempfile.mkdtemp(prefix="wse-supervisord-")
    port = free_port()
    env = child_env(WSE_SYNC_APP=os.path.join(APPS, "embed_app.py") + ":server",
                    WSE_SYNC_HOST="127.0.0.1", WSE_SYNC_PORT=str(port), WSE_SYNC_WORKERS="2",
                    WSE_SYNC_RUN=run)
    conf = os.path.join(WORKERS_DIR, "supervisord.conf")
    p = Proc([tool("supervisord"), "-c", conf], env=env)
    try:
        log = os.path.join(run, "wse-sync.log")
        _file_lines(log, r"worker \d+ serving", count=2)
        _file_lines(os.path.join(run, "broker.log"), r"attached with 0 connections", count=2)

        def both_running():
            out = subprocess.run([tool("supervisorctl"), "-c", conf, "status"], env=env,
                                 capture_output=True, text=True, timeout=30 * UNIT).stdout
            return (re.search(r"wse-sync-broker\s+RUNNING", out)
                    and re.search(r"wse-sync\s+RUNNING", out))
        wait_for(both_running, 30 * UNIT, interval=0.2)  # startsecs have passed
        url = f"ws://127.0.0.1:{port}/"
        by_pid = spread_clients(url, workers=2, per_worker=1, prefix="sup")
        (_, (a, *_)), (_, (b, *_)) = sorted(by_pid.items())[:2]
        got = []
        b.channel.on("notice", got.append)
        a.call("send_to", {"cid": b.identity, "type": "notice", "payload": "through the broker"})
        wait_for(lambda: got == ["through the broker"])
        clients = [c for cs in by_pid.values() for c in cs]
        closes = _closes(clients)
        assert p.stop(timeout=60 * UNIT) == 0, p.output
        wait_for(lambda: len(closes) == len(clients))
        assert {code for code, _ in closes.values()} == {1012}
        assert "stopped: wse-sync (exit status 0)" in p.output
        assert "stopped: wse-sync-broker (exit status 0)" in p.output
    finally:
        p.kill()
        shutil.rmtree(run, ignore_errors=True)


UNITS = ["wse-sync-broker.service", "wse-sync@.service", "wse-sync-gunicorn.service"]


def _unit(name):
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    with open(os.path.join(WORKERS_DIR, "systemd", name)) as f:
        cp.read_file(f)
    return cp


@pytest.mark.parametrize("name", UNITS)
def test_systemd_unit_keys(name):
    unit = _unit(name)
    service = unit["Service"]
    assert service["KillSignal"] == "SIGTERM"
    assert 5 <= int(service["TimeoutStopSec"]) <= 60
    assert service["Restart"] in ("always", "on-failure")
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    exec_start = service["ExecStart"].split()
    assert os.path.isabs(exec_start[0])
    if name == "wse-sync-broker.service":
        assert service["Restart"] == "always"
        assert exec_start[1:3] == ["broker", "--bind"]
    else:
        assert "wse-sync-broker.service" in unit["Unit"]["Wants"]
        assert "wse-sync-broker.service" in unit["Unit"]["After"]
        assert service["KillMode"] == "mixed"  # SIGTERM to the main process, which stops the rest
        assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
        assert "ipc:///run/wse-sync/broker.sock" in service["ExecStart"] + service.get("Environment", "")
    if name == "wse-sync@.service":
        assert exec_start[1] == "serve" and "%i" in exec_start


def test_systemd_units_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (the keys are checked by test_systemd_unit_keys)")
    # the units name /usr/local/bin/...: point them at this environment's scripts
    for name in UNITS:
        with open(os.path.join(WORKERS_DIR, "systemd", name)) as f:
            text = f.read()
        text = text.replace("/usr/local/bin/wse-sync", tool("wse-sync"))
        text = text.replace("/usr/local/bin/gunicorn", tool("gunicorn"))
        (tmp_path / name).write_text(text)
    out = subprocess.run([analyze, "verify", "wse-sync-broker.service", "wse-sync@4200.service",
                          "wse-sync-gunicorn.service"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60 * UNIT, env=dict(os.environ, SYSTEMD_LOG_COLOR="0"))
    if out.returncode != 0 and "Failed to initialize manager" in out.stderr:
        pytest.skip(f"systemd-analyze cannot run here: {out.stderr.strip()}")
    assert out.returncode == 0, out.stderr
    # warnings (an unknown key, a bad value) do not change the exit code: none allowed
    problems = [line for line in (out.stdout + out.stderr).splitlines()
                if "wse-sync" in line or "Unknown" in line or "Failed" in line]
    assert problems == [], out.stderr


def test_systemd_verify_catches_a_broken_unit(tmp_path):
    """The verify test can fail: a bad Restart= value is reported."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    text = open(os.path.join(WORKERS_DIR, "systemd", "wse-sync-broker.service")).read()
    text = text.replace("/usr/local/bin/wse-sync", tool("wse-sync"))
    (tmp_path / "wse-sync-broker.service").write_text(text.replace("Restart=always", "Restart=sometimes"))
    out = subprocess.run([analyze, "verify", "wse-sync-broker.service"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60 * UNIT)
    if "Failed to initialize manager" in out.stderr:
        pytest.skip("systemd-analyze cannot run here")
    assert "restart specifier" in out.stderr



def test_gunicorn_sigterm_waits_for_the_1012_shutdown_before_the_worker_exits(tmp_path):
    """An open WebSocket holds no greenlet of gunicorn's pool, so the pool is idle
    at once on SIGTERM; the worker still waits for the 1012 shutdown it started,
    'left' handlers included (here each takes 2 s: a worker that left with its
    idle pool never ran them to the end)."""
    log = tmp_path / "left.log"
    env = child_env(HOME=str(tmp_path), WSE_TEST_SLOW_LEFT="2", WSE_TEST_LEFT_LOG=str(log))
    with gunicorn(APP, chdir=APPS, workers=1, env=env) as g:
        clients = []
        for i in range(3):
            c = WseClient(g.url)
            c.connect(f"t{i}")
            clients.append(c)
        closes = _closes(clients)
        assert g.stop() == 0, g.output
        wait_for(lambda: len(closes) == len(clients))
        assert {code for code, _ in closes.values()} == {1012}
    assert sorted(log.read_text().split("\n")[:-1]) == ["t0 1012", "t1 1012", "t2 1012"], \
        g.output
