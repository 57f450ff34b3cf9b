"""Pure tests of the broker's map and its rules."""
from wse_sync.core.registry import ConnEntry, Registry


def test_first_join_and_last_leave():
    r = Registry()
    assert r.join("c1", "u", "w1").first is True
    assert r.join("c2", "u", "w2", limit=2).first is False
    assert r.workers_of("u") == ["w1", "w2"]
    out = r.leave("c1")
    assert out.last is False and out.entry.worker == "w1"
    out = r.leave("c2")
    assert out.last is True
    assert "u" not in r.users and not r.conns
    assert r.leave("c2") is None  # unknown: nothing changes


def test_cids_keep_their_type():
    r = Registry()
    r.join("a", 1, "w")
    r.join("b", "1", "w")
    assert set(r.users) == {1, "1"}


def test_eviction_takes_the_oldest_beyond_the_limit():
    r = Registry()
    r.join("c1", "u", "w1", joined_at=1.0)
    r.join("c2", "u", "w2", joined_at=2.0, limit=3)
    r.join("c3", "u", "w1", joined_at=3.0, limit=3)
    out = r.join("c4", "u", "w2", joined_at=4.0, limit=2)
    assert [e.conn_id for e in out.evicted] == ["c1", "c2"]
    assert set(r.users["u"]) == {"c3", "c4"}
    # an evicted connection's later leave changes nothing (no 'left')
    assert r.leave("c1") is None


def test_limit_one_keeps_the_new_connection():
    r = Registry()
    r.join("c1", "u", "w1", limit=1)
    out = r.join("c2", "u", "w1", limit=1)
    assert out.first is False and [e.conn_id for e in out.evicted] == ["c1"]
    assert list(r.users["u"]) == ["c2"]


def test_drop_worker_reports_last_connections():
    r = Registry()
    r.join("a1", "alice", "w1")
    r.join("a2", "alice", "w2", limit=2)
    r.join("b1", "bob", "w1")
    outs = r.drop_worker("w1")
    last = {o.entry.cid: o.last for o in outs}
    assert last == {"alice": False, "bob": True}
    assert set(r.users) == {"alice"} and r.workers() == ["w2"]


def test_sync_worker_replaces_its_table_and_enforces_the_limit():
    r = Registry()
    r.join("a1", "alice", "w1", joined_at=1.0)
    r.join("gone", "carol", "w2", joined_at=1.5)
    table = [ConnEntry("a2", "alice", "w2", None, 2.0), ConnEntry("b1", "bob", "w2", None, 3.0)]
    new_users, gone, evicted = r.sync_worker("w2", table, limit=1)
    assert new_users == ["bob"]
    assert [(o.entry.conn_id, o.last) for o in gone] == [("gone", True)]
    assert [e.conn_id for e in evicted] == ["a1"]
    assert set(r.conns) == {"a2", "b1"}


def test_snapshot_in_join_order():
    r = Registry()
    r.join("x", "u", "w", meta={"m": 1}, joined_at=5.0)
    r.join("y", "v", "w", joined_at=1.0)
    assert [e[0] for e in r.snapshot()] == ["y", "x"]
    assert r.snapshot()[1] == ["x", "u", "w", {"m": 1}, 5.0]


def test_map_replica_reports_users_that_are_gone():
    from wse_sync.core.link import MapReplica
    view = MapReplica()
    view.load([["a1", "alice", "w1", {}, 1.0], ["a2", "alice", "w2", {}, 2.0],
               ["b1", "bob", "w1", None, 3.0]])
    assert view.apply([], ["a1"]) == []
    assert sorted(view.apply([], ["a2", "b1"])) == ["alice", "bob"]
    assert view.users == {}
    # a user who comes back in the same delta is not gone
    view.apply([["c1", "carol", "w1", None]], [])
    assert view.apply([["c2", "carol", "w2", None]], ["c1"]) == []
