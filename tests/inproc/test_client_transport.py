"""The client on the server's socket loop: a Transport with side=CLIENT over a
socketpair, and WseClient's back-pressure against a server that does not read."""
import base64
import hashlib
import time

import gevent
import pytest
import ujson
from gevent import socket as gsocket
from gevent.server import StreamServer

from helpers import UNIT
from test_transport_socketpair import Peer
from wse_sync import WseClient
from wse_sync.core.frames import OP_TEXT, FrameReader, build_close, build_frame
from wse_sync.core.websocket import CLIENT
from wse_sync.socket import client as client_module
from wse_sync.socket.transport import Transport, TransportLimits


@pytest.fixture
def client_pair():
    a, b = gsocket.socketpair()
    yield a, Peer(b, expect_mask=True)
    a.close()
    b.close()


def test_a_client_transport_masks_its_frames_and_closes_first(client_pair):
    sock, server = client_pair
    t = Transport(sock, sock.makefile("rb"), TransportLimits(close_timeout=5 * UNIT),
                  side=CLIENT)
    got = []
    g = gevent.spawn(t.run, got.append)
    assert t.write_message("hi")
    assert server.recv() == ("text", "hi")  # (the reader refuses unmasked frames)
    server.sock.sendall(build_frame(OP_TEXT, b"welcome"))
    gevent.sleep(0.05 * UNIT)
    assert got == ["welcome"]
    t.close(1000, "bye")
    assert server.recv() == ("close", 1000, "bye")
    server.sock.sendall(build_close(1000, "bye"))
    assert g.get(timeout=5 * UNIT) == (1000, "bye")
    assert t.protocol.close_rcvd == (1000, "bye")


def test_a_client_transport_refuses_masked_frames_from_the_server(client_pair):
    sock, server = client_pair
    t = Transport(sock, sock.makefile("rb"), TransportLimits(close_timeout=0.2 * UNIT),
                  side=CLIENT)
    g = gevent.spawn(t.run, lambda data: None)
    server.sock.sendall(build_frame(OP_TEXT, b"masked", mask=True))
    assert server.recv()[:2] == ("close", 1002)
    g.get(timeout=5 * UNIT)  # the server never ends TCP: cut after close_timeout
    assert t.protocol.failure is not None


def test_wait_sent_returns_once_the_queue_is_written(client_pair):
    sock, server = client_pair
    t = Transport(sock, sock.makefile("rb"), side=CLIENT)
    g = gevent.spawn(t.run, lambda data: None)
    big = "x" * (2 << 20)
    assert t.write_message(big)
    assert t.queued > 0  # more than the socket buffer
    drained = []
    gevent.spawn(lambda: drained.append(t.wait_sent(5 * UNIT)))
    assert server.recv(timeout=10 * UNIT) == ("text", big)
    gevent.sleep(0.05 * UNIT)
    assert drained == [True] and t.queued == 0
    t.abort()
    g.get(timeout=5 * UNIT)


def test_a_client_send_waits_while_the_queue_is_over_the_high_water(monkeypatch):
    """A server that stops reading: sends block (as a blocking write would)
    instead of queueing without end, and go on once it reads again."""
    monkeypatch.setattr(client_module, "SEND_HIGH_WATER", 64 * 1024)
    pause = 0.5 * UNIT
    received = []

    def handle(sock, _addr):
        rfile = sock.makefile("rb")
        key = ""
        while True:
            line = rfile.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode().partition(":")
            if name.lower() == "sec-websocket-key":
                key = value.strip()
        accept = base64.b64encode(hashlib.sha1(
            (key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
        sock.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                      "Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + "\r\n"
                      "Sec-WebSocket-Protocol: wse-default-json\r\n\r\n").encode())
        reader = FrameReader(expect_mask=True)
        events = []
        while not events:
            events += reader.feed(rfile.read1(65536))
        sock.sendall(build_frame(OP_TEXT, ujson.dumps(["~wse:welcome", "hi", None]).encode()))
        gevent.sleep(pause)  # not reading: the client's queue grows
        while True:
            data = sock.recv(65536)
            if not data:
                return
            for ev in reader.feed(data):
                if ev[0] == "text":
                    received.append(ev[1])
                elif ev[0] == "close":
                    sock.sendall(build_close(ev[1], ev[2]))
                    return

    server = StreamServer(("127.0.0.1", 0), handle)
    server.start()
    try:
        c = WseClient(f"ws://127.0.0.1:{server.server_port}/", rpc_timeout=5 * UNIT)
        assert c.connect("bp") == "hi"
        chunk = "y" * (256 * 1024)
        started = time.monotonic()
        most = 0
        for _ in range(40):  # 10 MiB, far more than the socket buffers
            c.send("blob", chunk)
            most = max(most, c._transport.queued)
        assert most <= 64 * 1024 + len(chunk) + 64
        assert time.monotonic() - started >= pause * 0.5  # it did wait for the server
        c.close()
        assert len(received) == 40
    finally:
        server.stop(timeout=2)
