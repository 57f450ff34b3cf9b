"""workers/nginx.conf, run: Debian's nginx (the real binary, as a non-root
user, everything under a temporary prefix) in front of a real `wse-sync
serve`. The site file is the shipped recipe with only its ports substituted,
so what is tested is what is shipped.

Clients connect from 127.0.0.1 and from 127.0.0.2 (another loopback
address, not a trusted proxy by default), which is what lets the test tell
the client's address from nginx's."""
import contextlib
import os
import re
import shutil
import tempfile
from typing import Optional

import pytest

from deploy_helpers import Proc, child_env, http
from helpers import ROOT, UNIT, RawWS, free_port, serve_process, wait_for
from wse_sync import WseClient
from wse_sync.worker.server import DEFAULTS

pytestmark = pytest.mark.timeout(int(60 * UNIT))

RECIPE = os.path.join(ROOT, "workers", "nginx.conf")
APP = "tests/apps/proxy_app.py:server"
NOBODY = 65534

# the main configuration around the site (Debian's nginx.conf, reduced to
# what an unprivileged nginx needs: every path inside the prefix)
MAIN = """\
worker_processes 1;
pid {prefix}/nginx.pid;
error_log stderr notice;
events {{ worker_connections 64; }}
http {{
    log_format wse '$remote_addr "$request" $status xff="$proxy_add_x_forwarded_for"';
    access_log {prefix}/logs/access.log wse;
    client_body_temp_path {prefix}/temp/client_body;
    proxy_temp_path {prefix}/temp/proxy;
    fastcgi_temp_path {prefix}/temp/fastcgi;
    uwsgi_temp_path {prefix}/temp/uwsgi;
    scgi_temp_path {prefix}/temp/scgi;
    include {prefix}/wse-sync.conf;
}}
"""


def _nginx() -> str:
    found = shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if not found:
        pytest.skip("nginx is not installed (apt-get install nginx-light; .ci/run installs it)")
    return found


def _replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"workers/nginx.conf no longer has exactly one {old!r}"
    return text.replace(old, new)


def site(listen_port: int, upstream_port: int) -> str:
    """workers/nginx.conf with this run's ports (and no IPv6 listener)."""
    with open(RECIPE) as f:
        text = f.read()
    text = _replace_once(text, "    listen 80;\n", f"    listen 127.0.0.1:{listen_port};\n")
    text = _replace_once(text, "    listen [::]:80;\n", "")
    return _replace_once(text, "server 127.0.0.1:4200;", f"server 127.0.0.1:{upstream_port};")


@contextlib.contextmanager
def nginx_in_front(upstream_port: int):
    """nginx on a free 127.0.0.1 port proxying to ``upstream_port``."""
    binary = _nginx()
    prefix = tempfile.mkdtemp(prefix="wse-nginx-")
    port = free_port()
    try:
        for sub in ("logs", "temp"):
            os.mkdir(os.path.join(prefix, sub))
        with open(os.path.join(prefix, "wse-sync.conf"), "w") as f:
            f.write(site(port, upstream_port))
        with open(os.path.join(prefix, "nginx.conf"), "w") as f:
            f.write(MAIN.format(prefix=prefix))
        cmd = [binary, "-p", prefix, "-c", os.path.join(prefix, "nginx.conf"),
               "-g", "daemon off;"]
        setpriv = shutil.which("setpriv")
        if os.geteuid() == 0 and setpriv:  # as root here: run it as nobody, as a user would
            for dirpath, _, files in os.walk(prefix):
                os.chown(dirpath, NOBODY, NOBODY)
                for name in files:
                    os.chown(os.path.join(dirpath, name), NOBODY, NOBODY)
            cmd = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}",
                   "--clear-groups", *cmd]
        p = Proc(cmd, env=child_env(), cwd=prefix)
        try:
            p.wait_line(r"start worker process")
            assert "emerg" not in p.output, p.output
            p.port = port
            p.url = f"ws://127.0.0.1:{port}/"
            p.access_log = os.path.join(prefix, "logs", "access.log")
            yield p
        finally:
            p.stop()
    finally:
        shutil.rmtree(prefix, ignore_errors=True)


def _log(p) -> str:
    with open(p.access_log) as f:
        return f.read()


def whoami(url: str, source: str = "127.0.0.1", forwarded_for: Optional[str] = None) -> str:
    """A raw WebSocket client from ``source``: the server's conn.remote_addr."""
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    ws = RawWS(url, headers=headers, source=source)
    try:
        assert ws.status == 101, ws.response_head
        ws.send_text('["~wse:hi",{"identity":"raw","meta":{}},null]')
        kind, text = ws.recv()
        assert text.startswith('["~wse:welcome"'), text
        ws.send_text('["whoami",null,"s1"]')
        kind, text = ws.recv()
        m = re.fullmatch(r'\["~wse:response","([^"]*)","s1"\]', text)
        assert m, text
        ws.close()
        return m.group(1)
    finally:
        ws.shutdown()


@pytest.fixture(scope="module")
def trusted():
    """serve with the default trusted_proxies (127.0.0.1, ::1), nginx in front."""
    with serve_process(APP) as sp, nginx_in_front(sp.port) as ngx:
        yield sp, ngx


def test_the_recipe_keeps_websockets_open_longer_than_the_server_pings():
    with open(RECIPE) as f:
        text = f.read()
    m = re.search(r"^\s*proxy_read_timeout\s+(\d+)(ms|s|m|h|d)?;", text, re.M)
    assert m, "workers/nginx.conf sets no proxy_read_timeout (nginx's default: 60 s)"
    seconds = int(m.group(1)) * {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600,
                                 "d": 86400}[m.group(2)]
    assert seconds > DEFAULTS["ping_interval"] + DEFAULTS["ping_timeout"]
    for directive in ("proxy_http_version 1.1;", "proxy_set_header Upgrade $http_upgrade;",
                      "proxy_set_header Connection $connection_upgrade;",
                      "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
                      "proxy_buffering off;", "map $http_upgrade $connection_upgrade"):
        assert directive in text, directive


def test_a_wse_client_through_nginx(trusted):
    sp, ngx = trusted
    c = WseClient(ngx.url, rpc_timeout=10 * UNIT)
    pushed = []
    c.channel.on("pushed", pushed.append)
    try:
        welcome = c.connect("alice")
        assert welcome["pid"] > 0
        assert c.call("echo", {"text": "héllo", "n": [1, 2]}) == {"text": "héllo", "n": [1, 2]}
        # nginx on loopback is trusted: the client is the hop nginx appended
        assert c.call("whoami") == "127.0.0.1"
        c.send("push", "from the server")  # a message the server sends by itself
        wait_for(lambda: pushed)
        assert pushed == ["from the server"]
    finally:
        c.close()
    # nginx logs a WebSocket when it ends: 101, the upgrade it proxied
    wait_for(lambda: '"GET / HTTP/1.1" 101' in _log(ngx))


def test_the_client_address_comes_from_the_hop_nginx_appended(trusted):
    sp, ngx = trusted
    # 127.0.0.2 is not a trusted proxy: nginx sends X-Forwarded-For: 127.0.0.2
    assert whoami(ngx.url, source="127.0.0.2") == "127.0.0.2"
    # what the client claims comes first: "203.0.113.9, 127.0.0.2", and the
    # right-most entry that is not a trusted proxy is the real one
    assert whoami(ngx.url, source="127.0.0.2", forwarded_for="203.0.113.9") == "127.0.0.2"
    wait_for(lambda: 'xff="203.0.113.9, 127.0.0.2"' in _log(ngx))
    # a client on a trusted address (loopback here) is a proxy itself: the
    # entry before it is believed ("203.0.113.9, 127.0.0.1")
    assert whoami(ngx.url, source="127.0.0.1", forwarded_for="203.0.113.9") == "203.0.113.9"


def test_nginx_not_trusted_means_nginx_is_the_client():
    with serve_process(APP, extra=["--trusted-proxies", "10.9.9.9"]) as sp, \
            nginx_in_front(sp.port) as ngx:
        assert whoami(ngx.url, source="127.0.0.2", forwarded_for="203.0.113.9") == "127.0.0.1"
        c = WseClient(ngx.url, rpc_timeout=10 * UNIT)
        try:
            c.connect("bob")
            assert c.call("whoami") == "127.0.0.1"
        finally:
            c.close()
        # nginx did send the header; the server did not believe it
        wait_for(lambda: 'xff="203.0.113.9, 127.0.0.2"' in _log(ngx))


def test_health_through_nginx_and_metrics_only_from_this_host(trusted):
    sp, ngx = trusted
    port = int(ngx.url.rsplit(":", 1)[1].split("/")[0])
    status, _, body, _ = http(port, "GET", "/healthz")
    assert status == 200 and b'"broker":"up"' in body
    assert http(port, "GET", "/metrics")[0] == 200            # from 127.0.0.1
    assert http(port, "GET", "/metrics", source="127.0.0.2")[0] == 403
