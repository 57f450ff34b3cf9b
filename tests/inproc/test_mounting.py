"""Mounting WseServers: several paths on one WSGI server, beside a plain WSGI app,
and under gevent-websocket's stock handler."""
import contextlib

import pytest
from gevent import socket as gsocket
from gevent.pywsgi import WSGIServer
from geventwebsocket.handler import WebSocketHandler

from helpers import UNIT, RawWS, wait_for
from wse_sync import WSE_ERROR, WSE_REASON, WseClient, WseError, WseMount, WseServer, mount
from wse_sync.wsgi import make_wsgi_server


def make_server(name, **kw):
    def identify(identity, accept):
        accept(identity, {"server": name})

    server = WseServer(identify=identify, **kw)
    server.register("name", lambda conn, payload: name)
    return server


@contextlib.contextmanager
def serving(app, *servers, handler_class=None):
    """Serve ``app`` on a free port; yields the port. Shuts ``servers`` down after."""
    if handler_class is None:
        http = make_wsgi_server(app, ("127.0.0.1", 0))
    else:
        http = WSGIServer(("127.0.0.1", 0), app, handler_class=handler_class, log=None)
    http.start()
    try:
        yield http.server_port
    finally:
        for s in servers:
            s.shutdown(1001, "", timeout=2)
        http.stop(timeout=2)


def http_request(port, method, path, body=b"", headers=None):
    """One HTTP/1.1 request over a gevent socket; returns (status, headers, body)."""
    sock = gsocket.create_connection(("127.0.0.1", port), timeout=5 * UNIT)
    try:
        lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close",
                 f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    hdrs = {}
    for line in header_lines:
        k, _, v = line.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    if hdrs.get("transfer-encoding") == "chunked":
        out = b""
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        rest = out
    return int(status_line.split(" ")[1]), hdrs, rest


def plain_app(environ, start_response):
    """An ordinary WSGI app that shows what it received."""
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else b""
    text = (f"{environ['REQUEST_METHOD']} {environ['PATH_INFO']} "
            f"q={environ.get('QUERY_STRING', '')} x={environ.get('HTTP_X_TEST', '')} "
            f"ws={'wsgi.websocket' in environ} body=").encode() + body
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-App", "plain"),
                              ("Content-Length", str(len(text)))])
    return [text]


def test_two_servers_on_two_paths():
    s1, s2 = make_server("one"), make_server("two")
    joined1, joined2 = [], []
    s1.when.joined(lambda client, meta: joined1.append(client.cid))
    s2.when.joined(lambda client, meta: joined2.append(client.cid))
    app = WseMount(None, {"/a": s1, "/b": s2})
    with serving(app, s1, s2) as port:
        a = WseClient(f"ws://127.0.0.1:{port}/a")
        b = WseClient(f"ws://127.0.0.1:{port}/b")
        assert a.connect("ua") == {"server": "one"}
        assert b.connect("ub") == {"server": "two"}
        assert a.call("name") == "one"
        assert b.call("name") == "two"
        wait_for(lambda: joined1 and joined2)
        assert joined1 == ["ua"] and joined2 == ["ub"]
        assert list(s1.clients) == ["ua"] and list(s2.clients) == ["ub"]
        # a broadcast on one server stays there
        got_a, got_b = [], []
        a.channel.on("news", got_a.append)
        b.channel.on("news", got_b.append)
        b.channel.on("end", got_b.append)
        s1.broadcast("news", 1)
        s2.broadcast("end", "end")
        wait_for(lambda: got_a == [1] and got_b == ["end"])
        # a third path: no server there, the upgrade is answered 404
        ws = RawWS(f"ws://127.0.0.1:{port}/c")
        assert ws.status == 404
        ws.shutdown()
        with pytest.raises(WseError) as info:
            WseClient(f"ws://127.0.0.1:{port}/c").connect("x")
        assert info.value.code == WSE_ERROR.WS_CLIENT_ERROR
        # the mounted paths are exact
        assert RawWS(f"ws://127.0.0.1:{port}/a/more").status == 404
        a.close()
        b.close()


def test_mount_add_and_duplicate_path():
    s1, s2 = make_server("one"), make_server("two")
    m = WseMount()
    assert m.add("/x", s1) is m
    with pytest.raises(ValueError):
        m.add("/x", s2)
    m.add("/y", s2)
    assert m.wse_for_path("/x") is s1 and m.wse_for_path("/y") is s2
    assert m.wse_for_path("/z") is None
    with serving(m, s1, s2) as port:
        c = WseClient(f"ws://127.0.0.1:{port}/y")
        assert c.connect("u") == {"server": "two"}
        c.close()


def test_server_next_to_a_plain_wsgi_app():
    server = make_server("ws")
    app = mount(plain_app, server, "/ws")
    with serving(app, server) as port:
        status, headers, body = http_request(port, "GET", "/index?x=1", headers={"X-Test": "t"})
        assert status == 200
        assert headers["x-app"] == "plain"
        assert body == b"GET /index q=x=1 x=t ws=False body="
        status, headers, body = http_request(port, "POST", "/submit", b"payload \x00\xff")
        assert status == 200
        assert body == b"POST /submit q= x= ws=False body=payload \x00\xff"
        # a plain GET of the WebSocket path is not an upgrade: the app answers it
        status, headers, body = http_request(port, "GET", "/ws")
        assert status == 200 and body.startswith(b"GET /ws ")
        # WebSocket on /ws reaches the WseServer
        c = WseClient(f"ws://127.0.0.1:{port}/ws")
        assert c.connect("sock") == {"server": "ws"}
        assert c.call("name") == "ws"
        # while the app keeps answering plain requests
        status, _, body = http_request(port, "GET", "/still")
        assert status == 200 and body.startswith(b"GET /still ")
        # an upgrade on another path is left to the app, as plain HTTP
        ws = RawWS(f"ws://127.0.0.1:{port}/elsewhere")
        assert ws.status == 200
        ws.shutdown()
        c.close()


def test_server_with_a_path_option_refuses_other_paths():
    server = make_server("only", path="/only")
    with serving(server, server) as port:
        assert RawWS(f"ws://127.0.0.1:{port}/other").status == 404
        status, _, _ = http_request(port, "GET", "/other")
        assert status == 404
        status, headers, _ = http_request(port, "GET", "/only")
        assert status == 426 and headers["upgrade"] == "websocket"
        c = WseClient(f"ws://127.0.0.1:{port}/only")
        assert c.connect("u") == {"server": "only"}
        c.close()


def test_server_under_the_stock_gevent_websocket_handler():
    server = make_server("stock")
    conns, left = [], []
    server.when.connected(conns.append)
    server.when.left(lambda client, code, reason: left.append((client.cid, code, reason)))
    server.channel.on("ping", lambda conn, p: conn.send("pong", p))
    with serving(server, server, handler_class=WebSocketHandler) as port:
        url = f"ws://127.0.0.1:{port}/"
        c = WseClient(url)
        got = []
        c.channel.on("pong", got.append)
        c.register("client-side", lambda p: p + 1)
        assert c.connect("stocky", {"k": 1}) == {"server": "stock"}
        assert c.call("name") == "stock"
        c.send("ping", "p")
        wait_for(lambda: got == ["p"] and conns)
        assert conns[0].call("client-side", 1) == 2
        assert conns[0].meta == {"k": 1}
        ws = RawWS(url)
        assert "Sec-WebSocket-Protocol: wse-default-json" in ws.response_head
        ws.shutdown()
        # without the subprotocol: refused after the upgrade, as with WseHandler
        raw = RawWS(url, protocol=None)
        assert raw.recv_until_close() == ("close", 1000, WSE_REASON.PROTOCOL_ERR)
        raw.shutdown()
        c.close(reason="done")
        wait_for(lambda: left)
        assert left == [("stocky", 1000, "done")]


def test_mount_under_the_stock_handler():
    s1, s2 = make_server("one"), make_server("two")
    app = WseMount(plain_app, {"/a": s1, "/b": s2})
    with serving(app, s1, s2, handler_class=WebSocketHandler) as port:
        a = WseClient(f"ws://127.0.0.1:{port}/a")
        b = WseClient(f"ws://127.0.0.1:{port}/b")
        assert a.connect("x") == {"server": "one"}
        assert b.connect("y") == {"server": "two"}
        status, _, body = http_request(port, "GET", "/page")
        assert status == 200 and body.startswith(b"GET /page ")
        a.close()
        b.close()
