"""The worker side of the broker protocol (LinkCore), paired in memory with BrokerCore.

No sockets and no processes: every message goes through the schema's
encode/decode, a ZeroMQ-like queue keeps what a worker sends while no broker
runs, and time is a number the test moves. The same cases with real
processes and kill -9 are in test_faults.py.
"""
import itertools

import pytest


from wse_sync.core.broker import ACK_EVERY, BrokerCore
from wse_sync.core.errors import WSE_ERROR, WseError
from wse_sync.core.link import (Answer, Deliver, Drop, Forget, LinkCore, ServeCall, UserJoined,
                                UserLeft)
from wse_sync.core.messages import Message, decode, encode

pytestmark = pytest.mark.timeout(30)


def wire(msg):
    return decode(encode(msg.kind, msg.body, msg.data))


class Worker:
    """A worker runtime reduced to its table and the events it fires."""

    def __init__(self, world, wid, limit=1, **options):
        self.world, self.id = world, wid
        self.table = {}  # conn_id -> (cid, meta, joined_at)
        self.core = LinkCore(wid, self.entries, limit, broker_timeout=3.0, now=world.now,
                             **options)
        self.events = []
        self.answers = {}
        self.held = []      # broker messages that arrive while the loop is blocked
        self.blocked = False

    def entries(self):
        return [(c, cid, meta, at) for c, (cid, meta, at) in self.table.items()]

    def ages(self, cid):
        return [(c, at) for c, (ci, _m, at) in self.table.items() if ci == cid]

    def fired(self, kind):
        return [e[1] for e in self.events if e[0] == kind]

    # -- what the shell does --------------------------------------------
    def send(self, messages):
        for m in messages:
            self.world.queue.append((self.id, wire(m)))

    def receive(self, msg):
        if self.blocked:
            self.held.append(msg)
            return
        self.send(self.core.received(self.world.now))
        self.carry_out(self.core.handle(wire(msg), self.world.now))

    def tick(self):
        self.carry_out(self.core.tick(self.world.now))

    def carry_out(self, step):
        self.send(step.out)
        for e in step.effects:
            if isinstance(e, Answer):
                self.answers[e.req] = e.body
            elif isinstance(e, UserLeft):
                self.events.append(("left", e.cid))
                if e.fire is not None:  # (as the hub: confirmed once started)
                    self.send([Message("fired", {"ids": [e.fire]})])
            elif isinstance(e, UserJoined):
                self.events.append(("joined", e.cid))
                self.send([Message("fired", {"ids": [], "joined": [e.conn_id]})])
            elif isinstance(e, Forget):
                self.events.append(("forget", e.cid))
            elif isinstance(e, Deliver):
                self.events.append(("deliver", (e.scope, e.key, e.data)))
            elif isinstance(e, Drop):
                targets = list(e.conn_ids)
                if e.has_cid:
                    targets += [c for c, (ci, _m, _a) in self.table.items() if ci == e.cid]
                for c in targets:
                    self.close(c, 1000, e.reason)
            elif isinstance(e, ServeCall):
                self.send(LinkCore.call_result(e.body, True, ["pong", e.body["conn_id"]]))

    # -- what the hub does ------------------------------------------------
    def connect(self, conn_id, cid, meta=None):
        """Hub.accept: join, file the connection, evict, fire 'joined' when first."""
        meta = meta if meta is not None else {}
        at = self.world.stamp()
        join = self.core.join(conn_id, cid, meta, at, self.ages(cid), self.core.limit)
        if join.decided is not None:
            first, evicted = join.decided
        else:
            self.send(join.out)
            self.world.settle()
            body = self.answers.pop(join.req, None)
            if body is not None:
                first, evicted = self.core.join_answered(join.req, conn_id, cid, meta, body)
            else:
                first, evicted = self.core.join_timed_out(join.req, conn_id, cid, meta,
                                                          self.ages(cid), self.core.limit)
        self.table[conn_id] = (cid, meta, at)
        for c in evicted:
            self.close(c, 1000, "wse.clients-concurrency")
        if first:
            self.events.append(("joined", cid))
            self.send([Message("fired", {"ids": [], "joined": [conn_id]})])
            self.world.settle()
        return first

    def close(self, conn_id, code=1000, reason=""):
        if conn_id in self.table:
            cid, meta, _at = self.table.pop(conn_id)
            self.events.append(("closed", conn_id))
            self.send(self.core.leave(conn_id, cid, meta, code, reason))

    def command(self, kind, body, data=None):
        self.send(self.core.command(kind, body, data, self.world.now))

    def unblock(self):
        self.blocked = False
        held, self.held = self.held, []
        for m in held:
            self.receive(m)


class World:
    """A broker, workers, and the messages between them."""

    def __init__(self, sync_window=0.0, chunk=2000):
        self.now = 1000.0
        self.chunk = chunk
        self.pumping = True   # settle() sends snapshot parts too
        self._order = itertools.count()
        self.broker = BrokerCore(worker_timeout=3.0, epoch="e1", sync_window=sync_window,
                                 snapshot_chunk=chunk)
        self.broker_up = True
        self.workers = {}
        self.queue = []       # worker -> broker, kept while no broker runs (ZeroMQ does)
        self.to_workers = []  # broker -> worker, lost when the broker dies

    def stamp(self):
        return self.now + next(self._order) * 1e-6

    def add(self, wid, **kw):
        w = self.workers[wid] = Worker(self, wid, **kw)
        w.send(w.core.hello())
        self.settle()
        return w

    def settle(self, pump=None):
        """Deliver what is in flight until nothing moves; snapshot parts are
        pumped one at a time when nothing else waits (as the shell's loop does)."""
        pump = self.pumping if pump is None else pump
        for _ in range(100000):
            if self.broker_up and self.queue:
                wid, m = self.queue.pop(0)
                self.to_workers += self.broker.handle(wid, m, self.now)
            elif self.to_workers:
                target, m = self.to_workers.pop(0)
                if target in self.workers:
                    self.workers[target].receive(m)
            elif pump and self.broker_up and self.broker.streaming:
                self.to_workers += self.broker.pump(1)
            else:
                return
        raise AssertionError("messages never stop")

    def advance(self, seconds, step=0.5):
        """Let time pass: broker and unblocked workers tick every ``step`` seconds."""
        end = self.now + seconds
        while self.now < end - 1e-9:
            self.now += step
            if self.broker_up:
                self.to_workers += self.broker.tick(self.now)
            for w in list(self.workers.values()):
                if not w.blocked:
                    w.tick()
            self.settle()

    def kill_broker(self):
        self.broker_up = False
        self.to_workers.clear()

    def start_broker(self, sync_window=2.5, epoch="e2"):
        self.broker = BrokerCore(worker_timeout=3.0, epoch=epoch, sync_window=sync_window,
                                 snapshot_chunk=self.chunk)
        self.broker_up = True
        self.settle()

    # -- the invariants -------------------------------------------------------
    def check_map(self):
        """Invariant 1: the broker's map is the union of the workers' tables."""
        mapped = {c: (e.cid, e.worker) for c, e in self.broker.registry.conns.items()}
        local = {c: (cid, w.id) for w in self.workers.values() for c, (cid, _m, _a) in
                 w.table.items()}
        assert mapped == local

    def check_views(self):
        """Every worker's replica is the broker's map."""
        mapped = {}
        for c, e in self.broker.registry.conns.items():
            mapped.setdefault(e.cid, {})[c] = (e.worker, e.meta)
        for w in self.workers.values():
            assert w.core.synced and w.core.view.users == mapped, w.id

    def check_events(self):
        """Invariant 2: per user, one more 'joined' than 'left' while connected, else equal."""
        connected = {cid for w in self.workers.values() for (cid, _m, _a) in w.table.values()}
        users = {e[1] for w in self.workers.values() for e in w.events
                 if e[0] in ("joined", "left")} | connected
        for cid in users:
            joined = sum(w.fired("joined").count(cid) for w in self.workers.values())
            left = sum(w.fired("left").count(cid) for w in self.workers.values())
            assert joined - left == (1 if cid in connected else 0), (cid, joined, left)


def test_joined_and_left_fire_once_per_user_across_workers():
    world = World()
    a, b = world.add("A", limit=2), world.add("B", limit=2)
    assert a.connect("a1", "u1") is True
    assert b.connect("b1", "u1") is False
    world.check_map()
    a.close("a1")
    world.settle()
    assert a.fired("left") == [] and b.fired("left") == []
    b.close("b1")
    world.settle()
    assert b.fired("left") == ["u1"]
    world.check_map()
    world.check_events()


def test_conn_per_user_closes_the_oldest_connection_on_the_other_worker():
    world = World()
    a, b = world.add("A"), world.add("B")
    a.connect("a1", "u1")
    b.connect("b1", "u1")
    world.settle()
    assert ("closed", "a1") in a.events and "b1" in b.table
    world.check_map()
    world.check_events()


def test_the_view_follows_the_map_and_forgets_a_user_without_connections():
    world = World()
    a, b = world.add("A"), world.add("B")
    a.connect("a1", "u1", {"device": "phone"})
    world.settle()
    assert b.core.view.users == {"u1": {"a1": ("A", {"device": "phone"})}}
    assert b.core.view.meta_of("u1") == {"device": "phone"}
    a.close("a1")
    world.settle()
    assert b.core.view.users == {} and ("forget", "u1") in b.events


def test_send_broadcast_and_drop_reach_the_workers_that_hold_the_user():
    world = World()
    a, b, c = world.add("A"), world.add("B"), world.add("C")
    b.connect("b1", "u1")
    a.command("send", {"cid": "u1"}, "hello")
    a.command("bcast", {}, "all")
    world.settle()
    assert ("deliver", ("cid", "u1", "hello")) in b.events
    assert not any(e[0] == "deliver" and e[1][0] == "cid" for e in c.events)
    assert ("deliver", ("all", None, "all")) in c.events
    a.command("drop_cid", {"cid": "u1", "reason": "bye"})
    world.settle()
    assert "b1" not in b.table
    world.check_map()
    world.check_events()


def test_a_call_on_a_remote_connection_is_answered_through_the_broker():
    world = World()
    a, b = world.add("A"), world.add("B")
    b.connect("b1", "u1")
    req, out = a.core.call("b1", "ping", {}, 5.0)
    a.send(out)
    world.settle()
    assert a.answers[req]["ok"] is True and a.answers[req]["value"] == ["pong", "b1"]
    a.core.call_done(req)
    req, out = a.core.call("nobody", "ping", {}, 5.0)
    a.send(out)
    world.settle()
    assert a.answers[req]["value"]["code"] == WSE_ERROR.CONNECTION_NOT_READY


def test_commands_are_acked_and_leave_the_outbox():
    world = World()
    a, _b = world.add("A"), world.add("B")
    for i in range(ACK_EVERY + 3):
        a.command("bcast", {}, f"m{i}")
    world.settle()
    assert a.core.unconfirmed == 3          # acked every ACK_EVERY commands...
    world.advance(1.0)
    assert a.core.unconfirmed == 0          # ...and with every heartbeat


@pytest.mark.parametrize("limit", [2, 1])
def test_a_broker_restart_rebuilds_the_map_and_fires_pending_joins_once(limit):
    world = World()
    a, b = world.add("A", limit=limit), world.add("B", limit=limit)
    a.connect("a1", "u1")
    world.kill_broker()
    world.advance(4.0)                      # both notice the silence
    assert a.core.down_since is not None
    # accepted alone: pending, 'joined' waits for the broker's verdict
    assert a.connect("a2", "u2") is False
    assert b.connect("b1", "u2") is False
    assert a.core.is_pending("a2") and a.fired("joined") == ["u1"]
    world.start_broker()
    world.advance(4.0)
    assert a.core.down_since is None and b.core.down_since is None
    assert not a.core.is_pending("a2")
    if limit == 2:
        # u2 has connections on two workers: 'joined' fires once, for the oldest
        assert a.fired("joined") == ["u1", "u2"] and b.fired("joined") == []
    else:
        # one connection per user: the older one (a2) goes, 'joined' fires for b1
        assert ("closed", "a2") in a.events and b.fired("joined") == ["u2"]
    world.check_map()
    world.check_events()


def test_a_pending_connection_that_closes_before_the_verdict_stays_balanced():
    world = World()
    a = world.add("A")
    world.kill_broker()
    world.advance(4.0)
    a.connect("a1", "u1")
    a.close("a1")                           # its leave waits in the queue
    world.start_broker()
    world.advance(4.0)
    assert a.table == {}
    world.check_map()
    world.check_events()


def test_commands_issued_during_an_outage_are_delivered_once_after_the_resync():
    world = World()
    a, b = world.add("A"), world.add("B")
    b.connect("b1", "u1")
    world.kill_broker()
    world.advance(4.0)
    a.command("send", {"cid": "u1"}, "late")
    assert a.core.unconfirmed == 1
    world.start_broker()
    world.advance(4.0)
    # a second reset makes A resend its hello and outbox: no duplicate
    a.receive(wire_reset())
    world.advance(4.0)
    assert b.events.count(("deliver", ("cid", "u1", "late"))) == 1
    assert a.core.unconfirmed == 0


def wire_reset():
    from wse_sync.core.messages import Message
    return Message("reset", {})


def test_a_full_outbox_behind_a_running_broker_is_busy_not_unavailable():
    """The broker answers but its acks lag (it is behind): a distinct error
    (the shell lets the sender wait for room first), never 'unavailable'."""
    world = World()
    a = world.add("A", outage_buffer=2)
    a.blocked = True  # what the broker sends A (its acks) waits unread
    a.command("bcast", {}, "1")
    a.command("bcast", {}, "2")
    assert a.core.outbox_full and a.core.down_since is None
    with pytest.raises(WseError) as err:
        a.command("bcast", {}, "3")
    assert err.value.code == WSE_ERROR.BROKER_BUSY
    a.unblock()
    world.advance(1.0)  # the heartbeat's ack makes room
    assert not a.core.outbox_full
    a.command("bcast", {}, "3")


def test_the_outage_buffer_and_limit_refuse_commands_visibly():
    world = World()
    a = world.add("A", outage_buffer=2, outage_limit=10.0)
    world.kill_broker()
    world.advance(4.0)
    a.command("bcast", {}, "1")
    a.command("bcast", {}, "2")
    with pytest.raises(WseError) as err:
        a.command("bcast", {}, "3")
    assert err.value.code == WSE_ERROR.BROKER_UNAVAILABLE
    b = world.add("B", outage_limit=10.0)
    world.advance(12.0)
    with pytest.raises(WseError) as err:
        b.command("bcast", {}, "x")
    assert "away for more than" in err.value.details["reason"]


def test_a_leave_lost_with_the_broker_is_resent_to_the_next_one():
    world = World()
    a, b = world.add("A"), world.add("B")
    a.connect("a1", "u1")
    a.close("a1")
    world.queue.clear()                     # the leave dies with the broker
    world.kill_broker()
    world.start_broker(sync_window=0.0)     # back before anyone noticed
    world.advance(2.0)
    world.check_map()
    # the new broker never knew u1, so 'left' comes from the resent leave
    assert a.fired("left") == ["u1"]
    world.check_events()
    assert b.fired("left") == []


def test_a_dead_worker_loses_its_users_and_they_join_again_when_it_comes_back():
    world = World()
    a, b = world.add("A"), world.add("B")
    b.connect("b1", "u1")
    a.connect("a1", "u2")
    b.blocked = True                        # its loop is stuck
    world.advance(4.0)
    assert "B" not in world.broker.workers
    assert a.fired("left") == ["u1"]        # fired on a survivor
    b.unblock()
    world.advance(4.0)                      # B's heartbeat: reset, hello, resync
    assert "B" in world.broker.workers
    world.check_map()
    world.check_events()


def test_a_duplicate_command_is_carried_out_once():
    world = World()
    a, b = world.add("A"), world.add("B")
    b.connect("b1", "u1")
    out = a.core.command("send", {"cid": "u1"}, "once", world.now)
    a.send(out)
    a.send(out)
    world.settle()
    assert b.events.count(("deliver", ("cid", "u1", "once"))) == 1
    assert world.broker.counters["dropped.duplicate"] == 1


# -- streamed snapshots --------------------------------------------------------
def test_changes_during_a_streamed_snapshot_are_neither_lost_nor_reordered():
    world = World(chunk=2)
    a = world.add("A", limit=3)
    for i in range(7):
        a.connect(f"a{i}", f"u{i % 5}")
    b = Worker(world, "B", limit=3)
    world.workers["B"] = b
    b.send(b.core.hello())
    wid, m = world.queue.pop(0)
    world.to_workers += world.broker.handle(wid, m, world.now)
    world.settle(pump=False)                # B has part 0 of 4, nothing more
    assert not b.core.synced and world.broker.streaming
    world.pumping = False
    # meanwhile: a join, a leave of a connection a later part still holds,
    # a join that evicts one (limit 3), and B's own connection coming and going
    a.connect("a7", "u7")
    a.close("a5")
    a.connect("a8", "u0")
    b.connect("b1", "u9")
    b.connect("b2", "u8")
    b.close("b2")
    world.settle()
    assert not b.core.synced
    world.pumping = True
    world.settle()                          # the other parts, between other work
    assert b.core.synced and b.core.syncs == 1
    world.check_map()
    world.check_views()
    world.check_events()


@pytest.mark.parametrize("table_part", [2000, 4], ids=["one-part", "tables-in-parts"])
def test_a_broker_restart_streams_the_map_with_no_spurious_left_or_joined(table_part):
    world = World(chunk=3)
    workers = [world.add(w, limit=2, table_part=table_part) for w in "ABC"]
    for n, w in enumerate(workers):
        for i in range(10):
            w.connect(f"{w.id}{i}", f"u{(n * 10 + i) % 17}")
    world.settle()
    before = [list(w.events) for w in workers]
    world.kill_broker()
    world.start_broker(epoch="e2")
    world.advance(5.0)
    if table_part == 4:
        assert _parts_sent(world, "hello") == 3 and _parts_sent(world, "table") == 6  # 4+4+2
    assert all(w.core.epoch == "e2" and w.core.syncs == 2 for w in workers)
    for w, events in zip(workers, before):
        assert w.events == events           # no left, no joined, nothing closed
    assert world.broker.counters["workers.removed"] == 0
    world.check_map()
    world.check_views()
    world.check_events()


def test_a_worker_in_the_middle_of_a_sync_is_not_declared_dead():
    world = World(chunk=1)
    a = world.add("A")
    for i in range(20):
        a.connect(f"a{i}", f"u{i}")
    b = Worker(world, "B")
    world.workers["B"] = b
    b.send(b.core.hello())
    wid, m = world.queue.pop(0)
    world.to_workers += world.broker.handle(wid, m, world.now)
    world.settle(pump=False)
    b.blocked = True                        # busy with the parts: says nothing
    for _ in range(8):                      # 4 s, a part every half second
        world.now += 0.5
        world.to_workers += world.broker.tick(world.now) + world.broker.pump(1)
        a.tick()
        world.settle(pump=False)
    assert "B" in world.broker.workers and world.broker.streaming
    b.unblock()
    world.advance(1.0)
    world.settle()
    assert not world.broker.streaming and b.core.synced
    assert world.broker.counters["workers.removed"] == 0
    world.check_views()


def test_a_lost_part_makes_the_worker_ask_again():
    world = World(chunk=2)
    a = world.add("A", limit=None)
    for i in range(6):
        a.connect(f"a{i}", f"u{i}")
    b = Worker(world, "B", limit=None)
    world.workers["B"] = b
    b.send(b.core.hello())
    wid, m = world.queue.pop(0)
    world.to_workers += world.broker.handle(wid, m, world.now)
    world.settle(pump=False)
    world.broker.pump(1)                    # part 1 is lost on the way
    world.settle()
    assert b.core.synced and b.core.syncs == 1
    world.check_views()


def test_a_slow_broker_with_the_same_epoch_is_resumed_without_a_hello():
    world = World()
    a, _b = world.add("A"), world.add("B")
    a.connect("a1", "u1")
    hellos = []
    real = a.core.hello
    a.core.hello = lambda: hellos.append(1) or real()
    world.advance(1.0)
    up = world.broker
    world.broker_up = False                 # the broker's loop is stuck for 4 s
    world.advance(4.0)
    assert a.core.down_since is not None
    a.command("send", {"cid": "u1"}, "meanwhile")
    world.broker_up = True
    assert world.broker is up
    world.advance(2.0)
    assert a.core.down_since is None and hellos == []
    assert a.core.unconfirmed == 0
    world.check_map()
    world.check_events()


def _parts_sent(world, kind):
    return world.broker.counters["in." + kind]


def test_changes_while_a_table_arrives_in_parts_are_kept_and_what_it_lacks_is_gone():
    world = World(chunk=2)
    a = world.add("A", limit=None, table_part=2)
    b = world.add("B", limit=None)
    for i in range(6):
        a.connect(f"a{i}", f"u{i}")
    del a.table["a0"]                       # its leave was lost: the table no longer has it
    a.send(a.core.hello())                  # a resync: the hello and 2 table parts
    wid, m = world.queue.pop(0)
    world.to_workers += world.broker.handle(wid, m, world.now)
    assert "A" in world.broker._uploads
    a.connect("a9", "u9")                   # behind the parts in A's queue
    a.close("a5")                           # a connection of the last part, closed meanwhile
    world.settle()
    assert "A" not in world.broker._uploads
    assert "a0" not in world.broker.registry.conns and "a9" in world.broker.registry.conns
    world.check_map()
    world.check_views()
    assert "u0" not in b.core.view.users


def test_a_lost_table_part_makes_the_broker_ask_for_the_hello_again():
    world = World(chunk=2)
    a = world.add("A", limit=None, table_part=2)
    world.add("B", limit=None)
    for i in range(6):
        a.connect(f"a{i}", f"u{i}")
    a.send(a.core.hello())
    parts = [i for i, (_w, m) in enumerate(world.queue) if m.kind == "table"]
    assert len(parts) == 2
    del world.queue[parts[0]]               # part 1 of A's table is lost
    world.settle()
    assert _parts_sent(world, "hello") == 4  # A and B, A's resync, and A's hello again
    assert "A" not in world.broker._uploads and a.core.synced and a.core.syncs == 2
    world.check_map()
    world.check_views()
    world.check_events()


def test_a_table_whose_last_part_never_comes_is_given_up_and_asked_again():
    world = World(chunk=2)
    a = world.add("A", limit=None, table_part=2)
    for i in range(4):
        a.connect(f"a{i}", f"u{i}")
    a.send(a.core.hello())
    world.queue = [(w, m) for w, m in world.queue if m.kind != "table"]  # never arrives
    world.settle()
    assert "A" in world.broker._uploads
    world.advance(4.0)
    assert world.broker.counters["dropped.table-incomplete"] == 1
    assert "A" not in world.broker._uploads and a.core.synced
    world.check_map()
    world.check_views()


def _ask(world, w, cids=None, count=False):
    req, out = w.core.lookup(cids, count)
    w.send(out)
    world.settle()
    w.core.call_done(req)
    return w.answers.pop(req)


def test_a_worker_without_a_replica_gets_no_map_and_asks_the_broker_instead():
    world = World(chunk=2)
    a = world.add("A", limit=None)
    lean = [world.add(w, limit=None, replica=False) for w in "BCD"]
    for i in range(5):
        a.connect(f"a{i}", f"u{i}", {"n": i})
    lean[0].connect("b1", 7, {"n": "b"})
    world.settle()
    assert all(w.core.synced and w.core.epoch == "e1" for w in lean)
    assert all(w.core.view.users == {} for w in lean)   # nothing of the others
    assert set(a.core.view.users) == {"u0", "u1", "u2", "u3", "u4", 7}  # A keeps one
    c = lean[1]
    answer = _ask(world, c, ["u3", 7, "nobody"])
    assert sorted(answer["users"], key=lambda row: str(row[0])) == [
        [7, [["b1", "B", {"n": "b"}]]],
        ["u3", [["a3", "A", {"n": 3}]]]]
    assert _ask(world, c, count=True)["count"] == 6
    every = _ask(world, c)                  # in parts of 2 users
    assert sorted(row[0] for row in every["users"] if row[0] != 7) == [f"u{i}" for i in range(5)]
    assert len(every["users"]) == 6
    world.check_map()
    world.check_events()


def test_a_join_costs_the_lean_workers_nothing():
    world = World()
    a = world.add("A", limit=None, replica=False)
    for w in "BCDEFGH":
        world.add(w, limit=None, replica=False)
    join = a.core.join("a1", "u1", {}, world.stamp(), [], None)
    wid, msg = "A", wire(join.out[0])
    out = world.broker.handle(wid, msg, world.now)
    assert [(w, m.kind) for w, m in out] == [("A", "joined")]   # no delta to anyone


def test_a_lookup_during_a_restart_waits_for_every_table():
    world = World(chunk=2)
    a = world.add("A", limit=None, table_part=2)
    b = world.add("B", limit=None, replica=False)
    for i in range(5):
        a.connect(f"a{i}", f"u{i}")
    world.kill_broker()
    world.start_broker(epoch="e2")
    world.broker_up = False
    req, out = b.core.lookup(["u4"])
    b.send(out)                             # asked before anyone's table is in
    world.broker_up = True
    world.advance(4.0)
    assert b.answers[req]["users"] == [["u4", [["a4", "A", {}]]]]
    world.check_map()


def test_a_map_that_lost_connections_heals_from_the_table_digest():
    """Whatever special case lost them, the broker's map of a worker comes back
    to the worker's table within two digests, counted, with no event fired."""
    world = World()
    a = world.add("A")
    b = world.add("B")
    for i in range(5):
        a.connect(f"a{i}", f"u{i}")
    b.connect("b0", "v0")
    world.advance(6.0)
    assert world.broker.counters["map.repaired"] == 0  # steady traffic is no mismatch
    events = list(a.events), list(b.events)
    # the map loses two of A's connections and gains one A never had
    world.broker.registry.leave("a1")
    world.broker.registry.leave("a3")
    world.broker.registry.join("ghost", "g", "A")
    world.advance(6.0)
    world.check_map()
    assert world.broker.counters["map.repaired"] == 1
    assert (list(a.events), list(b.events)) == events


def test_a_joined_decided_late_is_confirmed_and_its_left_fires_when_the_worker_dies():
    """A join answered after its timeout fires 'joined' late (UserJoined): that
    'joined' is confirmed like any other, so the user's 'left' is due when
    the worker dies (it was withheld as 'never joined')."""
    world = World()
    a = world.add("A")
    b = world.add("B")
    a.blocked = True           # A reads nothing: the answer to its join comes late
    a.connect("a1", "u1")
    assert ("joined", "u1") not in a.events
    a.unblock()
    world.settle()
    assert ("joined", "u1") in a.events
    assert world.broker.workers["A"].unjoined == {}
    world.to_workers += world.broker.remove_worker("A")
    del world.workers["A"]
    world.settle()
    assert ("left", "u1") in b.events
