"""Every limit a client can run into, over real sockets: its documented outcome,
and a good client that keeps being served while another one misbehaves.

The server runs in this process (``inproc_server``); attackers are raw sockets,
from 127.0.0.2 and up where the limit counts per address.
"""
from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import ssl

import gevent
import gevent.event
import pytest
from gevent import socket
from gevent import ssl as gssl

from helpers import UNIT, RawWS, inproc_server, wait_for
from wse_sync import WSE_ERROR, WseClient, WseError, WseServer
from wse_sync.core.frames import OP_PING, OP_TEXT, build_frame
from wse_sync.integrations.wsgi import make_wsgi_server, tls_context

pytestmark = pytest.mark.timeout(60)


def hi(identity="raw"):
    return json.dumps(["~wse:hi", {"identity": identity, "meta": {}}, None])


def make_server(**options) -> WseServer:
    options.setdefault("close_timeout", 0.3 * UNIT)  # raw peers never answer a close
    server = WseServer(lambda identity, accept, refuse: accept(identity, {"hi": identity}),
                       ping_interval=0, **options)

    @server.register("echo")
    def echo(conn, payload):
        return payload

    return server


@contextlib.contextmanager
def served(server):
    """The server, and a good client connected to it before anything else."""
    with inproc_server(server) as url:
        good = WseClient(url)
        good.connect("good")
        try:
            yield url, good
        finally:
            good.close()


def still_served(good: WseClient) -> None:
    for i in range(3):
        assert good.call("echo", i) == i


def raw_tcp(url: str, source: str = "127.0.0.1") -> socket.socket:
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    sock = socket.create_connection(("127.0.0.1", port), timeout=10 * UNIT,
                                    source_address=(source, 0))
    return sock


def read_http(sock: socket.socket) -> bytes:
    """Everything the server writes until it closes (or 10 s)."""
    out = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except OSError:
            return out
        if not chunk:
            return out
        out += chunk


def ready(url: str, identity: str = "raw") -> RawWS:
    ws = RawWS(url)
    assert ws.status == 101
    ws.send_text(hi(identity))
    ev = ws.recv()
    assert ev[0] == "text" and "~wse:welcome" in ev[1], ev
    return ws


# -- before the upgrade ---------------------------------------------------------
def test_a_request_that_never_ends_gets_408_within_header_timeout():
    server = make_server(header_timeout=0.3 * UNIT)
    with served(server) as (url, good):
        sock = raw_tcp(url, "127.0.0.2")
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")   # and never the blank line
        answer = read_http(sock)
        assert answer.startswith(b"HTTP/1.1 408") and answer.endswith(b"request timeout\n")
        still_served(good)
        assert server.hub.counters["refused.header_timeout"] == 1


def test_a_trickled_request_is_cut_by_the_total_deadline_not_per_byte():
    with served(make_server(header_timeout=0.5 * UNIT)) as (url, good):
        sock = raw_tcp(url, "127.0.0.2")
        sock.settimeout(0.05 * UNIT)
        answer = b""
        for byte in b"GET / HTTP/1.1\r\nHost: " + b"x" * 200:
            try:
                sock.sendall(bytes([byte]))
                answer += sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                break
            if answer:
                break
        assert answer.startswith(b"HTTP/1.1 408"), answer
        still_served(good)


def test_a_full_worker_answers_503_and_takes_connections_again_when_one_leaves():
    server = make_server(max_connections=3)
    with served(server) as (url, good):
        held = [RawWS(url, source="127.0.0.2"), RawWS(url, source="127.0.0.3")]  # + good: 3
        assert [ws.status for ws in held] == [101, 101]
        answer = read_http(raw_tcp(url, "127.0.0.4"))
        assert answer.startswith(b"HTTP/1.1 503") and b"the server is full" in answer
        assert server.hub.counters["refused.max_connections"] == 1
        held.pop().shutdown()
        wait_for(lambda: RawWS(url, source="127.0.0.4").status == 101)
        still_served(good)


def test_connections_per_address_are_capped_but_other_addresses_still_get_in():
    with served(make_server(max_connections_per_ip=2)) as (url, good):
        mine = [RawWS(url, source="127.0.0.2"), RawWS(url, source="127.0.0.2")]
        assert [ws.status for ws in mine] == [101, 101]
        answer = read_http(raw_tcp(url, "127.0.0.2"))
        assert answer.startswith(b"HTTP/1.1 503")
        assert b"too many connections from your address" in answer
        assert RawWS(url, source="127.0.0.3").status == 101
        still_served(good)            # 127.0.0.1 is a trusted proxy: not counted
        assert WseClient(url).connect("second-good") == {"hi": "second-good"}


def test_an_origin_not_allowed_gets_403_before_the_upgrade():
    server = make_server(allowed_origins=["https://app.example"])
    with served(server) as (url, good):
        bad = RawWS(url, headers={"Origin": "https://evil.example"})
        assert bad.status == 403 and "origin not allowed" in bad.body
        assert server.hub.counters["refused.allowed_origins"] == 1
        assert RawWS(url, headers={"Origin": "https://app.example"}).status == 101
        still_served(good)                       # no Origin header: not a browser


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET / HTTP/1.0\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
     b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n", 400),
    (b"GET /\r\n\r\n", 426),   # an HTTP/0.9 GET: this is a WebSocket endpoint
    (b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n", 426),
    (b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
     b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: !!not base64!!\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
     b"Sec-WebSocket-Version: 5\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n", 400),
], ids=["http10", "two-words", "no-version", "bad-key", "old-version"])
def test_a_malformed_upgrade_gets_a_4xx_with_a_body_and_no_traceback(request_bytes, status,
                                                                     caplog, capsys):
    caplog.set_level(logging.INFO)
    with served(make_server()) as (url, good):
        sock = raw_tcp(url, "127.0.0.2")
        sock.sendall(request_bytes)
        answer = read_http(sock)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {status}".encode()) or (
            status == 400 and head.startswith(b"HTTP/1.0 400")), answer
        assert body.strip(), answer
        still_served(good)
    assert "Traceback" not in capsys.readouterr().err
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]


# -- after the upgrade -------------------------------------------------------------
def test_too_many_unauthenticated_connections_get_1013_server_busy():
    gate = gevent.event.Event()

    def identify(identity, accept, refuse):
        if identity.startswith("slow"):
            gate.wait(10 * UNIT)
        accept(identity)

    server = WseServer(identify, ping_interval=0, max_unauthenticated=2)
    server.register("echo", lambda conn, p: p)
    with served(server) as (url, good):
        slow = [RawWS(url), RawWS(url)]
        for i, ws in enumerate(slow):
            ws.send_text(hi(f"slow{i}"))
        busy = None
        for _ in range(50):  # the two slow ones count once their greenlets run
            ws = RawWS(url)
            ev = ws.recv_until_close()
            if ev[:3] == ("close", 1013, "wse.server-busy"):
                busy = ev
                break
        assert busy is not None
        assert server.hub.counters["refused.max_unauthenticated"] >= 1
        still_served(good)
        gate.set()
        for ws in slow:
            assert "~wse:welcome" in ws.recv()[1]


def test_identify_calls_run_at_most_max_identify_at_once():
    gates = {f"slow{i}": gevent.event.Event() for i in range(4)}
    running, seen = [0], [0]

    def identify(identity, accept, refuse):
        running[0] += 1
        seen[0] = max(seen[0], running[0])
        try:
            gates[identity].wait(10 * UNIT)
        finally:
            running[0] -= 1
        accept(identity)

    with inproc_server(WseServer(identify, ping_interval=0, max_identify=1)) as url:
        peers = {name: RawWS(url) for name in gates}
        for name, ws in peers.items():
            ws.send_text(hi(name))
        for gate in gates.values():
            wait_for(lambda: running[0] == 1)
            gate.set()   # whoever holds the slot is welcomed, the next one enters
        for ws in peers.values():
            assert "~wse:welcome" in ws.recv()[1]
    assert seen[0] == 1


def test_rpcs_in_flight_per_connection_beyond_the_limit_are_refused_at_once():
    gate = gevent.event.Event()
    server = make_server(max_rpc_per_conn=2)

    @server.register("wait")
    def wait(conn, payload):
        gate.wait(10 * UNIT)
        return payload

    with served(server) as (url, good):
        ws = ready(url)
        for i in range(5):
            ws.send_text(json.dumps(["wait", i, f"s{i}"]))
        refused = [json.loads(ws.recv()[1]) for _ in range(3)]
        assert {r[0] for r in refused} == {"~wse:response-err"}
        assert {r[1]["code"] for r in refused} == {WSE_ERROR.RP_TOO_MANY}
        assert sorted(r[2] for r in refused) == ["s2", "s3", "s4"]
        still_served(good)                   # its own connection, its own count
        gate.set()
        answers = sorted(json.loads(ws.recv()[1])[2] for _ in range(2))
        assert answers == ["s0", "s1"]


def test_rpcs_in_flight_per_worker_are_capped_too():
    gate = gevent.event.Event()
    server = make_server(max_rpc_per_worker=3)

    @server.register("wait")
    def wait(conn, payload):
        gate.wait(10 * UNIT)
        return payload

    with served(server) as (url, good):
        a, b = ready(url, "a"), ready(url, "b")
        for i in range(2):
            a.send_text(json.dumps(["wait", i, f"a{i}"]))
        wait_for(lambda: server.hub.rpc_running == 2)
        for i in range(2):
            b.send_text(json.dumps(["wait", i, f"b{i}"]))
        refused = json.loads(b.recv()[1])
        assert refused[0] == "~wse:response-err" and refused[2] == "b1"
        assert refused[1]["code"] == WSE_ERROR.RP_TOO_MANY
        gate.set()
        assert {json.loads(a.recv()[1])[2] for _ in range(2)} == {"a0", "a1"}
        assert json.loads(b.recv()[1])[2] == "b0"
        still_served(good)


@pytest.mark.parametrize("limit", [{"max_channel_queue": 3},
                                   {"max_channel_queue_bytes": 1000}], ids=["count", "bytes"])
def test_a_full_channel_queue_closes_1008_and_its_messages_are_dropped(limit):
    gate, returned = gevent.event.Event(), gevent.event.Event()
    calls, errors = [], []
    server = make_server(**limit)
    server.when.error(lambda err, conn: errors.append(err))

    @server.channel.on("work")
    def work(conn, payload):
        calls.append(payload)
        gate.wait(10 * UNIT)
        returned.set()

    with served(server) as (url, good):
        ws = ready(url)
        for i in range(10):
            ws.send_text(json.dumps(["work", "x" * 300 + str(i), None]))
        assert ws.recv_until_close() == ("close", 1008, "wse.channel-queue-full")
        wait_for(lambda: errors)
        assert errors[0].details["reason"] == "wse.channel-queue-full"
        still_served(good)
        wait_for(lambda: server.hub.counters["refused.max_channel_queue"] == 1)
        gate.set()
        returned.wait(5 * UNIT)
        # the one being handled finished; the waiting ones went with the connection
        assert len(calls) == 1


def test_a_frame_flood_over_rate_limit_is_closed_1008():
    server = make_server(rate_limit=(50, 10))
    with served(server) as (url, good):
        ws = ready(url)
        ws.send_raw(b"".join(build_frame(OP_PING, b"p", mask=True) for _ in range(100)))
        ev = ws.recv_until_close()
        assert ev == ("close", 1008, "wse.rate-limit")
        still_served(good)                   # its own bucket


def test_a_bad_rate_limit_fails_at_construction():
    with pytest.raises(ValueError):
        WseServer(lambda identity, accept, refuse: accept(identity), rate_limit=(0, 5))


def test_messages_within_the_rate_limit_pass():
    server = make_server(rate_limit=(1000, 100))
    with served(server) as (url, _good):
        ws = ready(url)
        for i in range(20):
            ws.send_raw(build_frame(OP_TEXT, json.dumps(["echo", i, f"s{i}"]).encode(), mask=True))
        assert sorted(json.loads(ws.recv()[1])[1] for _ in range(20)) == list(range(20))


# -- TLS -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-keyout", str(d / "key.pem"),
                    "-out", str(d / "cert.pem")], check=True, capture_output=True, timeout=60)
    return str(d / "cert.pem"), str(d / "key.pem")


def test_the_tls_context_is_built_once_with_tls12_at_least(cert):
    ctx = tls_context(*cert)
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    http = make_wsgi_server(make_server(), ("127.0.0.1", 0), certfile=cert[0], keyfile=cert[1])
    assert http.ssl_args is not None and http.wrap_socket.__self__.minimum_version >= \
        ssl.TLSVersion.TLSv1_2


def test_a_silent_tls_peer_is_closed_after_tls_handshake_timeout(cert):
    server = make_server(tls_handshake_timeout=0.3 * UNIT, certfile=cert[0], keyfile=cert[1])
    http = make_wsgi_server(server, ("127.0.0.1", 0))
    http.start()
    try:
        url = f"wss://localhost:{http.server_port}/"
        client_ctx = gssl.SSLContext(gssl.PROTOCOL_TLS_CLIENT)  # (gevent's: it must not block)
        client_ctx.load_verify_locations(cafile=cert[0])
        good = WseClient(url, ssl_context=client_ctx)
        good.connect("good")
        silent = socket.create_connection(("127.0.0.1", http.server_port), timeout=10 * UNIT)
        assert silent.recv(100) == b""       # closed, without a word
        still_served(good)
        good.close()
    finally:
        server.shutdown(1001, "", timeout=2)
        http.stop(timeout=2)


def test_a_ping_flood_is_closed_1008_by_the_control_frame_limit():
    server = make_server(control_rate_limit=(20, 50))
    with served(server) as (url, good):
        ws = ready(url)
        ws.send_raw(b"".join(build_frame(OP_PING, b"p", mask=True) for _ in range(500)))
        ev = ws.recv_until_close()
        assert ev == ("close", 1008, "wse.rate-limit")
        still_served(good)


def test_pings_within_the_control_frame_limit_are_answered():
    with served(make_server(control_rate_limit=(20, 50))) as (url, _good):
        ws = ready(url)
        ws.send_raw(b"".join(build_frame(OP_PING, b"p%d" % i, mask=True) for i in range(10)))
        assert [ws.recv() for _ in range(10)] == [("pong", b"p%d" % i) for i in range(10)]


def test_a_message_larger_than_max_send_queue_is_refused_at_the_sender():
    errors = []
    server = make_server(max_send_queue=64 * 1024)
    server.when.error(lambda err, conn: errors.append(err))
    with served(server) as (url, good):
        with pytest.raises(WseError) as err:
            server.broadcast("big", "x" * 100_000)
        assert "larger than max_send_queue" in err.value.details["message"]
        conn = next(iter(server.hub.connections()))
        assert conn.send("big", "x" * 100_000) is False    # one device: False
        server.broadcast("small", "y")                     # and everyone stays
        still_served(good)
        wait_for(lambda: errors)


def test_unauthenticated_connections_per_address_get_1013():
    gate = gevent.event.Event()

    def identify(identity, accept, refuse):
        if identity.startswith("slow"):
            gate.wait(10 * UNIT)
        accept(identity)

    server = WseServer(identify, ping_interval=0, max_unauthenticated_per_ip=2,
                       close_timeout=0.3 * UNIT)
    server.register("echo", lambda conn, p: p)
    with served(server) as (url, good):
        # behind the (trusted) loopback proxy: counted by X-Forwarded-For
        slow = [RawWS(url, headers={"X-Forwarded-For": "203.0.113.7"}) for _ in range(2)]
        for i, ws in enumerate(slow):
            ws.send_text(hi(f"slow{i}"))
        third = RawWS(url, headers={"X-Forwarded-For": "203.0.113.7"})
        assert third.recv_until_close()[:3] == ("close", 1013, "wse.server-busy")
        other = RawWS(url, headers={"X-Forwarded-For": "203.0.113.8"})
        other.send_text(hi("fine"))
        assert "~wse:welcome" in other.recv()[1]
        still_served(good)
        gate.set()
        for ws in slow:
            assert "~wse:welcome" in ws.recv()[1]


@pytest.mark.parametrize("request_bytes", [
    b"GET / HTTP/1.0\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: !!not base64!!\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Version: 5\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
], ids=["http10", "no-version", "bad-key", "old-version"])
def test_the_stock_handler_answers_malformed_upgrades_without_a_traceback(request_bytes,
                                                                          capsys):
    from gevent.pywsgi import WSGIServer
    from geventwebsocket.handler import WebSocketHandler
    server = make_server()
    http = WSGIServer(("127.0.0.1", 0), server, handler_class=WebSocketHandler, log=None)
    http.start()
    try:
        sock = raw_tcp(f"ws://127.0.0.1:{http.server_port}/", "127.0.0.2")
        sock.settimeout(1.0 * UNIT)  # the stock handler keeps the connection alive
        sock.sendall(request_bytes)
        head, _, body = read_http(sock).partition(b"\r\n\r\n")
        assert head[9:10] == b"4", head           # a 4xx status...
        assert body.strip(), head                  # ...with a body
    finally:
        server.shutdown(1001, "", timeout=2)
        http.stop(timeout=2)
    assert "Traceback" not in capsys.readouterr().err
