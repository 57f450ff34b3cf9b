"""The server transport over a socketpair: the protocol's rules reach the socket."""
import os

import gevent
import pytest
from gevent import socket as gsocket

from helpers import UNIT
from wse_sync.core.frames import OP_TEXT, FrameReader, build_close, build_frame
from wse_sync.socket.transport import SEND_QUEUE_FULL, Transport, TransportLimits


class Peer:
    """The other end of a transport: reads what it sends (unmasked frames from a
    server transport; ``expect_mask`` for a client one) and writes raw bytes."""

    def __init__(self, sock, expect_mask=False):
        self.sock = sock
        self.reader = FrameReader(expect_mask=expect_mask)
        self.events = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, timeout=5 * UNIT):
        with gevent.Timeout(timeout):
            while not self.events:
                data = self.sock.recv(65536)
                if not data:
                    return ("eof",)
                self.events += self.reader.feed(data)
        return self.events.pop(0)


@pytest.fixture
def pair():
    a, b = gsocket.socketpair()
    yield a, Peer(b)
    a.close()
    b.close()


def run_transport(sock, on_message=None, **kw):
    counters = kw.pop("counters", None)
    t = Transport(sock, sock.makefile("rb"), TransportLimits(**kw), counters)
    got = []
    g = gevent.spawn(t.run, on_message or (lambda data: (got.append(data), t.write_message(data))))
    return t, g, got


def test_echo_and_client_close(pair):
    sock, peer = pair
    t, g, got = run_transport(sock)
    peer.send(build_frame(OP_TEXT, b"hello", mask=True))
    assert peer.recv() == ("text", "hello")
    peer.send(build_close(4100, "done", mask=True))
    assert peer.recv() == ("close", 4100, "done")
    assert peer.recv() == ("eof",)  # the server ends TCP after the handshake
    assert g.get(timeout=5 * UNIT) == (4100, "done")
    assert got == ["hello"]


def test_server_close_waits_for_the_answer_then_ends_tcp(pair):
    sock, peer = pair
    t, g, _ = run_transport(sock, close_timeout=30 * UNIT)
    t.close(1000, "wse.by-server")
    assert peer.recv() == ("close", 1000, "wse.by-server")
    assert not t.open and not t.write_message("after close")
    peer.send(build_close(1000, "", mask=True))
    assert g.get(timeout=5 * UNIT) == (1000, "wse.by-server")
    assert peer.recv() == ("eof",)


def test_a_silent_peer_is_cut_after_close_timeout(pair):
    sock, peer = pair
    t, g, _ = run_transport(sock, close_timeout=0.2 * UNIT)
    t.close(1001, "")
    assert peer.recv() == ("close", 1001, "")
    assert g.get(timeout=5 * UNIT) == (1001, "")
    assert peer.recv() == ("eof",)


def test_a_violation_sends_1002_and_ends_tcp_at_once(pair):
    sock, peer = pair
    t, g, got = run_transport(sock, close_timeout=30 * UNIT)
    bad = bytearray(build_frame(OP_TEXT, b"x", mask=True))
    bad[0] |= 0x10
    peer.send(build_frame(OP_TEXT, b"before", mask=True) + bytes(bad))
    assert peer.recv() == ("text", "before")  # answered before the close
    assert peer.recv()[:2] == ("close", 1002)
    assert peer.recv() == ("eof",)  # no wait for close_timeout (30 units)
    peer.sock.shutdown(gsocket.SHUT_WR)
    assert g.get(timeout=5 * UNIT)[0] == 1002


def test_a_peer_that_does_not_read_is_cut_when_the_queue_is_full(pair):
    sock, peer = pair
    t, g, _ = run_transport(sock, max_send_queue=64 * 1024)
    chunk = "x" * 32768
    ok = True
    with gevent.Timeout(10 * UNIT):
        while ok:
            ok = t.write_message(chunk)
            gevent.sleep(0)
    assert g.get(timeout=5 * UNIT) == (1008, SEND_QUEUE_FULL)


def test_a_frame_larger_than_the_send_queue_is_refused_and_the_peer_stays(pair):
    sock, peer = pair
    t, g, _ = run_transport(sock, max_send_queue=64 * 1024)
    # it could never be queued: refused whole, nothing of it written
    assert not t.write_message("x" * (16 * 1024 * 1024))
    assert t.open and t.write_message("small")
    assert peer.recv() == ("text", "small")
    t.close(1000, "")
    assert peer.recv() == ("close", 1000, "")


def test_has_unread_tells_bytes_waiting_in_the_socket(pair):
    """What a deadline asks: did the peer send in time, and is this side slow?"""
    sock, peer = pair
    t = Transport(sock, sock.makefile("rb"))
    assert not t.has_unread()
    peer.send(build_frame(OP_TEXT, b"hi", mask=True))
    gevent.sleep(0.01)
    assert t.has_unread()
    t.abort()
    assert not t.has_unread()


def _pending(peer_sock) -> bytes:
    """What the peer's socket holds now, without waiting (gevent's recv would
    wait: the descriptor itself is non-blocking)."""
    got = b""
    while True:
        try:
            data = os.read(peer_sock.fileno(), 1 << 20)
        except BlockingIOError:
            return got
        if not data:
            return got
        got += data


def test_frames_of_one_loop_turn_after_the_first_go_out_together_at_its_end(pair):
    sock, peer = pair
    t, g, _ = run_transport(sock)
    gevent.sleep(0)  # (a turn of its own)
    frames = [t.frame_for(f"m{i}") for i in range(5)]
    for data in ("m0", "m1", "m2"):
        assert t.write_message(data)
    # the first is on the wire at once, the next two wait for the turn's end
    assert _pending(peer.sock) == frames[0]
    assert t.queued == len(frames[1]) + len(frames[2])
    gevent.sleep(0)
    assert _pending(peer.sock) == frames[1] + frames[2] and t.queued == 0
    # a new turn: its first frame goes at once again; a close keeps the order
    assert t.write_message("m3") and t.write_message("m4")
    t.close(1000, "bye")
    assert [peer.recv() for _ in range(3)] == [("text", "m3"), ("text", "m4"),
                                               ("close", 1000, "bye")]
    g.kill()


def test_a_turn_that_writes_much_is_not_held_back(pair):
    sock, peer = pair
    sock.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_SNDBUF, 1 << 20)  # (room for it all)
    peer.sock.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_RCVBUF, 1 << 20)
    t, g, _ = run_transport(sock)
    gevent.sleep(0)
    for _ in range(100):  # ~100 KB in one turn: most of it leaves before the turn ends
        assert t.write_message("x" * 1000)
    early = len(_pending(peer.sock))
    assert early >= 64 * 1000 and t.queued <= 64 * 1024
    gevent.sleep(0)
    assert early + len(_pending(peer.sock)) == 100 * len(t.frame_for("x" * 1000))
    g.kill()


def test_frames_held_for_the_turns_end_never_count_as_a_full_send_queue(pair):
    sock, peer = pair
    sock.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_SNDBUF, 1 << 20)  # (room for it all)
    peer.sock.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_RCVBUF, 1 << 20)
    t, g, _ = run_transport(sock, max_send_queue=4096)
    gevent.sleep(0)
    for i in range(20):  # 20 KB in one turn to a peer that reads: not a slow peer
        assert t.write_message(f"{i:04d}" + "x" * 996)
    assert t.open
    assert [peer.recv() for _ in range(20)] == [("text", f"{i:04d}" + "x" * 996)
                                                for i in range(20)]
    g.kill()
