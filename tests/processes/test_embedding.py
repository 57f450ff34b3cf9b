"""Embedding: mount() beside an existing WSGI app (pywsgi with WseHandler or
gevent-websocket's handler, Flask), WSE_SYNC_BROKER, connect_cluster() from
plain code, and the misuse cases (mount-time errors, a server without
WebSocket, no monkey-patching)."""
import contextlib
import logging
import os
import subprocess
import sys
import threading

import gevent
import pytest
from geventwebsocket.handler import WebSocketHandler
from gevent.pywsgi import WSGIServer

from deploy_helpers import Proc, child_env, http, python, upgrade_request
from helpers import APPS, UNIT, RawWS, broker_stats, serve_process, wait_for
from wse_sync import WSE_ERROR, WseClient, WseError, WseMount, WseServer, connect_cluster, mount
from wse_sync.wsgi import WseHandler, make_wsgi_server

sys.path.insert(0, APPS)
import embed_app  # noqa: E402


@contextlib.contextmanager
def serving(app, *servers, handler_class=WseHandler):
    http_server = WSGIServer(("127.0.0.1", 0), app, handler_class=handler_class, log=None)
    http_server.start()
    try:
        yield http_server.server_port
    finally:
        for s in servers:
            s.shutdown(1001, "", timeout=2)
        http_server.stop(timeout=2)


@contextlib.contextmanager
def broker_process():
    """A `wse-sync broker` on a private ipc endpoint."""
    import tempfile
    tmp = tempfile.mkdtemp(prefix="wse-embed-")
    endpoint = f"ipc://{tmp}/broker.sock"
    p = Proc(python("-m", "wse_sync", "broker", "--bind", endpoint, "--sync-window", "0"))
    try:
        p.wait_line("broker listening")
        yield endpoint
    finally:
        assert p.stop() == 0, p.output


# -- mount() -----------------------------------------------------------------------

@pytest.mark.parametrize("handler", [WseHandler, WebSocketHandler], ids=["WseHandler", "stock"])
def test_mount_leaves_everything_but_upgrades_to_the_app(handler):
    server = embed_app.make_server()
    app = mount(embed_app.plain_app, server)          # path defaults to /ws
    with serving(app, server, handler_class=handler) as port:
        # headers untouched, repeated ones included
        status, headers, body, _ = http(port, "GET", "/hello?q=1", headers={"X-Test": "t"})
        assert (status, body) == (200, b"app GET /hello q=q=1 x=t")
        assert headers["x-app"] == ["plain"] and headers["set-cookie"] == ["a=1", "b=2"]
        # a streaming body stays streamed: five chunks, not one buffered body
        status, headers, body, chunks = http(port, "GET", "/stream")
        assert status == 200 and headers["x-streamed"] == ["yes"]
        assert chunks == [f"chunk{i}\n".encode() for i in range(5)]
        # an exception in the app is the server's to answer, as without the mount
        status, _, _, _ = http(port, "GET", "/boom")
        assert status == 500
        # request bodies reach the app byte for byte
        payload = bytes(range(256)) * 4
        status, _, body, _ = http(port, "POST", "/echo", payload)
        assert (status, body) == (201, payload)
        # a plain GET of the mounted path is the app's
        status, _, body, _ = http(port, "GET", "/ws")
        assert (status, body) == (200, b"app GET /ws q= x=")
        # the WebSocket on /ws is wse_sync's, with the subprotocol selected
        raw = RawWS(f"ws://127.0.0.1:{port}/ws")
        assert raw.status == 101
        assert "Sec-WebSocket-Protocol: wse-default-json" in raw.response_head
        raw.shutdown()
        c = WseClient(f"ws://127.0.0.1:{port}/ws")
        assert c.connect("alice")["cid"] == "alice"
        assert c.call("clients") == ["alice"]
        # and the app keeps answering beside the open socket
        assert http(port, "GET", "/after")[2] == b"app GET /after q= x="
        c.close()


def test_flask_app_with_wsgi_app_replaced_by_the_mount():
    flask = pytest.importorskip("flask")
    app = flask.Flask("embedded")

    @app.route("/")
    def index():
        return "flask index"

    @app.route("/notify", methods=["POST"])
    def notify():
        live.broadcast("notice", flask.request.get_data(as_text=True))
        return "sent", 202

    live = embed_app.make_server()
    app.wsgi_app = mount(app.wsgi_app, live, "/live")
    # the Flask object itself is what the WSGI server gets
    with serving(app, live) as port:
        assert http(port, "GET", "/")[::2] == (200, b"flask index")
        assert http(port, "GET", "/nope")[0] == 404
        raw = RawWS(f"ws://127.0.0.1:{port}/live")
        assert "Sec-WebSocket-Protocol: wse-default-json" in raw.response_head
        raw.shutdown()
        c = WseClient(f"ws://127.0.0.1:{port}/live")
        got = []
        c.channel.on("notice", got.append)
        c.connect("bob")
        status, _, body, _ = http(port, "POST", "/notify", b"hello from a view")
        assert (status, body) == (202, b"sent")
        wait_for(lambda: got == ["hello from a view"])
        # an upgrade on a path nobody mounted is Flask's plain 404
        assert upgrade_request(port, "/elsewhere")[0] == 404
        c.close()


def test_a_path_the_app_also_uses_is_shared():
    """Defined behaviour: upgrades go to wse_sync, plain requests to the app."""
    server = embed_app.make_server()

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/html")])
        return [b"<p>the app's own /ws page</p>"]

    with serving(mount(app, server, "/ws"), server) as port:
        assert http(port, "GET", "/ws")[::2] == (200, b"<p>the app's own /ws page</p>")
        assert http(port, "POST", "/ws", b"x")[::2] == (200, b"<p>the app's own /ws page</p>")
        c = WseClient(f"ws://127.0.0.1:{port}/ws")
        assert c.connect("carol")["cid"] == "carol"
        c.close()


def test_mount_refuses_misuse_at_mount_time():
    server = embed_app.make_server()
    with pytest.raises(ValueError, match="starting with '/'"):
        mount(embed_app.plain_app, server, "ws")
    with pytest.raises(TypeError, match="only a WseServer can be mounted"):
        mount(embed_app.plain_app, embed_app.plain_app)
    with pytest.raises(TypeError, match="WSGI callable"):
        mount("not an app", server)
    only_a = embed_app.make_server(path="/a")
    with pytest.raises(ValueError, match="only answers '/a'"):
        mount(embed_app.plain_app, only_a, "/b")
    assert mount(None, only_a, "/a").wse_for_path("/a") is only_a
    m = WseMount(embed_app.plain_app, {"/x": server})
    with pytest.raises(ValueError, match="already mounted"):
        m.add("/x", embed_app.make_server())


def test_a_server_without_websocket_gets_a_clear_error():
    """wsgiref serves the app; an upgrade on /ws is a 500 naming what is needed."""
    p = Proc(python(os.path.join(APPS, "wsgiref_app.py")))
    try:
        port = int(p.wait_line(r"^port \d+")[0].split()[1])
        status, _, body, _ = http(port, "GET", "/hello")
        assert (status, body) == (200, b"app GET /hello q= x=")
        status, _, body = upgrade_request(port, "/ws")
        assert status == 500
        text = body.decode()
        assert "does not do WebSocket" in text and "WSGIServer/" in text
        assert "wse_sync.wsgi.WseHandler" in text and "wse_sync.gunicorn.Worker" in text
        p.wait_line(r"ERROR \[wse_sync.mount\] .*does not do WebSocket")
        p.wait_line(r"WARNING \[wse_sync.mount\] .*not gevent's \(WSGIServer/")
        # the app goes on working
        assert http(port, "GET", "/after")[0] == 200
    finally:
        p.stop()


def test_an_unpatched_process_is_warned_at_the_first_request(caplog):
    from gevent import monkey
    assert not monkey.is_module_patched("socket")  # the test process is not patched
    server = embed_app.make_server()
    with serving(mount(embed_app.plain_app, server), server) as port:
        with caplog.at_level(logging.WARNING, logger="wse_sync.mount"):
            http(port, "GET", "/hello")
        assert any("monkey-patching is off" in r.getMessage() for r in caplog.records)


# -- WSE_SYNC_BROKER ---------------------------------------------------------------

def test_embedded_servers_join_the_broker_named_by_the_environment(monkeypatch):
    with broker_process() as endpoint:
        monkeypatch.setenv("WSE_SYNC_BROKER", endpoint)
        a, b = embed_app.make_server(), embed_app.make_server()
        with serving(mount(None, a, "/ws"), a) as port_a, \
                serving(mount(None, b, "/ws"), b) as port_b:
            ca, cb = WseClient(f"ws://127.0.0.1:{port_a}/ws"), WseClient(f"ws://127.0.0.1:{port_b}/ws")
            got_a, got_b = [], []
            ca.channel.on("hi", got_a.append)
            cb.channel.on("hi", got_b.append)
            ca.connect("on-a")
            cb.connect("on-b")
            assert a.hub.embedded_broker is None and b.hub.embedded_broker is None
            wait_for(lambda: "on-a" in b.clients and "on-b" in a.clients)
            b.send("on-a", "hi", "from b")
            a.send("on-b", "hi", "from a")
            wait_for(lambda: got_a == ["from b"] and got_b == ["from a"])
            stats = broker_stats(endpoint)
            assert stats["users"] == 2 and len(stats["workers"]) == 2
            ca.close()
            cb.close()


# -- connect_cluster ---------------------------------------------------------------

@contextlib.contextmanager
def cluster_of_two():
    """Two workers on one `wse-sync broker` (two single-worker serves on their own
    ports, so each user's worker is known), one user on each: (endpoint, by_pid)."""
    app = os.path.join(APPS, "embed_app.py") + ":server"
    with broker_process() as endpoint, \
            serve_process(app, workers=1, extra=["--broker", endpoint]) as sa, \
            serve_process(app, workers=1, extra=["--broker", endpoint]) as sb:
        by_pid = {}
        for n, sp in enumerate((sa, sb)):
            c = WseClient(sp.url)
            by_pid.setdefault(c.connect(f"cc{n}")["pid"], []).append(c)
        assert len(by_pid) == 2, by_pid
        yield endpoint, by_pid
        for clients in by_pid.values():
            for c in clients:
                c.close()


def _inboxes(by_pid, type_="notice"):
    boxes = {}
    for clients in by_pid.values():
        for c in clients:
            boxes[c.identity] = box = []
            c.channel.on(type_, box.append)
    return boxes


@pytest.mark.parametrize("background", [None, False], ids=["thread", "hub"])
def test_connect_cluster_sends_broadcasts_drops_and_reads_the_user_map(background):
    with cluster_of_two() as (endpoint, by_pid):
        boxes = _inboxes(by_pid)
        cids = sorted(boxes)
        cluster = connect_cluster(endpoint, background=background)
        assert cluster.background == (background is None)
        try:
            users = cluster.clients
            assert sorted(users) == cids
            for cid in cids:
                assert users[cid].cid == cid and len(users[cid].conns) == 1
            # one user on each worker: the handle reaches both through the broker
            for cid in cids:
                cluster.send(cid, "notice", f"to {cid}")
            cluster.broadcast("notice", "to all")
            cluster.flush()
            wait_for(lambda: all(box == [f"to {cid}", "to all"] for cid, box in boxes.items()))
            # from another thread too (a threaded web server's view)
            if background is None:
                t = threading.Thread(target=cluster.send, args=(cids[0], "notice", "thread"))
                t.start()
                t.join(10)
                wait_for(lambda: boxes[cids[0]][-1] == "thread")
            # drop a user: their socket closes with the reason, the map forgets them
            victim = next(c for cs in by_pid.values() for c in cs if c.identity == cids[-1])
            closed = []
            victim.when.closed(lambda code, reason: closed.append((code, reason)))
            cluster.drop_client(cids[-1], "go away")
            wait_for(lambda: closed == [(1000, "go away")])
            wait_for(lambda: cids[-1] not in cluster.clients)
            assert len(broker_stats(endpoint)["workers"]) == 3  # two workers + the handle
        finally:
            cluster.close()
        wait_for(lambda: len(broker_stats(endpoint)["workers"]) == 2)
        with pytest.raises(WseError) as info:
            cluster.send(cids[0], "notice", "after close")
        assert info.value.code == WSE_ERROR.BROKER_UNAVAILABLE


def test_a_cron_script_reaches_a_user_through_the_environment():
    with cluster_of_two() as (endpoint, by_pid):
        boxes = _inboxes(by_pid)
        cid = sorted(boxes)[0]
        script = ("import sys; from wse_sync import connect_cluster\n"
                  "with connect_cluster() as cluster:\n"
                  "    cluster.send(sys.argv[1], 'notice', 'from cron')\n"
                  "    print('users', len(cluster.clients))\n")
        out = subprocess.run(python("-c", script, cid), env=child_env(WSE_SYNC_BROKER=endpoint),
                             capture_output=True, text=True, timeout=30 * UNIT)
        assert out.returncode == 0, out.stderr
        assert f"users {len(boxes)}" in out.stdout
        wait_for(lambda: boxes[cid] == ["from cron"])


def test_connect_cluster_errors_are_clear(monkeypatch, tmp_path):
    monkeypatch.delenv("WSE_SYNC_BROKER", raising=False)
    with pytest.raises(ValueError, match="WSE_SYNC_BROKER"):
        connect_cluster()
    with pytest.raises(WseError) as info:
        connect_cluster(f"ipc://{tmp_path}/nobody.sock", timeout=0.5 * UNIT)
    assert info.value.code == WSE_ERROR.BROKER_UNAVAILABLE
    assert "did not answer" in info.value.details["reason"]
    gevent.sleep(0)


def test_servers_of_finds_servers_through_wrappers():
    from wse_sync.integrations.wsgi import _find_wse, _router
    server = embed_app.make_server()
    m = mount(embed_app.plain_app, server, "/ws")

    class Middleware:
        def __init__(self, app):
            self.app = app

        def __call__(self, environ, start_response):
            return self.app(environ, start_response)

    wrapped = Middleware(Middleware(m))
    assert _router(wrapped) is m
    assert _find_wse(wrapped, "/ws") is server and _find_wse(wrapped, "/x") is None
    assert _router(embed_app.plain_app) is None
    lone = WseServer(identify=embed_app.identify)
    assert _find_wse(Middleware(lone), "/any") is lone
    assert make_wsgi_server(wrapped, ("127.0.0.1", 0)).application is wrapped


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork() with threads (3.12+)
def test_a_handle_made_before_a_fork_says_so_in_the_child():
    with broker_process() as endpoint:
        cluster = connect_cluster(endpoint)
        try:
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: the handle's thread did not survive the fork
                try:
                    cluster.send("x", "notice")
                    os.write(w, b"no error")
                except WseError as exc:
                    os.write(w, exc.details["reason"].encode())
                finally:
                    os._exit(0)
            os.close(w)
            os.waitpid(pid, 0)
            with os.fdopen(r, "rb") as f:
                assert b"made before a fork" in f.read()
            cluster.send("x", "notice")  # the parent's handle still works
        finally:
            cluster.close()
