"""A first end-to-end check in one process: WseServer + WseClient over loopback."""
import pytest

from helpers import RawWS, inproc_server, wait_for
from wse_sync import WSE_REASON, WseClient, WseError, WseServer


def make_server(**kw):
    def identify(identity, accept, refuse, **_):
        if identity == "bad":
            refuse()
        else:
            accept(identity, {"hi": identity})
    return WseServer(identify=identify, **kw)


def test_connect_call_send():
    server = make_server()
    server.register("echo", lambda conn, p: p)
    seen = []
    server.channel.on("ping", lambda conn, p: conn.send("pong", p))
    server.when.connected(lambda conn: seen.append(("connected", conn.cid)))
    with inproc_server(server) as url:
        c = WseClient(url)
        got = []
        c.channel.on("pong", got.append)
        assert c.connect("u1", {"a": 1}) == {"hi": "u1"}
        assert c.call("echo", [1, "x"]) == [1, "x"]
        c.send("ping", 5)
        wait_for(lambda: got == [5])
        assert "u1" in server.clients
        wait_for(lambda: seen == [("connected", "u1")])
        c.close()


def test_refused():
    server = make_server()
    with inproc_server(server) as url:
        c = WseClient(url)
        with pytest.raises(WseError) as info:
            c.connect("bad")
        assert info.value.code == WSE_REASON.NOT_AUTHORIZED


def test_no_subprotocol_gets_protocol_error():
    with inproc_server(make_server()) as url:
        ws = RawWS(url, protocol=None)
        assert ws.status == 101
        assert ws.recv_until_close() == ("close", 1000, WSE_REASON.PROTOCOL_ERR)
