"""Messages both ways, broadcast, users with several devices, disconnect events."""
from collections import Counter

import gevent
import pytest
from gevent.event import Event

from helpers import UNIT, inproc_server, wait_for
from wse_sync import WSE_ERROR, WSE_REASON, WSE_STATUS, WseClient, WseError, WseServer


def accept_all(identity, accept, **_):
    accept(identity, {"hello": identity})


def make_server(**kw):
    server = WseServer(identify=accept_all, **kw)
    server.register("echo", lambda conn, payload: payload)
    return server


class Inbox:
    """Collects what a client receives on some channel types."""

    def __init__(self, client, *types):
        self.got = []
        for t in types:
            client.channel.on(t, lambda payload, t=t: self.got.append((t, payload)))

    def count(self, type_):
        return sum(1 for t, _ in self.got if t == type_)


def settle(server, url):
    """A round trip through the broker: whatever the server had sent through it
    before (send/broadcast/drop/left) has been carried out when this returns."""
    left = []
    handler = server.when.left(lambda client, code, reason: left.append(client.cid))
    c = WseClient(url)
    c.connect("~settle")
    c.close()
    wait_for(lambda: "~settle" in left)
    server.when.off("left", handler)


# -- client -> server ----------------------------------------------------------

def test_channel_on_as_function_and_decorator_then_off():
    server = make_server()
    got = []

    def on_chat(conn, payload):
        got.append(("chat", conn.cid, payload))

    server.channel.on("chat", on_chat)

    @server.channel.on("dec")
    def on_dec(conn, payload):
        got.append(("dec", conn.cid, payload))

    assert on_dec.__name__ == "on_dec"  # the decorator returns the function
    ignored = []
    server.when.ignored(lambda conn, type_, payload: ignored.append((conn.cid, type_, payload)))
    with inproc_server(server) as url:
        c = WseClient(url)
        c.connect("u1")
        c.send("chat", {"text": "hi"})
        c.send("dec", [1, 2])
        wait_for(lambda: len(got) == 2)
        assert got == [("chat", "u1", {"text": "hi"}), ("dec", "u1", [1, 2])]
        server.channel.off("chat", on_chat)
        c.send("chat", "after off")
        wait_for(lambda: ignored)
        assert ignored == [("u1", "chat", "after off")]
        assert len(got) == 2
        c.close()


def test_several_handlers_for_one_type_all_run():
    server = make_server()
    got = []
    server.channel.on("t", lambda conn, p: got.append(("a", p)))
    server.channel.on("t", lambda conn, p: got.append(("b", p)))
    with inproc_server(server) as url:
        c = WseClient(url)
        c.connect("u")
        c.send("t", 1)
        wait_for(lambda: len(got) == 2)
        assert sorted(got) == [("a", 1), ("b", 1)]
        c.close()


def test_ignored_event_on_the_server():
    server = make_server()
    ignored = []
    server.when.ignored(lambda conn, type_, payload: ignored.append((conn, type_, payload)))
    with inproc_server(server) as url:
        c = WseClient(url)
        c.connect("u2")
        c.send("nobody-listens", {"x": 1})
        c.send("no-payload")
        wait_for(lambda: len(ignored) == 2)
        conn, type_, payload = ignored[0]
        assert conn.cid == "u2"
        assert (type_, payload) == ("nobody-listens", {"x": 1})
        assert ignored[1][1:] == ("no-payload", None)
        c.close()


# -- server -> client ----------------------------------------------------------

def test_server_to_client_conn_identity_and_server_send():
    server = make_server()
    conns = []
    server.when.connected(conns.append)
    with inproc_server(server) as url:
        c = WseClient(url)
        inbox = Inbox(c, "via-conn", "via-client", "via-server")
        ignored = []
        c.when.ignored(lambda type_, payload: ignored.append((type_, payload)))
        c.connect("u3")
        wait_for(lambda: conns)
        conn = conns[0]
        assert conn.send("via-conn", {"n": 1}) is True
        server.clients["u3"].send("via-client", [1, 2])
        conn.client.send("via-client", "again")
        server.send("u3", "via-server")
        server.send("u3", "not-handled", 5)
        wait_for(lambda: len(inbox.got) == 4 and ignored)
        assert inbox.got == [("via-conn", {"n": 1}), ("via-client", [1, 2]),
                             ("via-client", "again"), ("via-server", None)]
        assert ignored == [("not-handled", 5)]
        c.close()
        wait_for(lambda: conn.ready_state == 3)
        assert conn.send("late") is False


def test_server_reply_from_a_channel_handler():
    server = make_server()
    server.channel.on("ping", lambda conn, p: conn.send("pong", p))
    with inproc_server(server) as url:
        c = WseClient(url)
        inbox = Inbox(c, "pong")
        c.connect("u")
        c.send("ping", "x")
        wait_for(lambda: inbox.got == [("pong", "x")])
        c.close()


def test_broadcast_reaches_every_connection_once():
    server = make_server(conn_per_user=2)
    with inproc_server(server) as url:
        clients = []
        for cid in ("a", "b", "c", "c"):  # "c" has two devices
            cl = WseClient(url)
            cl.connect(cid)
            clients.append((cl, Inbox(cl, "news", "end")))
        wait_for(lambda: len(server.clients) == 3)
        server.broadcast("news", {"headline": 1})
        settle(server, url)
        server.broadcast("end")
        wait_for(lambda: all(inbox.count("end") >= 1 for _, inbox in clients))
        for _, inbox in clients:
            assert inbox.got[0] == ("news", {"headline": 1})
            assert inbox.count("news") == 1
        for cl, _ in clients:
            cl.close()


def test_send_to_one_user_and_broadcast_together():
    server = make_server()
    server.channel.on("shout", lambda conn, p: (conn.send("personal", p),
                                               server.broadcast("all", p)))
    with inproc_server(server) as url:
        a, b = WseClient(url), WseClient(url)
        ia = Inbox(a, "personal", "all", "end")
        ib = Inbox(b, "personal", "all", "end")
        a.connect("A")
        b.connect("B")
        a.send("shout", "hey")
        wait_for(lambda: len(ia.got) == 2 and len(ib.got) == 1)
        server.send("B", "personal", "only B")
        server.broadcast("all", "everyone")
        wait_for(lambda: len(ia.got) == 3 and len(ib.got) == 3)
        settle(server, url)
        server.broadcast("end")
        wait_for(lambda: ia.count("end") and ib.count("end"))
        assert ia.got == [("personal", "hey"), ("all", "hey"), ("all", "everyone"), ("end", None)]
        assert ib.got == [("all", "hey"), ("personal", "only B"), ("all", "everyone"),
                          ("end", None)]
        a.close()
        b.close()


def test_send_to_unknown_cid_is_a_no_op():
    server = make_server()
    with inproc_server(server) as url:
        c = WseClient(url)
        inbox = Inbox(c, "x", "end")
        c.connect("known")
        server.send("unknown", "x", 1)
        server.send(12345, "x", 2)
        settle(server, url)
        server.send("known", "end")
        wait_for(lambda: inbox.got)
        assert inbox.got == [("end", None)]
        assert c.call("echo", "still up") == "still up"
        c.close()


# -- several devices of one user -------------------------------------------------

def test_conn_per_user_closes_the_oldest_connection():
    server = make_server()
    assert server.conn_per_user == 1
    disconnected = []
    server.when.disconnected(lambda conn, code, reason: disconnected.append((conn.conn_id, code,
                                                                            reason)))
    conns = []
    server.when.connected(conns.append)
    with inproc_server(server) as url:
        first, second = WseClient(url), WseClient(url)
        closed = []
        first.when.closed(lambda code, reason: closed.append((code, reason)))
        first.connect("same")
        wait_for(lambda: len(conns) == 1)
        second.connect("same")
        wait_for(lambda: closed and disconnected)
        assert closed == [(1000, WSE_REASON.CLIENTS_CONCURRENCY)]
        assert disconnected == [(conns[0].conn_id, 1000, WSE_REASON.CLIENTS_CONCURRENCY)]
        assert first.status == WSE_STATUS.OFFLINE
        assert second.status == WSE_STATUS.READY
        assert second.call("echo", 1) == 1
        wait_for(lambda: len(conns) == 2)
        assert list(server.clients["same"].conns) == [conns[1].conn_id]
        second.close()


def test_conn_per_user_alias_allows_several_devices():
    server = make_server(connPerUser=2)
    assert server.conn_per_user == 2 and server.connPerUser == 2
    with inproc_server(server) as url:
        devices = [WseClient(url) for _ in range(3)]
        closed = [[] for _ in devices]
        for d, box in zip(devices, closed):
            d.when.closed(lambda code, reason, box=box: box.append((code, reason)))
        devices[0].connect("multi")
        devices[1].connect("multi")
        assert len(server.clients["multi"].conns) == 2
        devices[2].connect("multi")
        wait_for(lambda: closed[0])
        assert closed[0] == [(1000, WSE_REASON.CLIENTS_CONCURRENCY)]
        assert devices[1].call("echo", "b") == "b"
        assert devices[2].call("echo", "c") == "c"
        assert closed[1] == closed[2] == []
        assert len(server.clients["multi"].conns) == 2
        devices[1].close()
        devices[2].close()


def test_joined_once_for_the_first_device_left_once_after_the_last():
    server = make_server(conn_per_user=3)
    joined, left = [], []
    server.when.joined(lambda client, meta: joined.append((client.cid, meta)))
    server.when.left(lambda client, code, reason: left.append((client.cid, code, reason)))
    with inproc_server(server) as url:
        devices = [WseClient(url) for _ in range(3)]
        for i, d in enumerate(devices):
            d.connect("dev", {"device": i})
        wait_for(lambda: len(server.clients["dev"].conns) == 3)
        devices[0].close()
        devices[1].close()
        settle(server, url)
        assert [j for j in joined if j[0] == "dev"] == [("dev", {"device": 0})]
        assert [e for e in left if e[0] == "dev"] == []
        assert "dev" in server.clients
        devices[2].close(reason="last one")
        wait_for(lambda: [e for e in left if e[0] == "dev"])
        settle(server, url)
        assert [e for e in left if e[0] == "dev"] == [("dev", 1000, "last one")]
        assert "dev" not in server.clients
        assert joined.count(("dev", {"device": 0})) == 1


# -- disconnect events -------------------------------------------------------------

def test_disconnected_reports_the_clients_code_and_reason():
    server = make_server()
    disconnected, left = [], []
    server.when.disconnected(lambda conn, code, reason: disconnected.append((conn.cid, code,
                                                                            reason)))
    server.when.left(lambda client, code, reason: left.append((client.cid, code, reason)))
    with inproc_server(server) as url:
        c = WseClient(url)
        c.connect("leaver")
        c.close(reason="see you", code=4100)
        assert c.status == WSE_STATUS.OFFLINE
        wait_for(lambda: disconnected and left)
        assert disconnected == [("leaver", 4100, "see you")]
        assert left == [("leaver", 4100, "see you")]
        d = WseClient(url)
        d.connect("default")
        d.close()
        wait_for(lambda: len(disconnected) == 2)
        assert disconnected[1] == ("default", 1000, WSE_REASON.BY_CLIENT)
        assert len(server.clients) == 0


def test_drop_closes_with_by_server():
    server = make_server()
    disconnected, conns = [], []
    server.when.connected(conns.append)
    server.when.disconnected(lambda conn, code, reason: disconnected.append((conn, code, reason)))
    with inproc_server(server) as url:
        c = WseClient(url)
        closed = []
        c.when.closed(lambda code, reason: closed.append((code, reason)))
        c.connect("dropme")
        wait_for(lambda: conns)
        conns[0].drop()
        wait_for(lambda: closed and disconnected)
        assert closed == [(1000, WSE_REASON.BY_SERVER)]
        assert disconnected == [(conns[0], 1000, WSE_REASON.BY_SERVER)]
        assert conns[0].ready_state == 3
        wait_for(lambda: c.status == WSE_STATUS.OFFLINE)


def test_identity_drop_closes_every_device():
    server = make_server(conn_per_user=2)
    with inproc_server(server) as url:
        a, b = WseClient(url), WseClient(url)
        a.connect("twice")
        b.connect("twice")
        server.clients["twice"].drop()
        wait_for(lambda: a.close_status and b.close_status)
        assert a.close_status == b.close_status == (1000, WSE_REASON.BY_SERVER)


def test_drop_client_fires_left_once_with_the_reason():
    server = make_server(conn_per_user=2)
    left, disconnected = [], []
    server.when.left(lambda client, code, reason: left.append((client.cid, code, reason)))
    server.when.disconnected(lambda conn, code, reason: disconnected.append((code, reason)))
    with inproc_server(server) as url:
        a, b = WseClient(url), WseClient(url)
        a.connect("kick")
        b.connect("kick")
        server.drop_client("kick", "kicked out")
        wait_for(lambda: a.close_status and b.close_status)
        assert a.close_status == b.close_status == (1000, "kicked out")
        wait_for(lambda: len(disconnected) == 2 and left)
        assert disconnected == [(1000, "kicked out")] * 2
        settle(server, url)
        assert [e for e in left if e[0] == "kick"] == [("kick", 1000, "kicked out")]
        assert "kick" not in server.clients
        server.dropClient("nobody")  # unknown cid: nothing happens


# -- long exchanges -----------------------------------------------------------------

def test_counting_to_1001_by_ping_pong():
    server = make_server()
    server.channel.on("count", lambda conn, n: conn.send("count", n + 1))
    with inproc_server(server) as url:
        c = WseClient(url)
        seen = []
        done = Event()

        def on_count(n):
            seen.append(n)
            if n >= 1001:
                done.set()
            else:
                c.send("count", n)

        c.channel.on("count", on_count)
        c.connect("counter")
        c.send("count", 0)
        assert done.wait(30 * UNIT), f"stopped at {seen[-1:]}"
        assert seen == list(range(1, 1002))
        c.close()


def test_swarm_of_20_users_joins_and_leaves():
    server = make_server()
    joined, left = Counter(), Counter()
    server.when.joined(lambda client, meta: joined.update([client.cid]))
    server.when.left(lambda client, code, reason: left.update([client.cid]))
    hello = []
    server.channel.on("hello", lambda conn, p: hello.append(p))
    with inproc_server(server) as url:
        def user(i):
            c = WseClient(url)
            welcome = c.connect(f"user{i}", {"i": i})
            c.send("hello", i)
            assert c.call("echo", i) == i
            c.close()
            return welcome

        greenlets = [gevent.spawn(user, i) for i in range(20)]
        gevent.joinall(greenlets, timeout=20 * UNIT, raise_error=True)
        assert [g.value for g in greenlets] == [{"hello": f"user{i}"} for i in range(20)]
        wait_for(lambda: sum(left.values()) == 20)
        assert joined == Counter(f"user{i}" for i in range(20))
        assert left == joined
        assert sorted(hello) == list(range(20))
        assert len(server.clients) == 0
        assert list(server.clients.items()) == []


# -- failing handlers ------------------------------------------------------------------

def test_exception_in_a_channel_handler_is_reported_and_the_connection_stays():
    server = make_server()
    errors, got = [], []

    @server.channel.on("explode")
    def explode(conn, payload):
        raise ValueError("bad payload " + str(payload))

    server.channel.on("fine", lambda conn, p: got.append(p))
    server.when.error(lambda err, conn: errors.append((err, conn)))
    with inproc_server(server) as url:
        c = WseClient(url)
        c.connect("e1")
        c.send("explode", 1)
        c.send("fine", 2)
        wait_for(lambda: errors and got)
        err, conn = errors[0]
        assert isinstance(err, WseError)
        assert err.code == WSE_ERROR.MESSAGE_PROCESSING_ERROR
        assert "bad payload 1" in str(err.details)
        assert conn.cid == "e1"
        assert got == [2]
        assert c.call("echo", "alive") == "alive"
        assert c.status == WSE_STATUS.READY
        c.close()


def test_exception_in_an_event_handler_is_reported_and_the_connection_stays():
    server = make_server()
    errors = []

    @server.when.connected
    def broken(conn):
        raise RuntimeError("connected handler broke")

    server.when.joined(lambda client, meta: 1 / 0)
    server.when.error(lambda err, conn: errors.append((err, conn)))
    with inproc_server(server) as url:
        c = WseClient(url)
        c.connect("e2")
        wait_for(lambda: len(errors) == 2)
        messages = sorted(str(err.details.get("message")) for err, _ in errors)
        assert any("connected handler broke" in m for m in messages)
        assert any("division by zero" in m for m in messages)
        assert all(err.code == WSE_ERROR.MESSAGE_PROCESSING_ERROR for err, _ in errors)
        by_event = {err.details["event"]: conn for err, conn in errors}
        assert by_event["connected"].cid == "e2"
        assert c.call("echo", 5) == 5
        c.close()


def test_bad_frames_are_reported_on_error():
    from helpers import RawWS
    server = make_server()
    errors = []
    server.when.error(lambda err, conn: errors.append(err.code))
    with inproc_server(server) as url:
        ws = RawWS(url)
        ws.send_text('["~wse:hi",{"identity":"raw","meta":{}},null]')
        assert ws.recv() == ("text", '["~wse:welcome",{"hello":"raw"},null]')
        ws.send_text("not json")
        assert ws.recv_until_close() == ("close", 1000, WSE_REASON.PROTOCOL_ERR)
        ws.shutdown()
        wait_for(lambda: errors)
        assert errors == [WSE_ERROR.MESSAGE_PROCESSING_ERROR]


@pytest.mark.parametrize("frame", ['[null, 1, null]', '["", 1, null]', '[5, 1, null]'])
def test_message_without_a_valid_type_is_a_protocol_violation(frame):
    from helpers import RawWS
    server = make_server()
    errors = []
    server.when.error(lambda err, conn: errors.append(err.code))
    with inproc_server(server) as url:
        ws = RawWS(url)
        ws.send_text('["~wse:hi",{"identity":"raw","meta":{}},null]')
        assert ws.recv()[0] == "text"
        ws.send_text(frame)
        assert ws.recv_until_close() == ("close", 1000, WSE_REASON.PROTOCOL_ERR)
        ws.shutdown()
        wait_for(lambda: errors)
        assert errors == [WSE_ERROR.PROTOCOL_VIOLATION]


def test_internal_types_after_the_welcome_are_plain_messages():
    from helpers import RawWS
    server = make_server()
    got, ignored = [], []
    server.channel.on("~wse:challenge", lambda conn, p: got.append(p))
    server.when.ignored(lambda conn, type_, payload: ignored.append((type_, payload)))
    with inproc_server(server) as url:
        ws = RawWS(url)
        ws.send_text('["~wse:hi",{"identity":"raw","meta":{}},null]')
        assert ws.recv()[0] == "text"
        ws.send_text('["~wse:hi",{"identity":"other"},null]')
        ws.send_text('["~wse:challenge",5,null]')
        ws.send_text('["~wse:response",6,null]')
        wait_for(lambda: len(ignored) == 2 and got)
        assert ignored == [("~wse:hi", {"identity": "other"}), ("~wse:response", 6)]
        assert got == [5]
        assert list(server.clients) == ["raw"]
        ws.close()
        ws.shutdown()


def test_clients_is_a_read_only_mapping():
    server = make_server(conn_per_user=2)
    with inproc_server(server) as url:
        a, b = WseClient(url), WseClient(url)
        a.connect("one", {"first": True})
        b.connect("one", {"first": False})
        c = WseClient(url)
        c.connect(2)
        assert len(server.clients) == 2
        assert set(server.clients.keys()) == {"one", 2}
        assert server.clients.get("nobody") is None
        ident = server.clients["one"]
        assert ident.cid == "one" and ident.meta == {"first": True}
        assert len(ident.conns) == 2
        assert {conn.meta["first"] for conn in ident.conns.values()} == {True, False}
        with pytest.raises(TypeError):
            server.clients["x"] = ident
        with pytest.raises(KeyError):
            server.clients["nobody"]
        for cl in (a, b, c):
            cl.close()
        wait_for(lambda: len(server.clients) == 0)


def test_messages_from_joined_and_connected_handlers_follow_the_welcome():
    server = make_server()
    server.when.joined(lambda client, meta: client.send("from-joined", meta))
    server.when.connected(lambda conn: conn.send("from-connected", conn.cid))
    with inproc_server(server) as url:
        c = WseClient(url)
        order = []
        c.when.ready(lambda welcome: order.append(("ready", welcome)))
        c.channel.on("from-joined", lambda p: order.append(("joined", p)))
        c.channel.on("from-connected", lambda p: order.append(("connected", p)))
        c.connect("first", {"m": 1})
        wait_for(lambda: len(order) == 3)
        assert order[0] == ("ready", {"hello": "first"})
        assert sorted(order[1:]) == [("connected", "first"), ("joined", {"m": 1})]
        c.close()
