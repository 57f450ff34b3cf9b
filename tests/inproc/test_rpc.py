"""Remote procedure calls: client -> server, server -> client, and both at once."""
import gevent
import pytest
from gevent.event import Event

from helpers import UNIT, inproc_server, wait_for
from wse_sync import WSE_ERROR, WSE_REASON, WSE_STATUS, WseClient, WseError, WseServer


def accept_all(identity, accept, **_):
    accept(identity, {"hello": identity})


def make_server(**kw):
    return WseServer(identify=accept_all, **kw)


def connected_pair(server, url, cid="u", **client_kw):
    """A ready client and its server-side connection."""
    conns = []
    handler = server.when.connected(conns.append)
    c = WseClient(url, **client_kw)
    c.connect(cid)
    wait_for(lambda: conns)
    server.when.off("connected", handler)
    return c, conns[0]


# -- client -> server --------------------------------------------------------------

def test_call_returns_the_result():
    server = make_server()
    server.register("sum", lambda conn, payload: sum(payload))
    server.register("who", lambda conn, payload: {"cid": conn.cid, "payload": payload})
    server.register("nothing", lambda conn, payload: None)
    with inproc_server(server) as url:
        c = WseClient(url)
        c.connect("caller")
        assert c.call("sum", [1, 2, 3]) == 6
        assert c.call("who") == {"cid": "caller", "payload": None}
        assert c.call("who", "é/ü") == {"cid": "caller", "payload": "é/ü"}
        assert c.call("nothing", 1) is None
        c.close()


def test_register_as_decorator():
    server = make_server()

    @server.register("double")
    def double(conn, payload):
        return payload * 2

    assert double(None, 4) == 8  # the decorator gives the function back
    with inproc_server(server) as url:
        c = WseClient(url)
        c.connect("d")
        assert c.call("double", 21) == 42
        c.close()


def test_call_timeout_on_the_client():
    server = make_server()
    release = Event()
    entered = []

    @server.register("slow")
    def slow(conn, payload):
        entered.append(payload)
        release.wait(10 * UNIT)
        return "late"

    server.register("echo", lambda conn, p: p)
    with inproc_server(server) as url:
        c = WseClient(url)
        c.connect("t")
        with pytest.raises(WseError) as info:
            c.call("slow", 1, timeout=0.2 * UNIT)
        assert info.value.code == WSE_ERROR.RP_TIMEOUT
        assert info.value.details == {}  # as the JS client: no extra keys
        short = WseClient(url, rpc_timeout=0.2 * UNIT)
        short.connect("t2")
        with pytest.raises(WseError) as info:
            short.call("slow", 2)
        assert info.value.code == WSE_ERROR.RP_TIMEOUT
        alias = WseClient(url, tO=0.2 * UNIT)
        assert alias.rpc_timeout == 0.2 * UNIT
        assert entered == [1, 2]
        # the connection survives a timed-out call; a late answer is dropped
        release.set()
        assert c.call("echo", "after") == "after"
        assert short.call("echo", "after") == "after"
        c.close()
        short.close()


def test_disconnect_while_a_call_is_pending():
    server = make_server()
    entered = Event()
    server.register("hang", lambda conn, payload: (entered.set(), Event().wait(10 * UNIT)))
    with inproc_server(server) as url:
        c = WseClient(url)
        c.connect("hanger")
        pending = gevent.spawn(c.call, "hang", None)
        assert entered.wait(5 * UNIT)
        server.drop_client("hanger", "custom reason")
        with pytest.raises(WseError) as info:
            pending.get(timeout=5 * UNIT)
        assert info.value.code == WSE_ERROR.RP_DISCONNECT
        assert info.value.details["disconnected"] == [1000, "custom reason"]
        assert c.status == WSE_STATUS.OFFLINE


def test_handler_raising_wse_error_sends_code_and_details():
    server = make_server()

    @server.register("picky")
    def picky(conn, payload):
        raise WseError("app.bad-input", {"field": "name", "hint": 1})

    @server.register("bare")
    def bare(conn, payload):
        raise WseError("app.bare")

    server.register("echo", lambda conn, p: p)

    @server.register("own-rpc")
    def own(conn, payload):
        raise WseError("app.own", {"rpc": "mine", "payload": "kept"})

    with inproc_server(server) as url:
        c = WseClient(url)
        c.connect("p")
        with pytest.raises(WseError) as info:
            c.call("picky", {"name": ""})
        assert info.value.code == "app.bad-input"
        assert info.value.details == {"field": "name", "hint": 1, "rpc": "picky",
                                      "payload": {"name": ""}}
        with pytest.raises(WseError) as info:
            c.call("bare", [1])
        assert info.value.code == "app.bare"
        assert info.value.details == {"rpc": "bare", "payload": [1]}
        with pytest.raises(WseError) as info:
            c.call("own-rpc", 0)
        assert info.value.details == {"rpc": "mine", "payload": "kept"}
        assert c.call("echo", "still connected") == "still connected"
        c.close()


def test_rpc_tracebacks_option_sends_the_full_stack():
    server = make_server(rpc_tracebacks=True)

    @server.register("crash")
    def crash(conn, payload):
        raise KeyError("missing thing")

    with inproc_server(server) as url:
        c = WseClient(url)
        c.connect("x")
        with pytest.raises(WseError) as info:
            c.call("crash")
        stack = info.value.details["origin"]["stack"]
        assert stack.startswith("Traceback") and "in crash" in stack
        c.close()


def test_handler_raising_an_exception_gives_rp_execution_failed():
    server = make_server()

    @server.register("crash")
    def crash(conn, payload):
        raise KeyError("missing thing")

    errors = []
    server.when.error(lambda err, conn: errors.append((err, conn)))
    with inproc_server(server) as url:
        c = WseClient(url)
        c.connect("x")
        with pytest.raises(WseError) as info:
            c.call("crash", {"a": 1})
        err = info.value
        assert err.code == WSE_ERROR.RP_EXECUTION_FAILED
        assert err.details["rpc"] == "crash"
        assert err.details["payload"] == {"a": 1}
        origin = err.details["origin"]
        assert origin["name"] == "KeyError"
        assert "missing thing" in origin["message"]
        assert origin["stack"] == "KeyError: 'missing thing'"  # no server paths by default
        wait_for(lambda: errors)
        server_err, conn = errors[0]
        assert server_err.code == WSE_ERROR.RP_EXECUTION_FAILED
        assert conn.cid == "x"
        assert c.status == WSE_STATUS.READY
        c.close()


def test_calling_an_unregistered_procedure():
    server = make_server()
    server.register("gone", lambda conn, p: 1)
    with inproc_server(server) as url:
        c = WseClient(url)
        c.connect("n")
        with pytest.raises(WseError) as info:
            c.call("never-registered", 1)
        assert info.value.code == WSE_ERROR.RP_NOT_REGISTERED
        assert c.call("gone") == 1
        server.unregister("gone")
        with pytest.raises(WseError) as info:
            c.call("gone")
        assert info.value.code == WSE_ERROR.RP_NOT_REGISTERED
        c.close()


def test_an_unknown_procedure_is_named_in_the_error_not_on_the_wire():
    # the wire answer stays the reference's {"code": ...} alone (test_node_protocol
    # pins its bytes) and the caller's details stay the received ones ({} as in the
    # JS client); the raised error names the procedure through its ``rpc``
    server = make_server()
    with inproc_server(server) as url:
        c, conn = connected_pair(server, url)
        with pytest.raises(WseError) as info:
            c.call("mul", {"a": 2, "b": 3})
        assert info.value.code == WSE_ERROR.RP_NOT_REGISTERED
        assert info.value.details == {}
        assert info.value.rpc == "mul"
        assert "'mul'" in str(info.value) and "'mul'" in repr(info.value)
        assert info.value.to_json() == {"code": WSE_ERROR.RP_NOT_REGISTERED, "details": {}}
        with pytest.raises(WseError) as info:
            conn.call("on-the-client", 1)
        assert info.value.code == WSE_ERROR.RP_NOT_REGISTERED
        assert info.value.rpc == "on-the-client" and "'on-the-client'" in str(info.value)
        c.close()
    assert str(WseError("x.y")) == "x.y" and repr(WseError("x.y", {})) == "WseError('x.y', {})"


def test_register_twice_and_unregister_unknown():
    server = make_server()
    server.register("once", lambda conn, p: 1)
    with pytest.raises(WseError) as info:
        server.register("once", lambda conn, p: 2)
    assert info.value.code == WSE_ERROR.RP_ALREADY_REGISTERED
    with pytest.raises(WseError) as info:
        server.unregister("unknown")
    assert info.value.code == WSE_ERROR.RP_NOT_REGISTERED
    server.unregister("once")
    server.register("once", lambda conn, p: 3)  # free again after unregister
    with pytest.raises(TypeError):
        server.register("not-callable", 42)
    # the client side keeps the same rules
    client = WseClient("ws://127.0.0.1:9/")
    client.register("once", lambda p: 1)
    for bad, code in ((lambda: client.register("once", lambda p: 2),
                       WSE_ERROR.RP_ALREADY_REGISTERED),
                      (lambda: client.unregister("unknown"), WSE_ERROR.RP_NOT_REGISTERED)):
        with pytest.raises(WseError) as info:
            bad()
        assert info.value.code == code
    with pytest.raises(TypeError):
        client.register("not-callable", 42)


def test_rpcs_of_one_connection_run_concurrently():
    server = make_server()
    gates = {"first": Event(), "second": Event()}
    started = []

    def blocking(name):
        def handler(conn, payload):
            started.append(name)
            assert gates[name].wait(10 * UNIT)
            return name + str(payload)
        return handler

    server.register("first", blocking("first"))
    server.register("second", blocking("second"))
    with inproc_server(server) as url:
        c = WseClient(url)
        c.connect("conc")
        for order in (("second", "first"), ("first", "second")):
            for g in gates.values():
                g.clear()
            started.clear()
            calls = {name: gevent.spawn(c.call, name, 1) for name in ("first", "second")}
            # both handlers are running at the same time
            wait_for(lambda: sorted(started) == ["first", "second"])
            gates[order[0]].set()
            assert calls[order[0]].get(timeout=5 * UNIT) == order[0] + "1"
            assert not calls[order[1]].ready()
            gates[order[1]].set()
            assert calls[order[1]].get(timeout=5 * UNIT) == order[1] + "1"
        c.close()


def test_channel_messages_of_one_connection_are_handled_in_order():
    server = make_server()
    server.register("ping", lambda conn, p: "pong")
    gate = Event()
    handled = []

    @server.channel.on("step")
    def step(conn, n):
        handled.append(("start", n))
        if n == 0:
            assert gate.wait(10 * UNIT)
        handled.append(("end", n))

    with inproc_server(server) as url:
        c = WseClient(url)
        c.connect("ordered")
        for n in range(50):
            c.send("step", n)
        wait_for(lambda: ("start", 0) in handled)
        # an RPC still runs while the channel handler blocks: the server has
        # read all 50 messages, yet message 1 waits for message 0
        assert c.call("ping") == "pong"
        assert handled == [("start", 0)]
        gate.set()
        wait_for(lambda: len(handled) == 100)
        assert handled == [(k, n) for n in range(50) for k in ("start", "end")]
        c.close()


# -- server -> client -----------------------------------------------------------

def test_server_calls_the_client():
    server = make_server()
    with inproc_server(server) as url:
        c, conn = connected_pair(server, url)
        c.register("mul", lambda payload: payload["a"] * payload["b"])

        @c.register("upper")
        def upper(payload):
            return payload.upper()

        assert conn.call("mul", {"a": 6, "b": 7}) == 42
        assert conn.call("upper", "abc") == "ABC"
        with pytest.raises(WseError) as info:
            c.register("mul", lambda p: 0)
        assert info.value.code == WSE_ERROR.RP_ALREADY_REGISTERED
        c.close()


def test_server_call_timeout():
    server = make_server()
    release = Event()
    with inproc_server(server) as url:
        c, conn = connected_pair(server, url)
        c.register("stall", lambda payload: release.wait(10 * UNIT))
        c.register("quick", lambda payload: "quick")
        with pytest.raises(WseError) as info:
            conn.call("stall", 1, timeout=0.2 * UNIT)
        assert info.value.code == WSE_ERROR.RP_TIMEOUT
        release.set()
        assert conn.call("quick") == "quick"
        c.close()


def test_server_call_uses_the_server_rpc_timeout():
    server = make_server(tO=0.2 * UNIT)
    assert server.rpc_timeout == 0.2 * UNIT and server.tO == 0.2 * UNIT
    release = Event()
    with inproc_server(server) as url:
        c, conn = connected_pair(server, url)
        c.register("stall", lambda payload: release.wait(10 * UNIT))
        with pytest.raises(WseError) as info:
            conn.call("stall")
        assert info.value.code == WSE_ERROR.RP_TIMEOUT
        release.set()
        c.close()


def test_server_call_not_registered_on_the_client():
    server = make_server()
    with inproc_server(server) as url:
        c, conn = connected_pair(server, url)
        with pytest.raises(WseError) as info:
            conn.call("nope", 1)
        assert info.value.code == WSE_ERROR.RP_NOT_REGISTERED
        c.register("later", lambda p: "ok")
        c.unregister("later")
        with pytest.raises(WseError) as info:
            conn.call("later")
        assert info.value.code == WSE_ERROR.RP_NOT_REGISTERED
        with pytest.raises(WseError) as info:
            c.unregister("later")
        assert info.value.code == WSE_ERROR.RP_NOT_REGISTERED
        c.close()


def test_server_call_failing_on_the_client():
    server = make_server()
    with inproc_server(server) as url:
        c, conn = connected_pair(server, url)

        @c.register("bad")
        def bad(payload):
            raise ValueError("client cannot " + payload)

        @c.register("refuses")
        def refuses(payload):
            raise WseError("client.says-no", {"why": "because"})

        with pytest.raises(WseError) as info:
            conn.call("bad", "do it")
        err = info.value
        assert err.code == WSE_ERROR.RP_EXECUTION_FAILED
        assert err.details["origin"]["name"] == "ValueError"
        assert err.details["origin"]["message"] == "client cannot do it"
        assert "ValueError" in err.details["origin"]["stack"]
        assert err.details["rpc"] == "bad" and err.details["payload"] == "do it"
        with pytest.raises(WseError) as info:
            conn.call("refuses", 3)
        assert info.value.code == "client.says-no"
        assert info.value.details == {"why": "because", "rpc": "refuses", "payload": 3}
        assert c.status == WSE_STATUS.READY
        c.close()


def test_server_call_interrupted_by_a_disconnect():
    server = make_server()
    with inproc_server(server) as url:
        c, conn = connected_pair(server, url)
        entered = Event()
        c.register("hold", lambda payload: (entered.set(), Event().wait(10 * UNIT)))
        pending = gevent.spawn(conn.call, "hold", None)
        assert entered.wait(5 * UNIT)
        c.close(reason="closing now", code=4321)
        with pytest.raises(WseError) as info:
            pending.get(timeout=5 * UNIT)
        assert info.value.code == WSE_ERROR.RP_DISCONNECT
        assert info.value.details["disconnected"] == [4321, "closing now"]
        # and on a closed connection, nothing is sent
        with pytest.raises(WseError) as info:
            conn.call("hold")
        assert info.value.code == WSE_ERROR.CONNECTION_NOT_READY


def test_server_call_interrupted_by_a_server_drop():
    server = make_server()
    with inproc_server(server) as url:
        c, conn = connected_pair(server, url)
        entered = Event()
        c.register("hold", lambda payload: (entered.set(), Event().wait(10 * UNIT)))
        pending = gevent.spawn(conn.call, "hold", None)
        assert entered.wait(5 * UNIT)
        conn.drop("enough")
        with pytest.raises(WseError) as info:
            pending.get(timeout=5 * UNIT)
        assert info.value.code == WSE_ERROR.RP_DISCONNECT
        assert info.value.details["disconnected"] == [1000, "enough"]


def test_bidirectional_rpc():
    server = make_server()

    @server.register("greet")
    def greet(conn, payload):
        name = conn.call("whoami", payload)  # back into the client before answering
        return f"hello {name}"

    with inproc_server(server) as url:
        c = WseClient(url)
        asked = []

        @c.register("whoami")
        def whoami(payload):
            asked.append(payload)
            return c.call("suffix", None) if payload == "nested" else "client"

        server.register("suffix", lambda conn, p: "client-nested")
        c.connect("bi")
        assert c.call("greet", "plain") == "hello client"
        assert c.call("greet", "nested") == "hello client-nested"
        assert asked == ["plain", "nested"]
        c.close()


def test_client_call_on_a_closed_client():
    server = make_server()
    server.register("echo", lambda conn, p: p)
    with inproc_server(server) as url:
        c = WseClient(url)
        with pytest.raises(WseError) as info:
            c.call("echo", 1)
        assert info.value.code == WSE_ERROR.CONNECTION_NOT_READY
        c.connect("c")
        c.close()
        with pytest.raises(WseError) as info:
            c.call("echo", 1)
        assert info.value.code == WSE_ERROR.CONNECTION_NOT_READY
        assert WSE_REASON.BY_CLIENT == "wse.by-client"


def test_a_result_that_cannot_be_packed():
    server = make_server()
    server.register("set", lambda conn, p: {1, 2})
    server.register("echo", lambda conn, p: p)
    errors = []
    server.when.error(lambda err, conn: errors.append(err))
    with inproc_server(server) as url:
        c = WseClient(url)
        c.connect("s")
        with pytest.raises(WseError) as info:
            c.call("set")
        assert info.value.code == WSE_ERROR.RP_EXECUTION_FAILED
        assert info.value.details["rpc"] == "set"
        wait_for(lambda: errors)
        assert errors[0].code == WSE_ERROR.RP_EXECUTION_FAILED
        assert c.call("echo", 1) == 1
        c.close()


def test_client_closing_with_a_call_pending():
    server = make_server()
    entered = Event()
    server.register("hang", lambda conn, p: (entered.set(), Event().wait(10 * UNIT)))
    with inproc_server(server) as url:
        c = WseClient(url)
        c.connect("closer")
        pending = gevent.spawn(c.call, "hang")
        assert entered.wait(5 * UNIT)
        c.close(reason="leaving")
        with pytest.raises(WseError) as info:
            pending.get(timeout=5 * UNIT)
        assert info.value.code == WSE_ERROR.RP_DISCONNECT
        assert info.value.details["disconnected"][0] == 1000


def test_a_channel_handler_may_call_the_client():
    server = make_server()
    answers = []

    @server.channel.on("ask-me")
    def ask_me(conn, payload):
        answers.append(conn.call("answer", payload))
        conn.send("done", answers[-1])

    with inproc_server(server) as url:
        c = WseClient(url)
        done = []
        c.register("answer", lambda p: p * 10)
        c.channel.on("done", done.append)
        c.connect("ch")
        c.send("ask-me", 1)
        c.send("ask-me", 2)
        wait_for(lambda: len(done) == 2)
        assert answers == done == [10, 20]
        c.close()
