"""Pure tests of the broker's decisions and of the message schema."""
import pytest

from wse_sync.core.broker import BrokerCore
from wse_sync.core.messages import VERSION, Message, SchemaError, decode, encode


def hello(core, w, table=(), limit=1, now=0.0):
    return core.handle(w, Message("hello", {"pid": 1, "limit": limit, "table": list(table)}), now)


def kinds(out):
    return [(w, m.kind) for w, m in out]


def test_schema_roundtrip_and_errors():
    m = decode(encode("send", {"cid": 1}, '["x",null,null]'))
    assert (m.kind, m.body, m.data) == ("send", {"cid": 1}, '["x",null,null]')
    assert decode(encode("bcast", {}, b"\x00\x01")).data == b"\x00\x01"
    for frames in ([b"wse1", b"nope", b"{}"], [b"wse9", b"hb", b"{}"], [b"wse1", b"hb", b"[]"],
                   [b"wse1", b"hb"], [b"wse1", b"hb", b"{", b"t", b""],
                   [b"wse1", b"send", b"{}", b"x", b"data"]):
        with pytest.raises(SchemaError):
            decode(frames)
    assert encode("hb")[0] == VERSION


def test_join_fanout_and_left():
    core = BrokerCore()
    hello(core, "w1")
    hello(core, "w2")
    out = core.handle("w1", Message("join", {"req": 7, "conn_id": "c1", "cid": "u", "limit": 2,
                                             "at": 1.0}), 0)
    joined = [m for w, m in out if m.kind == "joined"][0]
    assert joined.body == {"req": 7, "first": True, "evicted": []}
    assert ("w2", "delta") in kinds(out)
    out = core.handle("w2", Message("join", {"req": 1, "conn_id": "c2", "cid": "u", "limit": 2,
                                             "at": 2.0}), 0)
    assert [m for w, m in out if m.kind == "joined"][0].body["first"] is False
    # send from w2 reaches only other workers holding the user
    out = core.handle("w2", Message("send", {"cid": "u"}, "data"), 0)
    assert kinds(out) == [("w1", "deliver")] and out[0][1].data == "data"
    assert core.handle("w2", Message("send", {"cid": "nobody"}, "d"), 0) == []
    # the first leave is not the last; the second is, and 'left' goes to the leaver
    out = core.handle("w1", Message("leave", {"conn_id": "c1", "code": 1000, "reason": ""}), 0)
    assert [m.body["last"] for w, m in out if m.kind == "left"] == [False]
    out = core.handle("w2", Message("leave", {"conn_id": "c2", "code": 4001, "reason": "r"}), 0)
    left = [(w, m.body) for w, m in out if m.kind == "left"]
    assert left == [("w2", {"conn_id": "c2", "last": True, "cid": "u", "code": 4001,
                           "reason": "r", "meta": None, "fire": "c2"})]


def _last_leave(core, worker, conn_id, cid, joined_started=True):
    core.handle(worker, Message("join", {"req": 1, "conn_id": conn_id, "cid": cid, "limit": 2,
                                         "at": 1.0}), 0)
    if joined_started:
        core.handle(worker, Message("fired", {"ids": [], "joined": [conn_id]}), 0)
    out = core.handle(worker, Message("leave", {"conn_id": conn_id, "code": 1000,
                                                "reason": "bye"}), 0)
    return [m.body for w, m in out if m.kind == "left" and m.body["last"]]


def test_a_left_the_dead_worker_never_started_fires_on_a_survivor():
    core = BrokerCore()
    hello(core, "w1")
    hello(core, "w2")
    # w1 is told to fire 'left' for two users; it confirms one, then dies
    assert _last_leave(core, "w1", "c1", "u1")[0]["fire"] == "c1"
    assert _last_leave(core, "w1", "c2", "u2")[0]["fire"] == "c2"
    core.handle("w1", Message("fired", {"ids": ["c1"]}), 0)
    out = core.remove_worker("w1")
    lefts = [(w, m.body) for w, m in out if m.kind == "left"]
    assert lefts == [("w2", {"last": True, "cid": "u2", "code": 1000, "reason": "bye",
                             "meta": None, "fire": "c2"})]
    assert core.counters["left.refired"] == 1
    # the survivor has it to confirm in turn
    assert list(core.lefts.unfired_of("w2")) == ["c2"]
    core.handle("w2", Message("fired", {"ids": ["c2"]}), 0)
    assert core.lefts.unfired_of("w2") == {}


def test_a_left_superseded_by_a_return_is_not_refired():
    core = BrokerCore()
    hello(core, "w1")
    hello(core, "w2")
    _last_leave(core, "w1", "c1", "u1")
    # the user is back (on w2) before w1's death is known: its 'joined' answer
    # waits for w1's 'left', then goes when w1 is gone
    out = core.handle("w2", Message("join", {"req": 2, "conn_id": "c9", "cid": "u1",
                                             "limit": 2, "at": 2.0}), 0)
    assert [m for w, m in out if m.kind == "joined"] == []
    out = core.remove_worker("w1")
    assert [m for w, m in out if m.kind == "left"] == []
    assert [(w, m.body["first"]) for w, m in out if m.kind == "joined"] == [("w2", True)]
    assert core.counters["left.superseded"] == 1


def test_joined_waits_for_the_users_left_to_start_elsewhere():
    """'left' on w1, then 'joined' on w2, in this order for the application."""
    core = BrokerCore(worker_timeout=100.0)
    hello(core, "w1")
    hello(core, "w2")
    _last_leave(core, "w1", "c1", "u1")
    out = core.handle("w2", Message("join", {"req": 5, "conn_id": "c2", "cid": "u1",
                                             "limit": 2, "at": 2.0}), 10.0)
    assert [m for w, m in out if m.kind == "joined"] == []
    out = core.handle("w1", Message("fired", {"ids": ["c1"]}), 10.1)
    assert [(w, m.body) for w, m in out] == [("w2", {"req": 5, "first": True, "evicted": []})]
    # a worker too slow to start it holds a welcome JOIN_HOLD seconds at most
    _last_leave(core, "w1", "c3", "u3")
    core.handle("w2", Message("join", {"req": 6, "conn_id": "c4", "cid": "u3", "limit": 2,
                                       "at": 3.0}), 20.0)
    assert [m for w, m in core.tick(20.5) if m.kind == "joined"] == []
    assert [w for w, m in core.tick(22.1) if m.kind == "joined"] == ["w2"]
    assert core.counters["joined.hold-expired"] == 1


def test_fired_is_checked():
    core = BrokerCore()
    hello(core, "w1")
    assert core.handle("w1", Message("fired", {"ids": "c1"}), 0) == []
    assert core.counters["dropped.malformed"] == 1


def test_eviction_goes_to_the_holder():
    core = BrokerCore()
    hello(core, "w1")
    hello(core, "w2")
    core.handle("w1", Message("join", {"req": 1, "conn_id": "old", "cid": "u", "limit": 1,
                                       "at": 1.0}), 0)
    out = core.handle("w2", Message("join", {"req": 2, "conn_id": "new", "cid": "u", "limit": 1,
                                             "at": 2.0}), 0)
    drops = [(w, m.body) for w, m in out if m.kind == "drop"]
    assert drops == [("w1", {"conns": ["old"], "reason": "wse.clients-concurrency"})]
    joined = [m.body for w, m in out if m.kind == "joined"][0]
    assert joined["evicted"] == ["old"] and joined["first"] is False


def test_broadcast_once_per_other_worker():
    core = BrokerCore()
    for w in ("w1", "w2", "w3"):
        hello(core, w)
    out = core.handle("w1", Message("bcast", {}, "frame"), 0)
    assert sorted(kinds(out)) == [("w2", "deliver"), ("w3", "deliver")]


def test_dead_worker_is_removed_and_left_fires_on_a_survivor():
    core = BrokerCore(worker_timeout=3)
    hello(core, "w1", now=0)
    hello(core, "w2", now=0)
    core.handle("w1", Message("join", {"req": 1, "conn_id": "a", "cid": "alice", "limit": 2}), 0)
    core.handle("w1", Message("join", {"req": 2, "conn_id": "b", "cid": "bob", "limit": 2}), 0)
    # (w1 started their 'joined': now their 'left' is due if it dies)
    core.handle("w1", Message("fired", {"ids": [], "joined": ["a", "b"]}), 0)
    core.handle("w2", Message("join", {"req": 3, "conn_id": "b2", "cid": "bob", "limit": 2}), 0)
    core.handle("w2", Message("hb", {}), 3.5)
    out = core.tick(4.0)
    assert "w1" not in core.workers
    left = [(w, m.body["cid"]) for w, m in out if m.kind == "left"]
    assert left == [("w2", "alice")]
    assert set(core.registry.conns) == {"b2"}


def test_call_to_unknown_connection_is_answered_at_once():
    core = BrokerCore()
    hello(core, "w1")
    out = core.handle("w1", Message("call", {"call": 5, "conn_id": "zz", "rp": "x"}), 0)
    assert kinds(out) == [("w1", "result")]
    assert out[0][1].body["ok"] is False
    assert out[0][1].body["value"]["code"] == "wse.client.not-ready"


def test_unknown_worker_is_asked_for_its_table():
    core = BrokerCore()
    out = core.handle("ghost", Message("hb", {}), 0)
    assert kinds(out) == [("ghost", "reset")]


def test_malformed_body_is_counted_not_fatal():
    core = BrokerCore()
    hello(core, "w1")
    assert core.handle("w1", Message("join", {"req": 1}), 0) == []
    assert core.counters["dropped.malformed"] == 1


def test_stats():
    core = BrokerCore()
    hello(core, "w1")
    core.handle("w1", Message("join", {"req": 1, "conn_id": "a", "cid": "u"}), 0)
    stats = core.stats()
    assert stats["users"] == 1 and stats["connections"] == 1
    assert stats["workers"]["w1"]["connections"] == 1


def test_messages_of_an_unknown_worker_wait_for_its_table():
    core = BrokerCore()
    hello(core, "w2")
    core.handle("w2", Message("join", {"req": 1, "conn_id": "b", "cid": "bob"}), 0)
    # a worker the (restarted) broker does not know sends before its hello
    assert kinds(core.handle("w1", Message("send", {"cid": "bob"}, "x"), 0)) == [("w1", "reset")]
    assert core.handle("w1", Message("hb", {}), 0) == []  # one reset is enough
    out = hello(core, "w1", table=[["a", "alice", None, 1.0]])
    assert ("w1", "snapshot") in kinds(out)
    # the held send is carried out after the table
    assert [(w, m.data) for w, m in out if m.kind == "deliver"] == [("w2", "x")]
    assert set(core.registry.conns) == {"a", "b"}


def test_leave_known_only_to_a_previous_broker_fires_left_once_per_answer():
    core = BrokerCore(epoch="new")
    hello(core, "w1")
    old = {"conn_id": "gone", "cid": "carol", "code": 1000, "reason": "", "epoch": "old"}
    out = core.handle("w1", Message("leave", old), 0)
    assert [m.body["last"] for w, m in out if m.kind == "left"] == [True]
    # a leave of a connection this broker evicted itself is not a 'left'
    same = dict(old, epoch="new")
    out = core.handle("w1", Message("leave", same), 0)
    assert [m.body["last"] for w, m in out if m.kind == "left"] == [False]


def test_calls_towards_a_dead_worker_fail_with_rp_disconnect():
    core = BrokerCore(worker_timeout=3)
    hello(core, "w1", now=0)
    hello(core, "w2", now=0)
    core.handle("w2", Message("join", {"req": 1, "conn_id": "c", "cid": "u"}), 0)
    out = core.handle("w1", Message("call", {"call": 9, "conn_id": "c", "rp": "x"}), 0)
    assert kinds(out) == [("w2", "call")]
    core.handle("w1", Message("hb", {}), 3.5)
    out = core.tick(4.0)
    results = [(w, m.body) for w, m in out if m.kind == "result"]
    assert results == [("w1", {"call": 9, "ok": False, "value": {
        "code": "wse.client.rp.disconnect",
        "details": {"disconnected": [1006, "wse.worker-died"]}}})]


def test_routed_commands_wait_for_the_map_after_a_restart():
    core = BrokerCore(sync_window=2.0)
    # a worker that knew the previous broker speaks before its hello
    assert [m.kind for w, m in core.handle("w1", Message("hb", {}), 0.0)] == ["reset"]
    hello(core, "w1", now=0.0)
    out = core.handle("w1", Message("send", {"cid": "bob", "seq": 1}, "x"), 0.5)
    assert out == []  # bob's worker has not sent its table yet
    hello(core, "w2", table=[["b", "bob", None, 1.0]], now=1.0)
    assert [m.kind for w, m in core.tick(1.5) if m.kind != "hb"] == []  # still held
    out = core.tick(2.5)
    assert [(w, m.data) for w, m in out if m.kind == "deliver"] == [("w2", "x")]


def test_commands_are_acked_and_duplicates_dropped():
    core = BrokerCore()
    hello(core, "w1")
    hello(core, "w2", table=[["b", "bob", None, 1.0]])
    out = core.handle("w1", Message("send", {"cid": "bob", "seq": 1}, "x"), 0)
    assert kinds(out) == [("w2", "deliver")]
    assert core.handle("w1", Message("send", {"cid": "bob", "seq": 1}, "x"), 0) == []
    assert core.counters["dropped.duplicate"] == 1
    hb = [m.body for w, m in core.tick(0.5) if w == "w1"]
    assert hb == [{"ack": 1, "epoch": core.epoch}]


def test_malformed_hello_changes_nothing():
    core = BrokerCore()
    for body in ({"pid": "x"}, {"pid": 1, "table": [["only-id"]]}, {"pid": 1, "limit": "3"}):
        assert core.handle("w", Message("hello", body), 0) == []
    assert core.workers == {} and core.counters["dropped.malformed"] == 3


def test_left_of_a_dead_worker_never_goes_to_a_member_without_sockets():
    core = BrokerCore(worker_timeout=3)
    core.handle("handle", Message("hello", {"pid": 1, "table": [], "serves": False}), 0)
    hello(core, "w1", now=0)
    hello(core, "w2", now=0)
    for i in range(4):
        core.handle("w1", Message("join", {"req": i, "conn_id": f"c{i}", "cid": f"u{i}"}), 0)
        core.handle("w1", Message("fired", {"ids": [], "joined": [f"c{i}"]}), 0)
    core.handle("w2", Message("hb", {}), 3.5)
    core.handle("handle", Message("hb", {}), 3.5)
    out = core.tick(4.0)
    assert sorted(w for w, m in out if m.kind == "left") == ["w2"] * 4


def test_batches_split_back_into_their_messages():
    from wse_sync.core.messages import batch, split
    one = encode("hb")
    assert batch([one]) == one and split(one) == [one]
    many = [encode("send", {"cid": 1}, "x"), encode("hb"), encode("bcast", {}, b"\x00")]
    assert [decode(m).kind for m in split(batch(many))] == ["send", "hb", "bcast"]
    with pytest.raises(SchemaError):
        split([b"wse1", b"batch", b'{"n": [3, 9]}', b"a", b"b", b"c"])
    with pytest.raises(SchemaError):
        split([b"wse1", b"batch", b"nope"])
    packed = batch(many)
    assert len(packed) == 4 and packed[1] == b"pack"   # 4 frames whatever the count
    assert split(packed) == many
    old = [b"wse1", b"batch", b'{"n": [3, 3]}', *many[1], *many[0][:3]]
    assert [decode(m).kind for m in split(old)] == ["hb", "send"]
    for head, blob in ((b'{"n": [3], "len": [1, 1, 1]}', b"ab"),     # lengths != blob
                       (b'{"n": [2], "len": [1, 1, 0]}', b"ab"),     # counts != lengths
                       (b'{"n": [3], "len": [-1, 2, 1]}', b"ab"),
                       (b'{"len": [2]}', b"ab"), (b"[", b"")):
        with pytest.raises(SchemaError):
            split([b"wse1", b"pack", head, blob])
    with pytest.raises(SchemaError):
        split([b"wse1", b"pack", b'{"n": [1], "len": [2]}'])         # 3 frames


def test_joins_decided_during_an_outage_fire_joined_once_after_the_resync():
    core = BrokerCore(sync_window=2.0, epoch="new")
    # both workers accepted "u" while the broker was away; "v" was known before
    core.handle("w1", Message("hello", {"pid": 1, "table": [
        ["a", "u", None, 2.0, True], ["v1", "v", None, 0.5, False]]}), 0.0)
    core.handle("w2", Message("hello", {"pid": 2, "table": [
        ["b", "u", None, 1.0, True], ["v2", "v", None, 3.0, True]]}), 0.5)
    assert [m.kind for w, m in core.tick(1.0) if m.kind == "resolved"] == []  # still syncing
    out = {w: m.body for w, m in core.tick(2.5) if m.kind == "resolved"}
    # 'u' is new: joined fires once, for its oldest connection (b, on w2); 'v' existed
    assert out == {"w1": {"conns": ["a"], "first": []},
                   "w2": {"conns": ["b", "v2"], "first": ["b"]}}
    assert core.announced == {"u", "v"}


def test_no_left_for_a_user_whose_joined_never_fired():
    core = BrokerCore(sync_window=5.0)
    core.handle("w1", Message("hello", {"pid": 1, "table": [["a", "u", None, 1.0, True]]}), 0)
    # held while the map is rebuilt, answered after
    assert core.handle("w1", Message("leave", {"conn_id": "a", "cid": "u", "pending": True}), 1) == []
    out = core.tick(6.0)
    assert [m.body["last"] for w, m in out if m.kind == "left"] == [False]
    assert [m.kind for w, m in out if m.kind not in ("hb", "left", "delta")] == []
    assert core.announced == set()


def test_a_worker_declared_dead_that_comes_back_gets_joined_again():
    core = BrokerCore(worker_timeout=3)
    hello(core, "w1", now=0)
    hello(core, "w2", now=0)
    core.handle("w1", Message("join", {"req": 1, "conn_id": "a", "cid": "u"}), 0)
    core.handle("w1", Message("fired", {"ids": [], "joined": ["a"]}), 0)
    core.handle("w2", Message("hb", {}), 3.5)
    out = core.tick(4.0)  # w1 silent: removed, 'left' for u on w2
    assert [(w, m.body["cid"]) for w, m in out if m.kind == "left"] == [("w2", "u")]
    out = core.handle("w1", Message("hb", {}), 5.0)  # it was only blocked
    assert [m.kind for w, m in out] == ["reset"]
    out = core.handle("w1", Message("hello", {"pid": 1, "table": [["a", "u", None, 1.0]]}), 5.1)
    assert [(w, m.body) for w, m in out if m.kind == "resolved"] == [
        ("w1", {"conns": ["a"], "first": ["a"]})]



def test_a_leave_while_the_map_is_rebuilt_waits_for_every_table():
    core = BrokerCore(sync_window=2.0, epoch="new")
    core.handle("w1", Message("hb", {}), 0.0)  # it knew the previous broker
    hello(core, "w1", now=0.0)
    # a leave known only to the old broker, for a user still connected on w2
    old = {"conn_id": "gone", "cid": "u", "code": 1000, "reason": "", "epoch": "old"}
    assert core.handle("w1", Message("leave", old), 0.5) == []
    hello(core, "w2", table=[["b", "u", None, 1.0]], now=1.0)
    out = core.tick(2.5)
    assert [m.body["last"] for w, m in out if m.kind == "left"] == [False]



def test_a_fresh_cluster_is_not_held():
    core = BrokerCore(sync_window=2.0)
    hello(core, "w1", now=0.0)
    hello(core, "w2", table=[], now=0.0)
    out = core.handle("w1", Message("join", {"req": 1, "conn_id": "a", "cid": "u"}), 0.1)
    assert [m.body["first"] for w, m in out if m.kind == "joined"] == [True]


# -- roles and checks (what a peer's key allows, what a message may claim) ---------
from wse_sync.core.checks import (CLIENT_KINDS, OBSERVER_KINDS, ROLE_CLIENT,  # noqa: E402
                                  ROLE_OBSERVER, ROLE_WORKER, check)


def map_of(core):
    return {c: (e.cid, e.worker) for c, e in core.registry.conns.items()}


def two_workers_and_a_client(role=ROLE_CLIENT):
    core = BrokerCore()
    hello(core, "w1", table=[["a", "alice", {"m": 1}, 1.0]])
    hello(core, "w2", table=[["b", "bob", None, 2.0]])
    # (no "replica": false in this hello: the default asks for a copy of the map)
    out = core.handle("h", Message("hello", {"pid": 9, "table": [], "serves": False}), 0,
                      role=role)
    assert kinds(out)[0] == ("h", "snapshot")
    entries = [e for w, m in out if m.kind == "snapshot" for e in m.body["entries"]]
    assert sorted(e[1] for e in entries) == ([] if role == ROLE_CLIENT else ["alice", "bob"])
    return core


def test_a_client_key_may_only_send_broadcast_drop_and_ask_for_stats():
    core = two_workers_and_a_client()
    before = map_of(core)
    forbidden = [
        Message("join", {"req": 1, "conn_id": "c", "cid": "carol"}),
        Message("leave", {"conn_id": "a", "cid": "alice"}),
        Message("call", {"call": 1, "conn_id": "a", "rp": "x"}),
        Message("result", {"call": 1, "origin": "w1", "ok": True, "value": 1}),
        Message("conn_send", {"conn_id": "a", "seq": 1}, "x"),
        Message("conn_drop", {"conn_id": "a", "reason": "", "seq": 2}),
    ]
    for msg in forbidden:
        assert core.handle("h", msg, 0, role=ROLE_CLIENT) == [], msg.kind
    assert core.counters["refused.role"] == len(forbidden)
    assert map_of(core) == before
    # what a connect_cluster() handle does
    out = core.handle("h", Message("send", {"cid": "alice", "seq": 1}, "hi"), 0, role=ROLE_CLIENT)
    assert kinds(out) == [("w1", "deliver")]
    out = core.handle("h", Message("bcast", {"seq": 2}, "all"), 0, role=ROLE_CLIENT)
    assert sorted(kinds(out)) == [("w1", "deliver"), ("w2", "deliver")]
    out = core.handle("h", Message("drop_cid", {"cid": "bob", "reason": "r", "seq": 3}), 0,
                      role=ROLE_CLIENT)
    assert kinds(out) == [("w2", "drop")]
    assert kinds(core.handle("h", Message("stats", {}), 0, role=ROLE_CLIENT)) == [("h", "stats")]
    assert core.stats()["workers"]["h"]["role"] == ROLE_CLIENT
    # the map is not for it to read: a lookup is answered with the refusal at once
    for body in ({"req": 7, "cids": ["alice", "zed"]}, {"req": 8, "all": True},
                 {"req": 9, "count": True}):
        out = core.handle("h", Message("lookup", body), 0, role=ROLE_CLIENT)
        assert [(w, m.kind, sorted(m.body)) for w, m in out] == [("h", "users",
                                                                  ["refused", "req"])]
        assert "lookup" in out[0][1].body["refused"]
    assert core.counters["refused.role"] == len(forbidden) + 3
    # and it is told of no change to the map
    out = core.handle("w1", Message("join", {"req": 2, "conn_id": "c", "cid": "carol",
                                             "at": 3.0}), 0)
    assert ("h", "delta") not in kinds(out)
    assert core.handle("h", Message("hb", {}), 0, role=ROLE_CLIENT) == []
    core.handle("h", Message("bye", {}), 0, role=ROLE_CLIENT)
    assert "h" not in core.workers
    assert CLIENT_KINDS == {"hello", "hb", "bye", "stats", "send", "bcast", "drop_cid"}


def test_an_observer_key_may_also_read_the_map_and_nothing_more():
    core = two_workers_and_a_client(ROLE_OBSERVER)
    out = core.handle("h", Message("lookup", {"req": 7, "cids": ["alice", "zed"]}), 0,
                      role=ROLE_OBSERVER)
    assert [(w, m.kind, m.body) for w, m in out] == [
        ("h", "users", {"req": 7, "users": [["alice", [["a", "w1", {"m": 1}]]]]})]
    out = core.handle("w1", Message("join", {"req": 2, "conn_id": "c", "cid": "carol",
                                             "at": 3.0}), 0)
    assert ("h", "delta") in kinds(out)
    before = map_of(core)
    for msg in (Message("join", {"req": 1, "conn_id": "d", "cid": "dan"}),
                Message("leave", {"conn_id": "a", "cid": "alice"}),
                Message("conn_drop", {"conn_id": "a", "reason": "", "seq": 2})):
        assert core.handle("h", msg, 0, role=ROLE_OBSERVER) == [], msg.kind
    assert core.counters["refused.role"] == 3 and map_of(core) == before
    assert OBSERVER_KINDS == CLIENT_KINDS | {"lookup"}


def test_a_client_hello_with_a_table_is_refused_and_spoofs_no_delta():
    core = two_workers_and_a_client()
    before = map_of(core)
    spoof = {"pid": 9, "table": [["x", "eve", None, 3.0], ["a", "alice", None, 0.5]]}
    assert core.handle("h2", Message("hello", spoof), 0, role=ROLE_CLIENT) == []
    assert core.counters["refused.role"] == 1
    assert map_of(core) == before and "h2" not in core.workers
    # and a client that says it serves sockets gets no 'left' nor broadcasts
    core.handle("h3", Message("hello", {"pid": 9, "table": [], "serves": True}), 0,
                role=ROLE_CLIENT)
    assert core.workers["h3"].serves is False
    out = core.handle("w1", Message("bcast", {"seq": 1}, "x"), 0)
    assert sorted(kinds(out)) == [("w2", "deliver")]


def test_a_join_may_not_take_a_connection_another_worker_holds():
    core = two_workers_and_a_client()
    before = map_of(core)
    # w2 claims w1's connection "a" (it would evict it and own alice's connection)
    out = core.handle("w2", Message("join", {"req": 5, "conn_id": "a", "cid": "mallory",
                                             "limit": 1}), 0)
    assert out == [] and map_of(core) == before
    assert core.counters["refused.conn-taken"] == 1
    # nor through its table
    out = hello(core, "w2", table=[["b", "bob", None, 2.0], ["a", "alice", None, 0.1]])
    assert map_of(core) == before
    assert core.counters["refused.conn-taken"] == 2
    assert not [m for w, m in out if m.kind == "drop"]
    # the holder itself may join it again (its own table, replaced)
    out = core.handle("w1", Message("join", {"req": 6, "conn_id": "a", "cid": "alice"}), 0)
    assert [m.kind for w, m in out if w == "w1"] == ["joined"]


def test_a_leave_of_a_connection_held_elsewhere_is_refused():
    core = two_workers_and_a_client()
    before = map_of(core)
    out = core.handle("w2", Message("leave", {"conn_id": "a", "cid": "alice", "code": 1000,
                                              "reason": ""}), 0)
    assert out == [] and map_of(core) == before
    assert core.counters["refused.not-holder"] == 1
    # its holder's leave goes through
    out = core.handle("w1", Message("leave", {"conn_id": "a", "cid": "alice", "code": 1000,
                                              "reason": ""}), 0)
    assert [m.body["last"] for w, m in out if m.kind == "left"] == [True]
    assert "a" not in core.registry.conns


def test_a_result_must_come_from_the_worker_the_call_went_to():
    core = two_workers_and_a_client()
    hello(core, "w3")
    out = core.handle("w1", Message("call", {"call": 7, "conn_id": "b", "rp": "x"}), 0)
    assert kinds(out) == [("w2", "call")] and out[0][1].body["origin"] == "w1"
    forged = {"call": 7, "origin": "w1", "ok": True, "value": "forged"}
    assert core.handle("w3", Message("result", forged), 0) == []
    assert core.counters["refused.not-holder"] == 1
    # the holder's answer goes back to the caller, once
    real = {"call": 7, "origin": "w1", "ok": True, "value": "real"}
    out = core.handle("w2", Message("result", real), 0)
    assert [(w, m.body) for w, m in out] == [("w1", {"call": 7, "ok": True, "value": "real"})]
    assert core.handle("w2", Message("result", real), 0) == []  # answered already
    assert core.counters["dropped.unknown-call"] == 1
    # a result for a call nobody made reaches nobody
    assert core.handle("w3", Message("result", dict(forged, call=99)), 0) == []


def test_a_routing_identity_stays_with_the_key_that_first_used_it():
    core = BrokerCore()
    hello(core, "w1", table=[["a", "alice", None, 1.0]])
    core.handle("w1", Message("hb", {}), 0, key="KEY-W1")
    before = map_of(core)
    # another key (a client's) under w1's identity: neither bye nor hello in its name
    for msg in (Message("bye", {}), Message("hello", {"pid": 1, "table": []})):
        core.handle("w1", msg, 0, role=ROLE_CLIENT, key="KEY-OTHER")
    assert core.counters["refused.identity-taken"] == 2
    # and nothing more is routed to that identity: the worker's own link is down
    # (one link per identity), so it is removed at once rather than after 3 s
    assert "w1" not in core.workers and core.registry.conns == {}
    assert core.handle("w1", Message("hb", {}), 0, key="KEY-W1") == [("w1", Message("reset", {}))]
    hello(core, "w1", table=[["a", "alice", None, 1.0]])
    assert map_of(core) == before
    assert core.counters["refused.identity-taken"] == 2


def test_a_worker_whose_key_becomes_a_client_key_loses_its_connections():
    core = BrokerCore()
    hello(core, "w1", table=[["a", "alice", None, 1.0]])
    out = core.handle("w1", Message("hb", {}), 0, role=ROLE_CLIENT)
    assert "w1" not in core.workers and core.registry.conns == {}
    assert ("w1", "reset") in kinds(out)


@pytest.mark.parametrize("msg,what", [
    (Message("join", {"req": 1, "conn_id": 5, "cid": "u"}), "dropped.malformed"),
    (Message("join", {"req": 1, "conn_id": "c", "cid": ["u"]}), "dropped.malformed"),
    (Message("join", {"req": 1, "conn_id": "c", "cid": True}), "dropped.malformed"),
    (Message("join", {"req": 1, "conn_id": "c", "cid": "u", "at": "later"}), "dropped.malformed"),
    (Message("join", {"req": 1, "conn_id": "c" * 129, "cid": "u"}), "dropped.oversize"),
    (Message("join", {"req": 1, "conn_id": "c", "cid": "u" * 1025}), "dropped.oversize"),
    (Message("join", {"req": [1], "conn_id": "c", "cid": "u"}), "dropped.malformed"),
    (Message("leave", {"conn_id": ""}), "dropped.malformed"),
    (Message("leave", {"conn_id": "c", "reason": "r" * 5000}), "dropped.oversize"),
    (Message("send", {"cid": "u", "seq": "1"}, "x"), "dropped.malformed"),
    (Message("send", {"cid": "u", "seq": 1}), "dropped.malformed"),
    (Message("bcast", {"seq": 1.5}, "x"), "dropped.malformed"),
    (Message("call", {"call": 1, "conn_id": "c"}), "dropped.malformed"),
    (Message("call", {"call": 1, "conn_id": "c", "rp": "x", "timeout": "soon"}),
     "dropped.malformed"),
    (Message("result", {"call": 1, "ok": True}), "dropped.malformed"),
    (Message("hello", {"pid": 1, "table": [["c", "u", None, float("inf")]]}),
     "dropped.malformed"),
    (Message("hello", {"pid": 1, "table": [["c", "u", None, 1.0, "yes"]]}), "dropped.malformed"),
    (Message("hello", {"pid": 1, "table": {"c": "u"}}), "dropped.malformed"),
    (Message("hello", {"pid": 1, "serves": "no"}), "dropped.malformed"),
    (Message("hello", {"pid": 1, "sync": "1"}), "dropped.malformed"),
    (Message("snapshot", {}), "dropped.unexpected"),
])
def test_malformed_and_oversize_messages_are_dropped_and_counted(msg, what):
    core = two_workers_and_a_client()
    before, workers = map_of(core), set(core.workers)
    assert check(msg, ROLE_WORKER).what == what
    assert core.handle("w1", msg, 0) == []
    assert core.counters[what] == 1
    assert map_of(core) == before and set(core.workers) == workers


def test_what_honest_peers_send_passes_the_checks():
    from wse_sync.core.link import LinkCore
    link = LinkCore("w1", lambda: [("c1", "u", {"m": 1}, 1.5)], limit=2)
    out = link.hello()
    out += link.join("c2", 7, None, 2.0, [], 2).out
    out += link.leave("c1", "u", {"m": 1}, 1000, "wse.by-client")
    out += link.command("send", {"cid": "u"}, "frame", 0)
    out += link.command("bcast", {}, b"\x00", 0)
    out += link.command("drop_cid", {"cid": 7, "reason": "r"}, None, 0)
    out += link.command("conn_send", {"conn_id": "c2"}, "frame", 0)
    out += link.command("conn_drop", {"conn_id": "c2", "reason": ""}, None, 0)
    out += link.call("c9", "rp", {"x": 1}, 5.0)[1]
    out += LinkCore.call_result({"call": 3, "origin": "w2"}, False, {"code": "e"})
    out += [Message("hb", {}), Message("stats", {})] + link.bye()
    for m in out:
        assert check(m, ROLE_WORKER) is None, m
    client = LinkCore("h", lambda: [], serves=False)
    for m in client.hello() + client.command("send", {"cid": "u"}, "f", 0) + client.bye():
        assert check(m, ROLE_CLIENT) is None, m


def test_a_hello_gets_the_map_in_parts_between_other_work():
    core = BrokerCore(snapshot_chunk=2)
    hello(core, "w1", table=[[f"c{i}", f"u{i}", None, float(i)] for i in range(5)], limit=None)
    out = core.handle("w2", Message("hello", {"pid": 2, "limit": None, "table": [], "sync": 7}), 0)
    first = [m for w, m in out if w == "w2"][0]
    assert first.kind == "snapshot" and first.body["part"] == 0 and first.body["of"] == 3
    assert first.body["sync"] == 7 and len(first.body["entries"]) == 2
    assert core.streaming
    # other work goes on between the parts; a join's delta reaches w2 too
    out = core.handle("w1", Message("join", {"req": 1, "conn_id": "c9", "cid": "u9"}), 0)
    assert ("w2", "delta") in kinds(out)
    parts = core.pump(1) + core.pump(5)
    assert [m.body["part"] for _w, m in parts] == [1, 2] and not core.streaming
    assert sum(len(m.body["entries"]) for _w, m in parts) == 3  # the map as at the hello
    # a worker from before streamed snapshots (no sync) gets the map at once
    out = core.handle("w3", Message("hello", {"pid": 3, "table": []}), 0)
    assert len(out[0][1].body["entries"]) == 6 and "part" not in out[0][1].body


def test_a_stall_of_the_broker_is_not_counted_as_silence_of_its_workers():
    core = BrokerCore(worker_timeout=3.0)
    hello(core, "w1", now=0.0)
    core.tick(1.0)
    # one long message kept the loop busy 5 s: w1's heartbeats wait in the socket
    assert "w1" in core.workers and not any(m.kind == "left" for _w, m in core.tick(6.0))
    assert "w1" in core.workers and core.counters["stalls"] == 1
    for t in (7.0, 8.0, 9.0, 10.0):   # listening again, and w1 really is silent
        core.tick(t)
    assert "w1" not in core.workers


def _script(seed: int) -> list:
    """A random run of (sender, message, role, key) mixing steady kinds with
    hellos, byes, malformed bodies, a client key and a stolen identity."""
    import random
    rnd = random.Random(seed)
    out = [(w, Message("hello", {"pid": 1, "limit": 2, "table": [], "sync": 0}), "worker", None)
           for w in ("w1", "w2")]
    for i in range(400):
        sender = rnd.choice(["w1", "w2", "w3"])
        role, key = ("client", "kc") if sender == "w3" and rnd.random() < 0.5 else ("worker", None)
        if rnd.random() < 0.02:
            key = rnd.choice(["k1", "k2"])
        cid = f"u{rnd.randrange(6)}"
        conn = f"{sender}-c{rnd.randrange(4)}"
        r = rnd.random()
        if r < 0.015:
            msg = Message("hello", {"pid": 1, "limit": 2, "table": [], "sync": i,
                                    "base": rnd.randrange(3)})
        elif r < 0.02:
            msg = Message("bye", {})
        elif r < 0.3:
            msg = Message("join", {"req": i, "conn_id": conn, "cid": cid, "limit": 2,
                                   "at": float(i)})
        elif r < 0.38:
            msg = Message("leave", {"conn_id": conn, "cid": cid, "code": 1000, "reason": ""})
        elif r < 0.7:
            msg = Message("send", {"cid": cid, "seq": i}, '["m",1,null]')
        elif r < 0.75:
            msg = Message("send", {"cid": [cid], "seq": i}, '["m",1,null]')  # malformed
        elif r < 0.85:
            msg = Message("bcast", {"seq": i}, '["b",1,null]')
        elif r < 0.9:
            msg = Message("hb", {})
        elif r < 0.95:
            msg = Message("stats", {})
        else:
            msg = Message("lookup", {"req": i, "cids": [cid]})
        out.append((sender, msg, role, key))
    return out


@pytest.mark.parametrize("seed", range(8))
def test_handle_all_is_handle_of_each_message(seed):
    """The shell hands each peer's batch to handle_all: the same outcome as
    handle, message by message, whatever the batch holds."""
    import copy
    import itertools
    script = _script(seed)
    one, many = BrokerCore(epoch="e"), BrokerCore(epoch="e")
    out_one, out_many = [], []
    for (sender, role, key), run in itertools.groupby(script, key=lambda s: (s[0], s[2], s[3])):
        run = [m for _s, m, _r, _k in run]
        for msg in run:
            out_one += one.handle(sender, copy.deepcopy(msg), 1.0, role, key)
        out_many += many.handle_all(sender, copy.deepcopy(run), 1.0, role, key)
    assert [(w, m.kind, m.body, m.data) for w, m in out_one] == \
        [(w, m.kind, m.body, m.data) for w, m in out_many]
    assert one.counters == many.counters
    assert map_of(one) == map_of(many) and set(one.workers) == set(many.workers)
    assert one.counters["in.send"] > 50 and one.counters["routed"] > 15


def test_a_worker_that_dies_before_its_joined_started_gets_no_left_for_it():
    """No 'left' without a 'joined': the user joined on w1 (first), w1 died
    before confirming that its 'joined' started."""
    core = BrokerCore()
    hello(core, "w1")
    hello(core, "w2")
    for conn_id, cid in (("c1", "u1"), ("c2", "u2")):
        core.handle("w1", Message("join", {"req": 1, "conn_id": conn_id, "cid": cid,
                                           "limit": 2, "at": 1.0}), 0)
    core.handle("w1", Message("fired", {"ids": [], "joined": ["c1"]}), 0)
    out = core.remove_worker("w1")
    assert [m.body["cid"] for w, m in out if m.kind == "left"] == ["u1"]
    assert core.counters["left.never-joined"] == 1


def test_a_user_who_joined_and_left_on_a_worker_that_ran_neither_event_gets_neither():
    core = BrokerCore()
    hello(core, "w1")
    hello(core, "w2")
    # joined, then left, and w1 started neither event before it died
    assert _last_leave(core, "w1", "c1", "u1", joined_started=False)[0]["fire"] == "c1"
    out = core.remove_worker("w1")
    assert [m for w, m in out if m.kind == "left"] == []
    assert core.counters["left.never-joined"] == 1


def test_a_stopping_workers_users_get_their_left_from_a_worker_that_stays():
    """A stopping worker may be gone before it runs the events of its last
    leaves (the broker answers them late when it is behind): another fires."""
    core = BrokerCore()
    hello(core, "w1")
    hello(core, "w2")
    core.handle("w1", Message("join", {"req": 1, "conn_id": "c1", "cid": "u1", "limit": 2,
                                       "at": 1.0}), 0)
    core.handle("w1", Message("fired", {"ids": [], "joined": ["c1"]}), 0)
    core.handle("w1", Message("stopping", {}), 0)
    out = core.handle("w1", Message("leave", {"conn_id": "c1", "code": 1012, "reason": ""}), 0)
    lefts = [(w, m.body) for w, m in out if m.kind == "left"]
    assert lefts == [
        ("w2", {"last": True, "cid": "u1", "code": 1012, "reason": "", "meta": None,
                "fire": "c1"}),
        ("w1", {"conn_id": "c1", "last": False, "cid": "u1", "code": 1012, "reason": "",
                "meta": None})]
    # the stopping worker leaves: nothing more to fire for it
    assert [m for w, m in core.remove_worker("w1") if m.kind == "left"] == []
    assert list(core.lefts.unfired_of("w2")) == ["c1"]


def test_stopping_is_answered_with_whether_others_fire_its_lefts():
    core = BrokerCore()
    hello(core, "w1")
    hello(core, "w2")
    assert [(w, m.body) for w, m in core.handle("w1", Message("stopping", {}), 0)] == [
        ("w1", {"others": True})]
    # the last one stopping fires its own users' 'left' (a full stop)
    assert [(w, m.body) for w, m in core.handle("w2", Message("stopping", {}), 0)] == [
        ("w2", {"others": False})]


def test_every_worker_kind_the_core_carries_out_is_in_its_dispatch_table():
    core = BrokerCore()
    methods = {name[len("_on_"):] for name in dir(BrokerCore) if name.startswith("_on_")}
    assert set(core._handlers) == methods
    assert all(core._handlers[k].__name__ == "_on_" + k for k in methods)
