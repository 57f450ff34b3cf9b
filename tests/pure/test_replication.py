"""core.replication, in memory: the passive copy follows the active's journal,
asks for what it misses, and for a snapshot when the journal no longer has it.
A BrokerCore fed the journal's records ends with the same map as the active's."""
from wse_sync.core.broker import BrokerCore
from wse_sync.core.messages import Message
from wse_sync.core.replication import APPLY, RESEND, SKIP, SNAPSHOT, Copy, Journal


def test_records_in_order_are_applied_once():
    j, c = Journal(), Copy()
    assert c.offer(1).action == SNAPSHOT       # no copy yet
    c.installed(0)
    seqs = [j.record(f"r{i}") for i in range(3)]
    assert seqs == [1, 2, 3]
    assert [c.offer(s).action for s in seqs] == [APPLY] * 3
    assert c.offer(2).action == SKIP and c.seq == 3   # a resent duplicate


def test_a_gap_asks_once_for_the_records_from_the_first_missing():
    j, c = Journal(), Copy()
    c.installed(0)
    for i in range(6):
        j.record(i)
    assert c.offer(1).action == APPLY
    assert c.offer(3) == (RESEND, 2)             # 2 was lost
    assert c.offer(4).action == SKIP             # asked already: the resend brings it
    resend = j.since(2)
    assert [s for s, _ in resend] == [2, 3, 4, 5, 6]
    assert [c.offer(s).action for s, _ in resend] == [APPLY] * 5 and c.seq == 6
    # a resend that never comes: asked again once the caller says it stalled
    j.record(7)
    assert c.offer(9) == (RESEND, 7) and c.offer(9).action == SKIP
    c.stalled()
    assert c.offer(9) == (RESEND, 7)


def test_a_peer_further_behind_than_the_journal_keeps_needs_a_snapshot():
    j = Journal(keep=3)
    for i in range(10):
        j.record(i)
    assert j.since(8) == [(8, 7), (9, 8), (10, 9)]
    assert j.since(7) is None and j.since(11) == []
    j.confirm(9)
    assert j.behind == 1
    j.confirm(50)                                # (never beyond what was recorded)
    assert j.confirmed == 10 and j.behind == 0
    c = Copy()
    c.installed(5)
    c.lost()
    assert not c.live and c.offer(11).action == SNAPSHOT


def _join(conn_id, cid, req):
    return Message("join", {"req": req, "conn_id": conn_id, "cid": cid, "limit": 2,
                            "at": float(req)})


def test_a_core_fed_the_journal_holds_the_same_map_as_the_active():
    active = BrokerCore(epoch="e1")
    journal, copy = Journal(), Copy()
    # the passive's core starts from a snapshot of the active's (here: a fresh one)
    passive, snapshot_seq = BrokerCore(epoch=active.epoch), journal.seq
    copy.installed(snapshot_seq)
    inputs = [("w1", [Message("hello", {"pid": 1, "table": []})], 0.0),
              ("w2", [Message("hello", {"pid": 2, "table": []})], 0.1),
              ("w1", [_join("a1", "alice", 1), _join("a2", "alice", 2)], 0.2),
              # alice's third connection evicts her oldest (conn_per_user 2)
              ("w2", [_join("b1", "bob", 1), _join("a3", "alice", 2)], 0.3),
              ("w1", [Message("leave", {"conn_id": "a2", "cid": "alice", "code": 1000,
                                        "reason": ""})], 0.4)]
    for sender, messages, now in inputs:
        active.handle_all(sender, messages, now)
        seq = journal.record((sender, messages, now))
        assert copy.offer(seq).action == APPLY
        s, m, t = journal.since(seq)[0][1]
        passive.handle_all(s, m, t)             # (outputs dropped: it is passive)

    def view(core):
        return sorted((e.conn_id, e.cid, e.worker) for e in core.registry.conns.values())

    assert view(passive) == view(active) == [("a3", "alice", "w2"), ("b1", "bob", "w2")]
    assert {w: i.acked for w, i in passive.workers.items()} == {
        w: i.acked for w, i in active.workers.items()}
