"""The server as real processes: ``python -m wse_sync`` / ``wse-sync`` serve,
graceful stops, app specs, ``broker`` and ``stats``."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import gevent
import pytest

from helpers import APPS, ROOT, UNIT, ServerProcess, free_port, serve_process, wait_for
from wse_sync import WseClient, WseError

ECHO = "examples/echo/app.py:server"


def wse_sync_script() -> str:
    path = shutil.which("wse-sync")
    if path is None:
        path = os.path.join(os.path.dirname(sys.executable), "wse-sync")
    assert os.access(path, os.X_OK), f"no wse-sync console script at {path}"
    return path


class CliProcess(ServerProcess):
    """Like ServerProcess, but with any command line and working directory."""

    def __init__(self, argv, cwd=ROOT, port=None):
        self.lines = []
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     text=True, cwd=cwd, env=os.environ.copy())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = port
        self.url = f"ws://127.0.0.1:{port}/" if port else None


def serve_argv(app, port, workers=1, python_m=True, extra=()):
    head = [sys.executable, "-m", "wse_sync"] if python_m else [wse_sync_script()]
    return [*head, "serve", app, "--host", "127.0.0.1", "--port", str(port),
            "--workers", str(workers), *extra]


def run_cli(argv, cwd=ROOT, timeout=30 * UNIT):
    """Run a command that should end by itself; (returncode, stdout, stderr).

    If it does not end in time it is stopped (SIGTERM, then SIGKILL) and the
    test fails: a bad command line must not leave a server running.
    """
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=20 * UNIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        raise AssertionError(
            f"{argv} did not exit within {timeout}s; stderr:\n{err}") from None
    return proc.returncode, out, err


def stop_cooperatively(sp: ServerProcess, sig: int) -> int:
    """Signal the supervisor and wait for it while this process's greenlets run
    (so WseClients here answer the server's close frames)."""
    sp.proc.send_signal(sig)
    wait_for(lambda: sp.proc.poll() is not None, timeout=40 * UNIT, interval=0.05)
    return sp.stop(sig)


def connect(url, identity):
    client = WseClient(url)
    welcome = client.connect(identity)
    return client, welcome


# -- serving ----------------------------------------------------------------------

def test_python_m_serves_the_echo_example():
    with serve_process(ECHO, workers=1) as sp:
        client, welcome = connect(sp.url, "alice")
        assert welcome["hello"] == "alice"
        assert isinstance(welcome["pid"], int) and welcome["pid"] != os.getpid()
        assert client.call("echo", {"n": [1, "two"]}) == {"n": [1, "two"]}
        said = []
        client.channel.on("said", said.append)
        client.send("say", "hello")
        wait_for(lambda: said == ["hello"])
        client.close()
        assert stop_cooperatively(sp, signal.SIGTERM) == 0
    assert "Traceback" not in sp.stderr


def test_console_script_serves_the_echo_example():
    port = free_port()
    sp = CliProcess(serve_argv(ECHO, port, python_m=False), port=port)
    try:
        sp.wait_line(r"worker \d+ serving")
        client, welcome = connect(sp.url, "bob")
        assert welcome["hello"] == "bob"
        assert client.call("echo", "via the console script") == "via the console script"
        client.close()
        assert stop_cooperatively(sp, signal.SIGTERM) == 0
    finally:
        sp.stop()
    assert "Traceback" not in sp.stderr


def test_console_script_help():
    rc, out, err = run_cli([wse_sync_script(), "--help"])
    assert rc == 0
    for command in ("serve", "broker", "stats"):
        assert command in out


# -- graceful stop -------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_gracefully_with_1012(sig):
    with serve_process(ECHO, workers=2) as sp:
        clients = []
        closed = []
        for name in ("u1", "u2", "u3"):
            client, _ = connect(sp.url, name)
            client.when.closed(lambda code, reason, name=name: closed.append((name, code, reason)))
            clients.append(client)
        assert [c.call("echo", i) for i, c in enumerate(clients)] == [0, 1, 2]
        rc = stop_cooperatively(sp, sig)
        assert rc == 0
        wait_for(lambda: len(closed) == 3)
        assert sorted(closed) == [("u1", 1012, ""), ("u2", 1012, ""), ("u3", 1012, "")]
    err = sp.stderr
    assert "Traceback" not in err
    # start lines
    assert sp.wait_line(r"broker listening on ipc://", timeout=0)
    assert sp.wait_line(r"worker \d+ serving", count=2, timeout=0)
    assert sp.wait_line(r"wse-sync serving .*echo/app\.py:server.* 2 worker", timeout=0)
    # stop lines
    name = signal.Signals(sig).name
    assert sp.wait_line(rf"{name}: stopping 2 worker", timeout=0)
    assert sp.wait_line(r"worker \d+ stopping", count=2, timeout=0)
    assert sp.wait_line(r"worker \d+ stopped", count=2, timeout=0)
    assert sp.wait_line(r"broker stopped", timeout=0)
    assert sp.wait_line(r"wse-sync stopped", timeout=0)
    assert not [line for line in sp.lines if " ERROR " in line or "CRITICAL" in line]


def test_stop_with_nobody_connected():
    with serve_process(ECHO, workers=1) as sp:
        assert stop_cooperatively(sp, signal.SIGTERM) == 0
    assert "Traceback" not in sp.stderr
    assert sp.wait_line(r"wse-sync stopped", timeout=0)


# -- app specs -------------------------------------------------------------------------

@pytest.mark.parametrize("spec,cwd,built_by", [
    ("cli_app:server", APPS, "module"),
    ("cli_app:make_server", APPS, "factory"),
    ("tests/apps/cli_app.py:server", ROOT, "module"),
    ("tests/apps/cli_app.py:make_server", ROOT, "factory"),
    (os.path.join(APPS, "cli_app.py") + ":make_server", "/", "factory"),
])
def test_app_spec_forms(spec, cwd, built_by):
    port = free_port()
    sp = CliProcess(serve_argv(spec, port), cwd=cwd, port=port)
    try:
        sp.wait_line(r"worker \d+ serving")
        client, welcome = connect(sp.url, "carol")
        assert welcome["built_by"] == built_by
        assert client.call("echo", [spec]) == [spec]
        client.close()
        assert stop_cooperatively(sp, signal.SIGTERM) == 0
    finally:
        sp.stop()
    assert "Traceback" not in sp.stderr


BAD_SPECS = {
    "missing-file": ("tests/apps/no_such_file.py:server", "no_such_file"),
    "missing-module": ("no_such_module_xyz:server", "no_such_module_xyz"),
    "missing-attr": ("tests/apps/cli_app.py:nope", "nope"),
    "attr-not-a-server": ("tests/apps/cli_app.py:not_a_server", "not_a_server"),
    "factory-not-a-server": ("tests/apps/cli_app.py:make_nothing", "make_nothing"),
}


@pytest.mark.parametrize("with_port", [True, False], ids=["with-port", "without-port"])
@pytest.mark.parametrize("spec,name", list(BAD_SPECS.values()), ids=list(BAD_SPECS))
def test_bad_app_spec_is_a_clear_error(spec, name, with_port):
    argv = [sys.executable, "-m", "wse_sync", "serve", spec, "--workers", "1"]
    if with_port:
        argv += ["--host", "127.0.0.1", "--port", str(free_port())]
    # loading an app takes about a second: a supervisor still up after 15 s
    # is restarting workers that can never load it
    rc, out, err = run_cli(argv, timeout=15 * UNIT)
    assert rc != 0
    assert "Traceback" not in err, err
    assert name in err, err


# -- broker and stats ------------------------------------------------------------------

def test_stats_against_a_standalone_broker():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    broker = CliProcess([wse_sync_script(), "broker", "--bind", endpoint, "--insecure"])
    try:
        broker.wait_line(r"broker listening on " + endpoint.replace(".", r"\."))
        rc, out, err = run_cli([wse_sync_script(), "stats", "--broker", endpoint])
        assert rc == 0, err
        stats = json.loads(out)
        assert stats["users"] == 0 and stats["connections"] == 0
        assert isinstance(stats["counters"], dict)

        # workers of a serve attach to it; its users show up in the stats
        with serve_process(ECHO, workers=1, extra=["--broker", endpoint]) as sp:
            a, _ = connect(sp.url, "ann")
            b, _ = connect(sp.url, "ben")
            b2, _ = connect(sp.url, "ben")

            def users_seen():
                rc, out, _ = run_cli([wse_sync_script(), "stats", "--broker", endpoint])
                s = json.loads(out) if rc == 0 else {}
                return s if s.get("connections") == 3 else None

            stats = wait_for(users_seen, timeout=10 * UNIT, interval=0.2)
            assert stats["users"] == 2
            assert len(stats["workers"]) == 1
            assert sum(v for k, v in stats["counters"].items() if k.startswith("in.")) > 0
            for c in (a, b, b2):
                c.close()
            assert stop_cooperatively(sp, signal.SIGTERM) == 0
        assert "Traceback" not in sp.stderr
        assert stop_cooperatively(broker, signal.SIGTERM) == 0
    finally:
        broker.stop()
    assert "Traceback" not in broker.stderr
    assert broker.wait_line(r"broker stopped", timeout=0)


def test_stats_without_a_broker_fails_cleanly():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    rc, out, err = run_cli([wse_sync_script(), "stats", "--broker", endpoint, "--timeout", "0.5"])
    assert rc != 0
    assert "Traceback" not in err
    assert endpoint in err


def test_sigterm_lets_running_handlers_finish(tmp_path, monkeypatch):
    """Stop: connections get 1012 at once, a handler in flight still completes."""
    mark = tmp_path / "mark"
    monkeypatch.setenv("WSE_TEST_MARK", str(mark))
    with serve_process("tests/apps/slow_app.py:server", extra=["--grace", "10"]) as sp:
        c = WseClient(sp.url)
        c.connect("u")
        closes = []
        c.when.closed(lambda code, reason: closes.append(code))
        job = gevent.spawn(c.call, "slow", 1.5)
        wait_for(lambda: mark.exists() and "started" in mark.read_text())
        assert sp.stop(signal.SIGTERM) == 0  # blocks this greenlet: the client reads after
        wait_for(lambda: closes == [1012])
        assert mark.read_text().split() == ["started", "finished"]
        with pytest.raises(WseError):
            job.get(timeout=5)
        assert "Traceback" not in sp.stderr


def make_cert(tmp_path):
    """A self-signed certificate for 127.0.0.1: (cert path, key path)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                           "-keyout", str(key), "-out", str(cert), "-days", "1",
                           "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                          capture_output=True, timeout=60)
    assert made.returncode == 0, made.stderr
    return cert, key


def test_tls_with_certfile_and_keyfile(tmp_path):
    """`serve` with an app whose options name a certificate speaks wss://."""
    import ssl
    cert, key = make_cert(tmp_path)
    app = tmp_path / "tls_app.py"
    app.write_text(
        "from wse_sync import WseServer\n"
        f"server = WseServer(identify=lambda identity, accept, **kw: accept(identity),\n"
        f"                   certfile={str(cert)!r}, keyfile={str(key)!r})\n"
        "server.register('echo', lambda conn, p: p)\n")
    with serve_process(f"{app}:server") as sp:
        context = ssl.create_default_context(cafile=str(cert))
        c = WseClient(f"wss://127.0.0.1:{sp.port}/", ssl_context=context)
        assert c.connect("secure") is None
        assert c.call("echo", [1, 2]) == [1, 2]
        c.close()
        # plain ws:// to a TLS port does not get a WebSocket
        with pytest.raises(WseError):
            WseClient(sp.url, connect_timeout=3).connect("plain")


def test_tls_from_the_command_line_flags(tmp_path):
    """`serve --certfile/--keyfile` on a plain app; a bad path is one clear line."""
    import ssl
    cert, key = make_cert(tmp_path)
    with serve_process(ECHO, extra=["--certfile", str(cert), "--keyfile", str(key)]) as sp:
        c = WseClient(f"wss://127.0.0.1:{sp.port}/",
                      ssl_context=ssl.create_default_context(cafile=str(cert)))
        c.connect("secure")
        assert c.call("echo", "x") == "x"
        c.close()
    code, _out, err = run_cli(serve_argv(ECHO, free_port(),
                                         extra=["--certfile", str(tmp_path / "missing.pem")]))
    assert code == 2 and "cannot use --certfile/--keyfile" in err and "Traceback" not in err
