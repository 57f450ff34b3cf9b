"""The CLI and its configuration as a user meets them: --version and help, every
WseServer option by flag and by WSE_SYNC_<OPTION> (flag > env > code), one-line
errors for startup mistakes, ``stats`` finding a local serve, ``--reload``,
and the logs (formats, --log-config, handler tracebacks, refused logins, a
quiet stop, gunicorn's lines in the same format)."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import gevent
import pytest

from deploy_helpers import child_env, gunicorn
from helpers import APPS, ROOT, UNIT, RawWS, ServerProcess, free_port, wait_for
from wse_sync import WseClient, WseError
from wse_sync.core.options import (DEFAULTS, OPTIONS, OptionError, env_name, flag_name,
                                   from_environ, parse)
from wse_sync.worker.server import WseServer
from wse_sync.core import logs
from wse_sync.serve import runfile
from wse_sync.serve.cli import build_parser
from wse_sync.serve.reload import Watcher

pytestmark = pytest.mark.timeout(int(90 * UNIT))

APP = "tests/apps/config_app.py:server"
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL)"
                       r" \[[\w.]+:\d+\] ")


def wse_sync(*args, env=None, timeout=60 * UNIT):
    return subprocess.run([sys.executable, "-m", "wse_sync", *args], capture_output=True,
                          text=True, cwd=ROOT, env=env or child_env(), timeout=timeout)


def serve(*args, env=None, port=None):
    """A `wse-sync serve` process (config_app unless another app is given first)."""
    port = port or free_port()
    if not args or args[0].startswith("-"):
        args = (APP, *args)
    sp = ServerProcess(["serve", *args, "--port", str(port), "--workers", "1"],
                       env=env or child_env())
    sp.port, sp.url = port, f"ws://127.0.0.1:{port}/"
    return sp


# -- pure: the option table ----------------------------------------------------------

def test_every_option_parses_from_text_and_defaults_match_the_server():
    assert DEFAULTS == {k: v for k, v in WseServer(identify=lambda **_: None).options.items()}
    assert parse("port", "4300") == 4300 and parse("max_message_size", "1_000") == 1000
    assert parse("ping_interval", "2.5") == 2.5
    assert parse("rpc_tracebacks", "yes") is True and parse("rpc_tracebacks", "0") is False
    assert parse("health_path", "off") is None and parse("metrics_path", "/m") == "/m"
    assert parse("rate_limit", "10,20") == (10.0, 20.0) and parse("rate_limit", "off") is None
    assert parse("trusted_proxies", "10.0.0.0/8, ::1") == ("10.0.0.0/8", "::1")
    assert parse("allowed_origins", "https://a.example,https://b.example") == (
        "https://a.example", "https://b.example")
    for name, text in [("port", "x"), ("ping_interval", "-1"), ("ping_interval", "nan"),
                       ("rpc_tracebacks", "maybe"), ("health_path", "healthz"),
                       ("rate_limit", "1,2,3"), ("rate_limit", "5,0.5"),
                       ("trusted_proxies", "not-an-address"), ("max_connections", "-1"),
                       ("ssl_context", "x")]:
        with pytest.raises(OptionError):
            parse(name, text)


def test_environment_is_read_and_a_bad_value_names_its_variable():
    got = from_environ({"WSE_SYNC_PORT": "4301", "WSE_SYNC_RATE_LIMIT": "5", "OTHER": "1",
                        "WSE_SYNC_CONN_PER_USER": "0"})
    assert got == {"port": 4301, "rate_limit": 5.0, "conn_per_user": 0}
    with pytest.raises(OptionError, match="WSE_SYNC_PING_TIMEOUT"):
        from_environ({"WSE_SYNC_PING_TIMEOUT": "soon"})


def test_every_textual_option_has_a_flag_and_an_environment_variable_in_the_help():
    serve_help = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for option in OPTIONS:
        if option.textual:
            assert flag_name(option.name) in serve_help, option.name
            assert env_name(option.name) in serve_help, option.name


def test_configure_checks_like_the_constructor():
    s = WseServer(identify=lambda **_: None)
    s.configure(max_message_size=10, conn_per_user=4, rpc_timeout=3)
    assert (s.options["max_message_size"], s.conn_per_user, s.rpc_timeout) == (10, 4, 3)
    with pytest.raises(TypeError):
        s.configure(no_such_option=1)
    with pytest.raises(ValueError):
        s.configure(rate_limit="fast")
    assert s.options["rate_limit"] is None  # nothing changed by a refused call


def test_watcher_sees_added_changed_and_removed_files(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "__pycache__").mkdir()
    w = Watcher([str(tmp_path)])
    assert w.changed() == []
    (tmp_path / "b.py").write_text("y = 1\n")
    (tmp_path / "__pycache__" / "c.py").write_text("")
    (tmp_path / "notes.txt").write_text("")
    assert w.changed() == [str(tmp_path / "b.py")]
    os.utime(tmp_path / "a.py", ns=(1, 1))
    (tmp_path / "b.py").unlink()
    assert w.changed() == [str(tmp_path / "a.py"), str(tmp_path / "b.py")]


def test_json_log_lines_carry_the_traceback():
    import logging
    record = logging.LogRecord("wse_sync.x", logging.ERROR, __file__, 1, "failed %s", ("it",),
                               None)
    try:
        raise ValueError("bad")
    except ValueError:
        record.exc_info = sys.exc_info()
    line = json.loads(logs.JsonFormatter().format(record))
    assert line["message"] == "failed it" and line["level"] == "ERROR"
    assert "ValueError: bad" in line["exc"] and line["pid"] == os.getpid()


# -- the command line ------------------------------------------------------------------

def test_version_and_help_are_clean():
    from wse_sync import __version__
    out = wse_sync("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"wse-sync {__version__}"
    top = wse_sync("--help").stdout
    assert "==SUPPRESS==" not in top and "_worker" not in top and "``" not in top
    assert "{serve,broker,stats,keys}" in top
    serve_help = wse_sync("serve", "--help").stdout
    assert "(default: 4200)" in serve_help and "(default: /healthz)" in serve_help
    assert "--log-level {critical,error,warning,info,debug}" in serve_help


@pytest.mark.parametrize("args, env, message", [
    (["serve", APP, "--log-level", "loud"], {}, "invalid choice: 'loud'"),
    (["serve", APP], {"WSE_SYNC_LOG_LEVEL": "loud"}, "unknown log level 'loud'"),
    (["serve", APP], {"WSE_SYNC_MAX_CONNECTIONS": "many"},
     "wse-sync: WSE_SYNC_MAX_CONNECTIONS: 'many' is not an integer"),
    (["serve", APP, "--ping-interval", "soon"], {}, "argument --ping-interval"),
    (["serve", "tests/apps/nowhere.py:server"], {},
     "wse-sync: cannot load tests/apps/nowhere.py:server: no such file"),
    (["serve", APP, "--broker", "redis://x"], {}, "not a tcp:// or ipc:// endpoint"),
    (["serve", APP, "--log-config", "/nonexistent.json"], {}, "cannot use --log-config"),
    (["stats", "--port", "1"], {}, "no local `wse-sync serve` on port 1 is running"),
])
def test_startup_mistakes_get_one_clear_line(args, env, message, tmp_path):
    out = wse_sync(*args, env=child_env(XDG_RUNTIME_DIR=str(tmp_path), **env))
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) <= 3, out.stderr


def test_an_app_that_raises_on_import_shows_its_traceback_then_one_line(tmp_path):
    (tmp_path / "broken.py").write_text("from wse_sync import WseServer\nserver = db.connect()\n")
    out = wse_sync("serve", f"{tmp_path}/broken.py:server")
    assert out.returncode == 2
    assert "Traceback" in out.stderr and "broken.py" in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"wse-sync: cannot load {tmp_path}/broken.py:server: NameError: name 'db' is not defined")


def test_a_port_in_use_is_one_line_naming_the_address():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = wse_sync("serve", APP, "--port", str(port), "--workers", "1")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        f"wse-sync: cannot listen on 127.0.0.1:{port}: Address already in use"
        " (is another server running there? pick another --port)")
    assert "Traceback" not in out.stderr


def test_flag_beats_environment_beats_code(tmp_path):
    port = free_port()
    env = child_env(WSE_SYNC_PORT=str(port), WSE_SYNC_MAX_MESSAGE_SIZE="2000",
                    WSE_SYNC_PING_INTERVAL="7", WSE_SYNC_CONN_PER_USER="5",
                    WSE_SYNC_TRUSTED_PROXIES="10.1.2.3", XDG_RUNTIME_DIR=str(tmp_path))
    sp = ServerProcess(["serve", APP, "--workers", "1", "--max-message-size", "3000",
                        "--rate-limit", "100,200", "--health-path", "off"], env=env)
    try:
        sp.wait_line(r"worker \d+ serving")
        c = WseClient(f"ws://127.0.0.1:{port}/")  # WSE_SYNC_PORT chose the port
        c.connect("u1")
        assert c.call("options") == {
            "max_message_size": 3000,        # flag over env (2000) over code (1000)
            "ping_interval": 7.0,            # env over code (30)
            "conn_per_user": 5,              # env over code (2)
            "health_path": None,             # flag: off
            "trusted_proxies": ["10.1.2.3"],
            "rate_limit": [100.0, 200.0]}
        c.close()
    finally:
        sp.stop()
    sp = serve()  # nothing given: the code's values
    try:
        sp.wait_line(r"worker \d+ serving")
        c = WseClient(sp.url)
        c.connect("u1")
        got = c.call("options")
        assert (got["max_message_size"], got["ping_interval"], got["conn_per_user"]) == (
            1000, 30.0, 2)
        c.close()
    finally:
        sp.stop()


@pytest.mark.parametrize("threshold", [None, "0"], ids=["tuned", "left-alone"])
def test_a_serve_worker_tunes_its_gc_and_still_frees_cyclic_garbage(threshold):
    args = () if threshold is None else ("--gc-threshold", threshold)
    sp = serve(*args)
    try:
        sp.wait_line(r"worker \d+ serving")
        c = WseClient(sp.url)
        c.connect("u1")
        got = c.call("gc")
        c.close()
    finally:
        sp.stop()
    if threshold is None:
        assert got["threshold"][0] == DEFAULTS["gc_threshold"] == 7000
        assert got["frozen"] is None or got["frozen"] > 1000   # the app and its imports
    else:
        assert got["threshold"][0] != 7000       # Python's own (700; 2000 on 3.13)
    assert got["freed"] == 100     # cycles still go, with no gc.collect() called


def test_stats_finds_the_broker_of_a_local_serve(tmp_path):
    env = child_env(XDG_RUNTIME_DIR=str(tmp_path))
    a = serve(env=env)
    b = None
    try:
        a.wait_line(r"worker \d+ serving")
        c = WseClient(a.url)
        c.connect("seen")
        wait_for(lambda: len(runfile_entries(tmp_path)) == 1)
        out = wse_sync("stats", env=env)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["users"] == 1
        b = serve(env=env)
        b.wait_line(r"worker \d+ serving")
        wait_for(lambda: len(runfile_entries(tmp_path)) == 2)
        out = wse_sync("stats", env=env)
        assert out.returncode == 2 and "pick one with --port" in out.stderr
        out = wse_sync("stats", "--port", str(b.port), env=env)
        assert out.returncode == 0 and json.loads(out.stdout)["users"] == 0
        c.close()
    finally:
        a.stop()
        if b is not None:
            b.stop()
    assert runfile_entries(tmp_path) == []  # removed on a normal stop


def runfile_entries(tmp_path):
    old = os.environ.get("XDG_RUNTIME_DIR")
    os.environ["XDG_RUNTIME_DIR"] = str(tmp_path)
    try:
        return runfile.live()
    finally:
        if old is None:
            del os.environ["XDG_RUNTIME_DIR"]
        else:
            os.environ["XDG_RUNTIME_DIR"] = old


def test_reload_replaces_the_workers_when_the_app_changes(tmp_path):
    app = tmp_path / "app.py"
    shutil.copy(os.path.join(APPS, "config_app.py"), app)
    sp = serve(f"{app}:server", "--reload")
    try:
        sp.wait_line(r"worker \d+ serving")
        first = WseClient(sp.url)
        first.connect("u1")
        assert first.call("version") == 1
        # a change that does not import: said, and the old workers stay
        app.write_text(app.read_text().replace("VERSION = 1", "VERSION = (") + "\n")
        sp.wait_line(r"--reload: .*app\.py changed, but the app does not load: SyntaxError")
        assert first.call("version") == 1
        app.write_text(app.read_text().replace("VERSION = (", "VERSION = 2"))
        sp.wait_line(r"rolling restart done")
        c = WseClient(sp.url)
        c.connect("u2")
        assert c.call("version") == 2
        c.close()
    finally:
        sp.stop()


# -- logs ----------------------------------------------------------------------------

def test_logs_handler_errors_once_with_traceback_refusals_at_info_and_a_quiet_stop():
    sp = serve("--log-level", "debug")
    try:
        sp.wait_line(r"worker \d+ serving")
        c = WseClient(sp.url)
        c.connect("u1")
        with pytest.raises(WseError):
            c.call("boom")
        sp.wait_line(r"RuntimeError: kaboom")
        nobody = WseClient(sp.url)
        with pytest.raises(WseError):
            nobody.connect("nobody")
        sp.wait_line(r"INFO \[wse_sync\.session:\d+\] refused a login from 127\.0\.0\.1")
        sp.wait_line(r"DEBUG \[wse_sync\.server:\d+\] connection \S+ from 127\.0\.0\.1: user 'u1'")
        c.close()
    finally:
        assert sp.stop() == 0
    text = sp.stderr
    errors = [line for line in sp.lines if " ERROR " in line]
    assert len(errors) == 1 and "wse.server.rp.failed {'rpc': 'boom'}" in errors[0], text
    assert text.count("Traceback") == 1 and 'raise RuntimeError("kaboom")' in text
    assert "Exception ignored" not in text and "Error in atexit" not in text, text
    starts = [line for line in sp.lines if not line.startswith((" ", "Traceback", "RuntimeError"))]
    assert all(TEXT_LINE.match(line) for line in starts), text


def test_json_log_format_and_log_config_file(tmp_path):
    sp = serve("--log-format", "json")
    try:
        sp.wait_line(r'"message": "worker \d+ serving')
    finally:
        sp.stop()
    records = [json.loads(line) for line in sp.lines]
    assert {r["logger"] for r in records} >= {"wse_sync.supervisor", "wse_sync.broker",
                                               "wse_sync.worker"}
    config = tmp_path / "logging.json"
    config.write_text(json.dumps({
        "version": 1, "formatters": {"f": {"format": "CUSTOM|%(levelname)s|%(message)s"}},
        "handlers": {"h": {"class": "logging.StreamHandler", "formatter": "f"}},
        "root": {"level": "INFO", "handlers": ["h"]}}))
    sp = serve("--log-config", str(config))
    try:
        sp.wait_line(r"^CUSTOM\|INFO\|worker \d+ serving")
    finally:
        sp.stop()
    assert all(line.startswith("CUSTOM|") for line in sp.lines), sp.stderr


def test_gunicorn_lines_and_wse_sync_lines_share_one_format():
    with gunicorn("embed_app:application", chdir=APPS, workers=1) as g:
        c = WseClient(g.url)
        c.connect("g1")
        c.close()
    lines = [line for line in g.output.splitlines() if line.strip()]
    assert any("[gunicorn.error:" in line for line in lines)
    assert any("[wse_sync." in line for line in lines)
    odd = [line for line in lines if not TEXT_LINE.match(line)]
    assert not odd, "\n".join(lines)


@pytest.mark.parametrize("how,per_ip,identify", [
    ("code", 2, 1), ("environment", 3, 2), ("flag", 4, 3), ("flag-off", 0, 3)])
def test_the_admission_limits_take_effect_however_they_are_given(how, per_ip, identify):
    """max_unauthenticated_per_ip and max_identify in serve workers: the code's
    values, the environment's over them, a flag's over both (they were read
    when WseServer was built, before serve applied flags)."""
    env, extra = {}, []
    if how != "code":
        env = {"WSE_SYNC_MAX_UNAUTHENTICATED_PER_IP": "3", "WSE_SYNC_MAX_IDENTIFY": "2"}
    if how.startswith("flag"):
        extra = ["--max-unauthenticated-per-ip", str(per_ip), "--max-identify", str(identify)]
    port = free_port()
    sp = ServerProcess(["serve", "tests/apps/limits_app.py:server", "--workers", "1",
                        "--port", str(port), *extra], env=child_env(**env))
    url = f"ws://127.0.0.1:{port}/"
    try:
        sp.wait_line(r"worker \d+ serving")
        # unauthenticated sockets from one address that is not a trusted proxy
        held = [RawWS(url, source="127.0.0.2") for _ in range(per_ip or 8)]
        extra_ws = RawWS(url, source="127.0.0.2")
        if per_ip:
            assert extra_ws.recv_until_close() == ("close", 1013, "wse.server-busy")
        else:
            extra_ws.send_text('["~wse:hi",{"identity":"more","meta":{}},null]')
            assert extra_ws.recv()[0] == "text"  # welcomed
        for ws in held + [extra_ws]:
            ws.shutdown()
        # identify calls at once: as many as max_identify
        clients = [WseClient(url) for _ in range(identify + 1)]
        gevent.joinall([gevent.spawn(c.connect, f"p{i}") for i, c in enumerate(clients)],
                       timeout=20 * UNIT, raise_error=True)
        assert clients[0].call("peak") == identify
        for c in clients:
            c.close()
    finally:
        sp.stop()
