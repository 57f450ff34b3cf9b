"""Connecting and authenticating: welcome, meta, identify, challenge-response."""
import gevent
import pytest
from gevent.event import Event

from helpers import UNIT, RawWS, inproc_server, wait_for
from wse_sync import WSE_ERROR, WSE_REASON, WSE_STATUS, WseClient, WseError, WseServer
from wse_sync.core.frames import OP_TEXT, build_frame


def accept_all(identity, accept, **_):
    accept(identity, {"hello": identity})


def test_connect_returns_welcome_fires_ready_and_updated():
    server = WseServer(identify=accept_all)
    with inproc_server(server) as url:
        c = WseClient(url)
        assert c.status == WSE_STATUS.IDLE
        ready, updated = [], []
        c.when.ready(ready.append)
        c.when.updated(updated.append)
        assert c.connect("alice") == {"hello": "alice"}
        assert c.status == WSE_STATUS.READY
        assert c.ready is True
        assert ready == [{"hello": "alice"}]
        assert updated == [WSE_STATUS.CONNECTING, WSE_STATUS.READY]
        assert "alice" in server.clients
        c.close()
        assert c.status == WSE_STATUS.OFFLINE
        assert updated[-1] == WSE_STATUS.OFFLINE


def test_welcome_payload_may_be_empty():
    server = WseServer(identify=lambda identity, accept: accept(identity))
    with inproc_server(server) as url:
        c = WseClient(url)
        assert c.connect("x") is None
        assert c.status == WSE_STATUS.READY
        c.close()


def test_meta_reaches_joined_connected_and_conn():
    server = WseServer(identify=accept_all)
    joined, connected = [], []
    server.when.joined(lambda client, meta: joined.append((client, meta)))

    @server.when.connected
    def on_connected(conn):
        connected.append(conn)

    meta = {"device": "phone", "n": 3, "nested": {"a": [1, 2]}}
    with inproc_server(server) as url:
        c = WseClient(url)
        c.connect("bob", meta)
        wait_for(lambda: joined and connected)
        client, got_meta = joined[0]
        assert client.cid == "bob"
        assert got_meta == meta
        assert client.meta == meta
        conn = connected[0]
        assert conn.meta == meta
        assert conn.identity == "bob"
        assert conn.cid == "bob"
        assert conn.client is server.clients["bob"]
        assert conn.ready_state == 1 and conn.readyState == 1
        assert conn.remote_addr == "127.0.0.1"
        assert list(server.clients["bob"].conns) == [conn.conn_id]
        c.close()


def test_meta_defaults_to_empty_dict_and_identity_any_json():
    seen = []

    def identify(identity, meta, accept):
        seen.append((identity, meta))
        accept("u1")

    server = WseServer(identify=identify)
    with inproc_server(server) as url:
        c = WseClient(url)
        c.connect({"token": [1, 2, "x"]})
        assert seen == [({"token": [1, 2, "x"]}, {})]
        c.close()


@pytest.mark.parametrize("decision", ["refuse", None, "", 0, False])
def test_invalid_auth_is_refused(decision):
    calls = []

    def identify(identity, accept, refuse):
        calls.append(identity)
        if decision == "refuse":
            refuse()
        else:
            accept(decision, {"never": "sent"})

    server = WseServer(identify=identify)
    events = []
    server.when.joined(lambda *a: events.append("joined"))
    server.when.connected(lambda *a: events.append("connected"))
    with inproc_server(server) as url:
        c = WseClient(url)
        closed = []
        c.when.closed(lambda code, reason: closed.append((code, reason)))
        with pytest.raises(WseError) as info:
            c.connect("mallory")
        assert info.value.code == WSE_ERROR.NOT_AUTHORIZED == WSE_REASON.NOT_AUTHORIZED
        assert c.status == WSE_STATUS.OFFLINE
        wait_for(lambda: closed)
        assert closed == [(1000, WSE_REASON.NOT_AUTHORIZED)]
        assert calls == ["mallory"]
        assert len(server.clients) == 0
        # on the wire: a close frame 1000 wse.not-authorized, never a welcome
        ws = RawWS(url)
        ws.send_text('["~wse:hi",{"identity":"mallory","meta":{}},null]')
        assert ws.recv() == ("close", 1000, WSE_REASON.NOT_AUTHORIZED)
        ws.shutdown()
        assert events == []


def test_identify_raising_refuses_and_reports_error():
    def identify(identity, accept):
        raise RuntimeError("db down")

    server = WseServer(identify=identify)
    errors = []
    server.when.error(lambda err, conn: errors.append(err))
    with inproc_server(server) as url:
        with pytest.raises(WseError) as info:
            WseClient(url).connect("x")
        assert info.value.code == WSE_ERROR.NOT_AUTHORIZED
        wait_for(lambda: errors)
        assert errors[0].code == WSE_ERROR.NOT_AUTHORIZED
        assert "db down" in errors[0].details["message"]


def test_identify_with_a_subset_of_keyword_arguments():
    server = WseServer(identify=lambda accept: accept("only-accept"))
    with inproc_server(server) as url:
        c = WseClient(url)
        c.connect("ignored")
        assert "only-accept" in server.clients
        c.close()

    def reordered(conn_id, refuse, accept, identity):
        assert isinstance(conn_id, str) and conn_id
        accept(identity + "!")

    server2 = WseServer(identify=reordered)
    with inproc_server(server2) as url:
        c = WseClient(url)
        c.connect("z")
        assert "z!" in server2.clients
        c.close()


def test_identify_with_var_kwargs_and_conn_id_matches_connection():
    got = {}

    def identify(**kwargs):
        got.update(kwargs)
        kwargs["accept"](kwargs["identity"], kwargs["conn_id"])

    server = WseServer(identify=identify)
    connected = []
    server.when.connected(connected.append)
    with inproc_server(server) as url:
        c = WseClient(url)
        welcome = c.connect("kw", {"m": 1})
        assert set(got) == {"identity", "meta", "accept", "refuse", "challenge", "conn_id"}
        assert got["identity"] == "kw"
        assert got["meta"] == {"m": 1}
        assert got["challenge"] is None
        wait_for(lambda: connected)
        assert got["conn_id"] == connected[0].conn_id == welcome
        assert len(welcome) == 15
        c.close()


def test_identify_positional_plus_kwargs():
    def identify(identity, accept, **rest):
        assert set(rest) == {"meta", "refuse", "challenge", "conn_id"}
        accept(identity)

    server = WseServer(identify=identify)
    with inproc_server(server) as url:
        c = WseClient(url)
        c.connect("p")
        assert "p" in server.clients
        c.close()


def test_blocking_identify_does_not_delay_other_connections():
    gate = Event()
    slow_entered = Event()

    def identify(identity, accept):
        if identity == "slow":
            slow_entered.set()
            gate.wait(10 * UNIT)  # blocks this connection's identify only
            gevent.sleep(0.01)
        accept(identity, identity)

    server = WseServer(identify=identify)
    server.register("echo", lambda conn, payload: payload)
    with inproc_server(server) as url:
        slow = WseClient(url)
        pending = gevent.spawn(slow.connect, "slow")
        assert slow_entered.wait(5 * UNIT)
        fast = WseClient(url)
        assert fast.connect("fast") == "fast"
        assert fast.call("echo", [1]) == [1]  # fully usable while the slow one waits
        assert "fast" in server.clients
        assert not pending.ready()
        assert "slow" not in server.clients
        gate.set()
        assert pending.get(timeout=5 * UNIT) == "slow"
        assert "slow" in server.clients
        slow.close()
        fast.close()


def test_cids_keep_their_type():
    server = WseServer(identify=lambda identity, accept: accept(int(identity)))
    joined = []
    server.when.joined(lambda client, meta: joined.append(client.cid))
    with inproc_server(server) as url:
        c = WseClient(url)
        c.connect("7")
        assert 7 in server.clients
        assert "7" not in server.clients
        wait_for(lambda: joined == [7])
        c.close()


# -- challenge-response -------------------------------------------------------

def make_cra_server(generator, **options):
    identified = []

    def identify(identity, challenge, accept, refuse):
        identified.append(challenge)
        if challenge and challenge["response"] == challenge["quest"]["a"] + challenge["quest"]["b"]:
            accept(identity, "welcome " + identity)
        else:
            refuse()

    server = WseServer(identify=identify, **options)
    server.use_challenge(generator)
    return server, identified


def quest_sum(identity, meta, quest, refuse):
    quest({"a": 2, "b": 40})


def test_cra_pass():
    server, identified = make_cra_server(quest_sum)
    with inproc_server(server) as url:
        c = WseClient(url)
        quests = []

        def solver(quest, solve):
            quests.append(quest)
            solve(quest["a"] + quest["b"])

        c.challenge(solver)
        assert c.connect("solver") == "welcome solver"
        assert quests == [{"a": 2, "b": 40}]
        assert identified == [{"quest": {"a": 2, "b": 40}, "response": 42}]
        c.close()


def test_cra_fail_wrong_answer():
    server, identified = make_cra_server(quest_sum)
    with inproc_server(server) as url:
        c = WseClient(url)
        c.challenge(lambda quest, solve: solve(41))
        with pytest.raises(WseError) as info:
            c.connect("wrong")
        assert info.value.code == WSE_ERROR.NOT_AUTHORIZED
        assert c.close_status == (1000, WSE_REASON.NOT_AUTHORIZED)
        assert identified == [{"quest": {"a": 2, "b": 40}, "response": 41}]
        assert len(server.clients) == 0


def test_cra_refused_by_the_generator_never_calls_identify():
    generated = []

    def generator(identity, meta, quest, refuse):
        generated.append((identity, meta))
        if identity == "banned":
            refuse()
        else:
            quest({"a": 1, "b": 1})

    server, identified = make_cra_server(generator)
    with inproc_server(server) as url:
        c = WseClient(url)
        c.challenge(lambda quest, solve: solve(2))
        with pytest.raises(WseError) as info:
            c.connect("banned", {"k": "v"})
        assert info.value.code == WSE_ERROR.NOT_AUTHORIZED
        assert c.close_status == (1000, WSE_REASON.NOT_AUTHORIZED)
        assert generated == [("banned", {"k": "v"})]
        assert identified == []
        # the same server still lets a good user in
        ok = WseClient(url)
        ok.challenge(lambda quest, solve: solve(2))
        assert ok.connect("good") == "welcome good"
        assert len(identified) == 1
        ok.close()


def test_cra_answer_on_the_wire():
    server, identified = make_cra_server(quest_sum)
    with inproc_server(server) as url:
        ws = RawWS(url)
        ws.send_text('["~wse:hi",{"identity":"raw","meta":{}},null]')
        assert ws.recv() == ("text", '["~wse:challenge",{"a":2,"b":40},null]')
        ws.send_text('["~wse:challenge",42,null]')
        assert ws.recv() == ("text", '["~wse:welcome","welcome raw",null]')
        ws.close(1000, "")
        assert ws.recv_until_close()[0] in ("close", "eof")
        ws.shutdown()


def test_challenge_answer_before_hi_is_a_protocol_error():
    server, identified = make_cra_server(quest_sum)
    with inproc_server(server) as url:
        ws = RawWS(url)
        ws.send_text('["~wse:challenge",42,null]')
        assert ws.recv_until_close() == ("close", 1000, WSE_REASON.PROTOCOL_ERR)
        ws.shutdown()
        assert identified == []


def test_use_challenge_requires_a_callable():
    server = WseServer(identify=accept_all)
    for bad in (None, "generator", 42):
        with pytest.raises(WseError) as info:
            server.use_challenge(bad)
        assert info.value.code == WSE_ERROR.INVALID_CRA_GENERATOR
    with pytest.raises(WseError) as info:
        server.useChallenge({})
    assert info.value.code == WSE_ERROR.INVALID_CRA_GENERATOR


def test_server_without_identify_is_refused():
    with pytest.raises(WseError) as info:
        WseServer()
    assert info.value.code == WSE_ERROR.IDENTIFY_HANDLER_MISSING
    with pytest.raises(WseError) as info:
        WseServer(identify="not callable")
    assert info.value.code == WSE_ERROR.IDENTIFY_HANDLER_MISSING


def test_client_without_solver_cannot_pass_a_challenge():
    # the server gives up after auth_timeout (wse_sync's limit, protocol.md)
    server, identified = make_cra_server(quest_sum, auth_timeout=0.3 * UNIT)
    assert server.auth_timeout == 0.3 * UNIT
    with inproc_server(server) as url:
        c = WseClient(url)
        errors = []
        c.when.error(errors.append)
        with pytest.raises(WseError) as info:
            c.connect("nosolver")
        assert info.value.code == WSE_ERROR.NOT_AUTHORIZED
        assert errors and errors[0].code == WSE_ERROR.INVALID_CRA_HANDLER
        assert identified == []
        with pytest.raises(WseError) as info:
            c.challenge("not callable")
        assert info.value.code == WSE_ERROR.INVALID_CRA_HANDLER


def test_accept_may_come_later_from_another_greenlet():
    def identify(identity, accept):
        gevent.spawn_later(0.05, accept, identity, {"late": True})  # identify returns first

    server = WseServer(identify=identify)
    with inproc_server(server) as url:
        c = WseClient(url)
        assert c.connect("async") == {"late": True}
        assert "async" in server.clients
        c.close()


def test_the_first_decision_wins():
    def identify(identity, accept, refuse):
        if identity == "yes-then-no":
            accept("first", 1)
            refuse()
            accept("second", 2)
        else:
            refuse()
            accept(identity, 3)

    server = WseServer(identify=identify)
    with inproc_server(server) as url:
        c = WseClient(url)
        assert c.connect("yes-then-no") == 1
        assert list(server.clients) == ["first"]
        c.close()
        with pytest.raises(WseError) as info:
            WseClient(url).connect("no-then-yes")
        assert info.value.code == WSE_ERROR.NOT_AUTHORIZED


def test_messages_while_identify_decides_are_ignored():
    gate = Event()
    entered = Event()

    def identify(identity, accept):
        entered.set()
        gate.wait(10 * UNIT)
        accept(identity)

    server = WseServer(identify=identify)
    got = []
    server.channel.on("chat", lambda conn, p: got.append(p))
    server.register("echo", lambda conn, p: p)
    with inproc_server(server) as url:
        ws = RawWS(url)
        # one write: the server reads these frames together, right after the hi
        frames = ['["~wse:hi",{"identity":"w","meta":{}},null]',
                  '["chat","too early",null]',
                  '["echo","too early","abcdefghij"]',
                  '["~wse:hi",{"identity":"again","meta":{}},null]',
                  '["~wse:challenge",1,null]']
        ws.send_raw(b"".join(build_frame(OP_TEXT, f.encode(), mask=True) for f in frames))
        assert entered.wait(5 * UNIT)
        gate.set()
        assert ws.recv() == ("text", '["~wse:welcome",null,null]')
        ws.send_text('["chat","in time",null]')
        ws.send_text('["echo","after","abcdefghi1"]')
        assert ws.recv() == ("text", '["~wse:response","after","abcdefghi1"]')
        wait_for(lambda: got)
        assert got == ["in time"]
        assert list(server.clients) == ["w"]
        ws.close()
        ws.shutdown()


def test_no_hi_within_the_handshake_timeout():
    server = WseServer(identify=accept_all, handshake_timeout=0.2 * UNIT)
    with inproc_server(server) as url:
        ws = RawWS(url)
        # (a wse client says hi at once: without it, the path or the server is
        # congested, or it is no wse client; 1013 lets a real one retry)
        assert ws.recv_until_close() == ("close", 1013, "wse.handshake-timeout")
        ws.shutdown()
        assert server.hub.counters["refused.handshake_timeout"] == 1


def test_identify_that_never_decides_hits_the_auth_timeout_as_the_servers_doing():
    """The server, not the client, was slow: 1013 (the JS client retries),
    never the terminal 1000 wse.not-authorized."""
    server = WseServer(identify=lambda accept: None, auth_timeout=0.2 * UNIT)
    with inproc_server(server) as url:
        ws = RawWS(url)
        ws.send_text('["~wse:hi",{"identity":"undecided","meta":{}},null]')
        assert ws.recv_until_close() == ("close", 1013, "wse.server-busy")
        ws.shutdown()
        assert len(server.clients) == 0
        assert server.hub.counters["refused.identify_timeout"] == 1


def test_a_crowd_waits_for_identify_slots_instead_of_failing():
    """max_identify at once; the others queue, and the time in the queue does
    not count against auth_timeout (each identify takes most of it)."""
    running, peak = [0], [0]

    def slow_identify(identity, accept):
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        gevent.sleep(0.15 * UNIT)
        running[0] -= 1
        accept(identity)

    server = WseServer(identify=slow_identify, auth_timeout=0.25 * UNIT, max_identify=2)
    with inproc_server(server) as url:
        clients = [WseClient(url) for _ in range(8)]
        jobs = [gevent.spawn(c.connect, f"q{i}") for i, c in enumerate(clients)]
        gevent.joinall(jobs, timeout=10 * UNIT, raise_error=True)
        assert all(c.status == WSE_STATUS.READY for c in clients)
        assert peak[0] == 2
        for c in clients:
            c.close()


def test_a_client_that_does_not_answer_the_challenge_is_still_refused():
    server = WseServer(identify=accept_all, auth_timeout=0.2 * UNIT)
    server.use_challenge(lambda identity, quest: quest({"nonce": 1}))
    with inproc_server(server) as url:
        ws = RawWS(url)
        ws.send_text('["~wse:hi",{"identity":"mute","meta":{}},null]')
        assert ws.recv()[0] == "text"  # the challenge; never answered
        assert ws.recv_until_close() == ("close", 1000, WSE_REASON.NOT_AUTHORIZED)
        ws.shutdown()


def test_first_message_must_be_hi():
    server = WseServer(identify=accept_all)
    with inproc_server(server) as url:
        ws = RawWS(url)
        ws.send_text('["chat","hello",null]')
        assert ws.recv_until_close() == ("close", 1000, WSE_REASON.PROTOCOL_ERR)
        ws.shutdown()


def test_remote_addr_from_x_forwarded_for_and_null_meta():
    server = WseServer(identify=accept_all)
    conns = []
    server.when.connected(conns.append)
    with inproc_server(server) as url:
        ws = RawWS(url, headers={"X-Forwarded-For": "203.0.113.7"})
        ws.send_text('["~wse:hi",{"identity":"fw","meta":null},null]')
        assert ws.recv() == ("text", '["~wse:welcome",{"hello":"fw"},null]')
        wait_for(lambda: conns)
        assert conns[0].remote_addr == "203.0.113.7"
        assert conns[0].meta == {}
        ws.close()
        ws.shutdown()


def test_x_forwarded_for_is_ignored_from_a_peer_that_is_not_a_trusted_proxy():
    server = WseServer(identify=accept_all, trusted_proxies="10.0.0.0/8")
    conns = []
    server.when.connected(conns.append)
    with inproc_server(server) as url:
        ws = RawWS(url, headers={"X-Forwarded-For": "203.0.113.7"})
        ws.send_text('["~wse:hi",{"identity":"fw","meta":{}},null]')
        assert ws.recv() == ("text", '["~wse:welcome",{"hello":"fw"},null]')
        wait_for(lambda: conns)
        assert conns[0].remote_addr == "127.0.0.1"
        ws.close()
        ws.shutdown()


def test_a_bad_trusted_proxies_entry_fails_at_construction():
    with pytest.raises(ValueError, match="nope"):
        WseServer(identify=accept_all, trusted_proxies=["127.0.0.1", "nope"])


def test_a_refused_client_may_connect_again():
    server = WseServer(identify=lambda identity, accept, refuse:
                       accept(identity) if identity == "good" else refuse())
    with inproc_server(server) as url:
        c = WseClient(url)
        with pytest.raises(WseError):
            c.connect("bad")
        assert c.status == WSE_STATUS.OFFLINE
        assert c.connect("good") is None
        assert c.status == WSE_STATUS.READY
        c.close()
