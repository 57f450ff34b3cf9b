"""A first end-to-end check in one process: WseServer + WseClient over loopback."""
import pytest

from helpers import RawWS, inproc_server, wait_for
from wse_sync import WSE_REASON, WSE_STATUS, WseClient, WseError, WseServer


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


def test_a_connection_and_a_user_name_their_server():
    server = make_server()
    seen = []
    server.when.connected(lambda conn: seen.append((conn.server, conn.client.server)))
    with inproc_server(server) as url:
        c = WseClient(url)
        c.connect("u1")
        wait_for(lambda: seen == [(server, server)])
        assert server.clients["u1"].server is server
        c.close()


def test_none_turns_conn_per_user_and_the_rpc_timeout_off():
    """None is a value (no limit, no timeout), not 'the default'."""
    server = make_server(conn_per_user=None, rpc_timeout=None)
    assert (server.conn_per_user, server.rpc_timeout) == (None, None)
    assert (server.config.conn_per_user, server.config.rpc_timeout) == (None, None)
    legacy = make_server(connPerUser=None, tO=None)
    assert (legacy.connPerUser, legacy.tO) == (None, None)
    default = make_server()
    assert (default.conn_per_user, default.rpc_timeout) == (1, 20.0)
    with inproc_server(server) as url:
        clients = [WseClient(url) for _ in range(3)]
        for c in clients:
            c.connect("same")
        wait_for(lambda: len(server.hub.connections()) == 3)
        assert all(c.status == WSE_STATUS.READY for c in clients)  # nobody evicted
        for c in clients:
            c.close()


def test_the_options_dict_reads_the_config_live_and_writes_through_configure():
    server = make_server()
    options = server.options
    server.configure(max_message_size=10)
    assert options["max_message_size"] == 10 == server.max_message_size
    options["max_message_size"] = 20
    assert server.config.max_message_size == 20
    with pytest.raises(KeyError):
        options["no_such_option"] = 1
    with pytest.raises(ValueError):
        options["rate_limit"] = (1, 0)  # a burst below 1: checked as configure() checks it
    assert dict(options) == server.config.options()
    with pytest.raises(AttributeError):
        server.protocol = None
