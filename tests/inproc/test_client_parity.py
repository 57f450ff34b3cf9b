"""WseClient behaves as the wse 4.x JS client does where a user can see it."""
import gevent
import pytest
from gevent.event import Event

from helpers import UNIT, inproc_server, wait_for
from test_client import AltJSON, make_server
from wse_sync import WSE_ERROR, WSE_STATUS, WseClient, WseError


@pytest.mark.parametrize("option", [{"rpc_timeout": 0}, {"tO": 0}])
def test_a_zero_rpc_timeout_means_no_timeout(option):
    release = Event()
    server = make_server()
    server.register("slow", lambda conn, payload: (release.wait(10 * UNIT), payload)[1])
    with inproc_server(server) as url:
        c = WseClient(url, **option)
        c.connect("z")
        gevent.spawn_later(0.3 * UNIT, release.set)
        assert c.call("slow", "done") == "done"
        release.clear()
        gevent.spawn_later(0.3 * UNIT, release.set)
        assert c.call("slow", "again", timeout=0) == "again"
        c.close()


def test_close_and_jump_on_a_client_that_never_connected_return_at_once():
    server = make_server()
    with inproc_server(server) as url:
        c = WseClient(url)
        # bound well under the 5 s these used to wait for a socket that never was
        with gevent.Timeout(2 * UNIT):
            c.close()
        assert c.status == WSE_STATUS.OFFLINE
        other = WseClient(url)
        with gevent.Timeout(2 * UNIT):
            assert other.jump(url, "jumper") == {"hello": "jumper"}
        assert other.status == WSE_STATUS.READY
        other.close()


def test_error_details_are_an_empty_object_when_the_server_sent_none():
    server = make_server()
    with inproc_server(server) as url:
        c = WseClient(url)
        c.connect("d")
        with pytest.raises(WseError) as info:
            c.call("nobody-home")
        assert info.value.code == WSE_ERROR.RP_NOT_REGISTERED
        assert info.value.details == {}
        c.close()


def test_rp_disconnect_details_carry_only_the_close():
    server = make_server()
    server.register("bye", lambda conn, payload: conn.drop("gone now"))
    with inproc_server(server) as url:
        c = WseClient(url)
        c.connect("b")
        with pytest.raises(WseError) as info:
            c.call("bye")
        assert info.value.code == WSE_ERROR.RP_DISCONNECT
        assert info.value.details == {"disconnected": [1000, "gone now"]}


def test_connected_fires_when_the_socket_opens_before_ready():
    server = make_server()
    with inproc_server(server) as url:
        c = WseClient(url)
        order = []
        c.when.connected(lambda: order.append("connected"))
        c.when.ready(lambda welcome: order.append(("ready", welcome)))
        c.connect("c")
        assert order == ["connected", ("ready", {"hello": "c"})]
        c.close()


def test_ready_and_updated_replay_their_last_value_to_a_late_subscriber():
    server = make_server()
    with inproc_server(server) as url:
        c = WseClient(url)
        c.connect("late")
        ready, updated = [], []
        c.when.ready(ready.append)
        c.when.updated(updated.append)
        assert ready == [{"hello": "late"}]
        assert updated == [WSE_STATUS.READY]
        c.close()
        assert updated == [WSE_STATUS.READY, WSE_STATUS.OFFLINE]
        # closed and error are not replayed
        closed = []
        c.when.closed(lambda code, reason: closed.append(code))
        assert closed == []


def test_a_message_over_the_clients_limit_is_answered_with_1009():
    server = make_server()
    disconnected = []
    server.when.disconnected(lambda conn, code, reason: disconnected.append(code))
    server.register("big", lambda conn, payload: conn.send("blob", "x" * 5000))
    with inproc_server(server) as url:
        c = WseClient(url, max_message_size=1000)
        closed, errors = [], []
        c.when.closed(lambda code, reason: closed.append(code))
        c.when.error(errors.append)
        c.connect("small")
        c.send("nothing", None)
        with pytest.raises(WseError):
            c.call("big")
        wait_for(lambda: disconnected and closed)
        assert disconnected == [1009]  # the server read our close frame
        assert closed == [1009]
        assert errors and errors[0].code == WSE_ERROR.WS_CLIENT_ERROR


def test_a_subprotocol_mismatch_fires_error_and_closed():
    server = make_server(protocol=AltJSON())
    with inproc_server(server) as url:
        c = WseClient(url)
        events = []
        c.when.error(lambda err: events.append(("error", err.code)))
        c.when.closed(lambda code, reason: events.append(("closed", code)))
        with pytest.raises(WseError) as info:
            c.connect("x")
        assert info.value.code == WSE_ERROR.WS_CLIENT_ERROR
        assert events == [("error", WSE_ERROR.WS_CLIENT_ERROR), ("closed", 1006)]
        assert c.status == WSE_STATUS.OFFLINE
