"""One worker's runtime behind a WseServer: its connections, its sessions,
its link to the broker and the greenlets that run application code.

The Hub owns the worker's connection table. Sessions report to it
(``accept``, ``closed``), the broker link reads and changes it only through
the LocalPort methods (``entries``, ``deliver``, ``drop``, ``user_left``...),
and WseServer's public API is carried out here.
"""
from __future__ import annotations

import logging
import math
import os
from functools import partial
import time
from typing import (TYPE_CHECKING, Any, Callable, Dict, Hashable, Iterable, List, Optional,
                    Tuple, Union)

import gevent
from ..socket import runner
from .admission import SERVER_BUSY, Admission
from ..socket.connection import CLOSED, OPEN, RemoteConnection, WseConnection, WseIdentity
from .directory import Directory
from ..socket.session import Session
from ..socket.transport import Transport
from ..core.errors import WSE_ERROR, WSE_REASON, WseError
from ..core.forwarded import client_address, is_trusted, origin_allowed
from ..core.limits import parse_rate
from ..core.ids import make_id
from ..core.link import LocalEntry
from ..core.metrics import WorkerMetrics
from ..core.shards import split_endpoints
from ..core.table import ConnectionTable

if TYPE_CHECKING:  # pragma: no cover
    from ..cluster.broker import Broker
    from ..cluster.link import BrokerLink
    from ..cluster.shards import ShardedLink
    from .server import WseServer

__all__ = ["Hub", "SERVER_BUSY", "ORIGIN_NOT_ALLOWED"]

# identities kept for a 'left' after the user's last local connection closed
GONE_MAX = 10000
# a stop closes connections in batches of at least STOP_BATCH_MIN, one every
# STOP_STEP seconds, spread over the stop_spread option
STOP_STEP = 0.1
STOP_BATCH_MIN = 200

# close reasons of the limits (and SERVER_BUSY, from .admission)
ORIGIN_NOT_ALLOWED = "wse.origin-not-allowed"

log = logging.getLogger("wse_sync.server")


class Hub:
    """The runtime of one WseServer in one process (a fork gets a new one)."""

    _warned_stock = False

    def __init__(self, server: "WseServer") -> None:
        self.server = server
        self.pid = os.getpid()
        # this worker's id in the cluster
        self.worker_id = f"w{os.getpid()}-{make_id(6)}"
        self.link: Optional[Union["BrokerLink", "ShardedLink"]] = None
        self.directory: Optional[Directory] = None
        # the ZeroMQ context of link and embedded broker; terminated on shutdown
        self._ctx: Any = None
        self._terminated: Any = None
        self._broker_loop: Optional[gevent.Greenlet] = None
        self.embedded_broker: Optional["Broker"] = None
        self.stopping = False
        self._table: ConnectionTable[WseConnection] = ConnectionTable()
        self._identities: Dict[Hashable, WseIdentity] = {}
        # identities of users whose last connection here closed (lookup mode)
        self._gone: Dict[Hashable, WseIdentity] = {}
        self._sessions: set = set()
        self._sweeper: Optional[gevent.Greenlet] = None
        # handlers running now (RPC, channel, event), for a graceful stop
        self._busy = 0
        # a stop gave up waiting for them: what has not started, never will
        self._abandoned = False
        # what this worker counts (core.metrics); ``counters`` also holds what
        # the limits refused, by name ("refused.max_unauthenticated", ...)
        self.metrics = WorkerMetrics()
        self.counters = self.metrics.counters
        # sockets between upgrade and welcome: their limits, identify slots
        # (max_identify), refusals; options read when applied
        self.admission = Admission(server.options,
                                   lambda remote: is_trusted(remote, server.trusted),
                                   self.counters)
        self.identify_slots = self.admission.identify_slots
        # RPC handlers running in this worker (max_rpc_per_worker)
        self.rpc_running = 0

    @property
    def running(self) -> bool:
        """Joined to a cluster, in this process."""
        return self.link is not None and self.pid == os.getpid()

    # -- life --------------------------------------------------------------
    def start(self, endpoint: Optional[str], worker_id: Optional[str] = None) -> None:
        """Join the broker at ``endpoint``; None starts an embedded broker."""
        if self.link is not None:
            return
        from ..cluster.link import BrokerLink
        import zmq.green as zmq
        if worker_id:
            self.worker_id = worker_id
        options = self.server.options
        ctx = self._ctx = zmq.Context()
        if endpoint is None:
            from ..cluster.broker import Broker
            endpoint = f"inproc://wse-broker-{self.worker_id}"
            self.embedded_broker = Broker(endpoint, zmq, context=ctx,
                                          heartbeat=options["heartbeat"])
            self.embedded_broker.bind()
            self._broker_loop = gevent.spawn(self.embedded_broker.run)
        from ..cluster.curve import shard_keys
        try:
            endpoints = split_endpoints(endpoint)
            curves = shard_keys(endpoints, options["broker_key"], options["curve_secret"])
        except BaseException:
            ctx.term()
            self._ctx = None
            raise
        link_options = dict(limit=self.server.conn_per_user, serves=self.server.serves,
                            heartbeat=options["heartbeat"],
                            request_timeout=options["broker_timeout"],
                            max_msg_size=options["broker_max_msg_size"],
                            replica=options["cluster_replica"])
        if len(endpoints) > 1:
            from ..cluster.shards import ShardedLink
            self.link = ShardedLink(self, self.worker_id, endpoints, ctx, curves, **link_options)
        else:
            self.link = BrokerLink(self, self.worker_id, endpoints[0], ctx, curve=curves[0],
                                   **link_options)
        self.directory = Directory(self.link, options["cluster_replica"],
                                   options["clients_cache"])
        self.link.start()
        self._sweeper = gevent.spawn(self._sweep)

    def shutdown(self, code: int, reason: str, timeout: float) -> None:
        """Close every connection (over ``stop_spread`` seconds, at most half
        of ``timeout``, so its clients reconnect as a stream, not a storm),
        wait for the handlers and the broker's last answers, leave."""
        self.stopping = True
        if self.link is not None:
            self.link.stopping()
        deadline = time.monotonic() + timeout
        sessions = list(self._sessions)
        spread = min(float(self.server.options["stop_spread"] or 0), timeout / 2)
        steps = max(1, int(spread / STOP_STEP))
        batch = max(STOP_BATCH_MIN, math.ceil(len(sessions) / steps))
        for i in range(0, len(sessions), batch):
            if i:
                gevent.sleep(STOP_STEP)
            for s in sessions[i:i + batch]:
                s.conn.close(code, reason)
        # the broker's answers to the last leaves fire 'left' here, unless it
        # said other workers fire them: wait for them too, so those handlers
        # run while the cluster is still joined
        link = self.link
        while ((self._sessions or self._busy
                or (link is not None and link.unanswered_leaves and not link.others_fire))
               and time.monotonic() < deadline):
            gevent.sleep(0.02)
        if self._busy:
            log.warning("%d handler(s) still running after %.1fs: abandoning them (those not"
                        " started never will; the broker has a survivor fire their 'left')",
                        self._busy, timeout)
            self._abandoned = True
        if self.link is not None:
            self.link.stop()
        if self.embedded_broker is not None:
            self.embedded_broker.stop()
            if self._broker_loop is not None:
                self._broker_loop.join(2.0)  # it closes its socket on the way out
        if self._sweeper is not None:
            self._sweeper.kill(block=False)
        if self._ctx is not None and self._terminated is None:
            # in a thread: term() waits for the sockets' linger (the goodbye to go)
            self._terminated = gevent.get_hub().threadpool.spawn(self._ctx.term)

    def wait_closed(self, timeout: float = 5.0) -> None:
        """After shutdown: wait until the last messages to the broker are out."""
        if self._terminated is not None:
            self._terminated.wait(timeout)

    def _cluster(self) -> Union["BrokerLink", "ShardedLink"]:
        if self.link is None:
            self.start(self.server.endpoint())
        assert self.link is not None
        return self.link

    # -- a new socket --------------------------------------------------------
    def serve(self, environ: dict, ws: Any) -> None:
        """Run one upgraded WebSocket (gevent-websocket's ``ws``) until it closes."""
        options = self.server.options
        handler = ws.handler
        if not getattr(handler, "WSE_HANDLER", False) and not Hub._warned_stock:
            Hub._warned_stock = True
            log.warning("this connection was upgraded by %s, not wse_sync.wsgi.WseHandler:"
                        " malformed upgrades get tracebacks or 500 there, allowed_origins"
                        " is checked only after the upgrade", type(handler).__name__)
        # From here on the socket is ours: keep gevent-websocket from writing to it.
        ws.closed = True
        transport = Transport(handler.socket, handler.rfile, options["max_message_size"],
                              options["max_send_queue"], options["close_timeout"],
                              options["max_fragments"], parse_rate(options["rate_limit"]),
                              parse_rate(options["control_rate_limit"]), self.counters)
        requested = [p.strip() for p in
                     environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL", "").split(",")]
        remote = client_address(environ.get("REMOTE_ADDR"), environ.get("HTTP_X_FORWARDED_FOR"),
                                self.server.trusted)
        conn = WseConnection(self.server, transport, remote_addr=remote)
        protocol = self.server.protocol
        if self.stopping:
            transport.close(1012, "")
            transport.run(lambda data: None)
            return
        if protocol.name not in requested:
            log.info("refused a connection from %s without subprotocol %r",
                     remote, protocol.name)
            transport.close(1000, WSE_REASON.PROTOCOL_ERR)
            transport.run(lambda data: None)
            return
        # (WseHandler answers 403 before the upgrade; this is for the stock handler)
        if not origin_allowed(environ.get("HTTP_ORIGIN"), options["allowed_origins"]):
            self._refuse(transport, "allowed_origins", 1008, ORIGIN_NOT_ALLOWED, remote)
            return
        limit = self.admission.admit(conn, remote)
        if limit is not None:
            self._refuse(transport, limit, 1013, SERVER_BUSY, remote)
            return
        session = Session(self, conn)
        self._sessions.add(session)
        try:
            session.run()
        finally:
            self._sessions.discard(session)
            self._welcomed(session)

    def _welcomed(self, session: Session) -> None:
        """The session no longer counts as unauthenticated (welcomed or gone)."""
        self.admission.done(session.conn, session.conn.remote_addr)

    def _refuse(self, transport: Transport, limit: str, code: int, reason: str,
                remote: Optional[str]) -> None:
        self.admission.refused(limit, remote)
        transport.close(code, reason)
        transport.run(lambda data: None)

    # -- what sessions report ------------------------------------------------
    def accept(self, session: Session, cid: Hashable, welcome: Any) -> None:
        """identify accepted: join the cluster, evict, welcome, fire the events."""
        conn = session.conn
        conn.cid = cid
        conn.joined_at = time.time()
        link = self._cluster()
        first, evicted = link.join(conn.conn_id, cid, conn.meta, conn.joined_at,
                                   self._table.ages(cid), self.server.conn_per_user)
        if not conn.transport.open:
            link.leave(conn.conn_id, cid, conn.meta, 1006, "", quiet=True)
            return
        self._table.add(conn)
        if self.directory is not None:
            self.directory.changed(cid)
        identity = self.identity(cid, conn.meta)
        conn.client = identity
        for conn_id in evicted:
            old = self._table.get(conn_id)
            if old is not None:
                old.close(1000, WSE_REASON.CLIENTS_CONCURRENCY)
        conn.ready_state = OPEN
        protocol = self.server.protocol
        conn.transport.write_message(
            protocol.pack(protocol.internal_types["welcome"], welcome, None))
        session.ready()
        self._welcomed(session)
        self.counters["handshakes"] += 1
        log.debug("connection %s from %s: user %r welcomed", conn.conn_id, conn.remote_addr, cid)
        if first:
            self.emit("joined", identity, conn.meta,
                      started=partial(link.joined_started, conn.conn_id, cid))
        self.emit("connected", conn)

    def closed(self, conn: WseConnection, code: int, reason: str) -> None:
        """The socket is gone (the session's last word)."""
        accepted = self._table.remove(conn.conn_id) is not None
        conn.ready_state = CLOSED
        log.debug("connection %s from %s closed: %s %r", conn.conn_id, conn.remote_addr, code,
                  reason)
        conn.fail_calls(code, reason)
        if not accepted:
            return
        if self.link is not None:
            self.link.leave(conn.conn_id, conn.cid, conn.meta, code, reason)
        directory = self.directory
        if directory is not None:
            directory.changed(conn.cid)
            if not directory.replica and not self._table.has_user(conn.cid):
                # no replica says when the user is gone everywhere: keep the
                # identity (bounded) for the 'left' that may come here
                ident = self._identities.pop(conn.cid, None)
                if ident is not None:
                    self._gone[conn.cid] = ident
                    if len(self._gone) > GONE_MAX:
                        del self._gone[next(iter(self._gone))]
        self.emit("disconnected", conn, code, reason)

    def is_pending(self, conn: WseConnection) -> bool:
        """Accepted while the broker was away: 'joined' waits for its verdict."""
        return self.link is not None and self.link.is_pending(conn.conn_id)

    # -- the public API, carried out -------------------------------------------
    def send(self, cid: Hashable, data: Any) -> None:
        self._check_size(data)
        self._write(self._table.of_user(cid), data)
        self._cluster().send_cid(cid, data)

    def broadcast(self, data: Any) -> None:
        self._check_size(data)
        self._write(self._table.all(), data)
        self._cluster().broadcast(data)

    def _check_size(self, data: Any) -> None:
        """A message larger than max_send_queue could never be queued for anyone."""
        limit = self.server.options["max_send_queue"]
        if len(data) > limit:
            error = WseError(WSE_ERROR.MESSAGE_PROCESSING_ERROR, {
                "message": f"a {len(data)}-byte message is larger than max_send_queue ({limit})"})
            self.emit_error(error, None)
            raise error

    def drop_client(self, cid: Hashable, reason: str) -> None:
        for conn in self._table.of_user(cid):
            conn.close(1000, reason)
        self._cluster().drop_cid(cid, reason)

    def identity(self, cid: Hashable, meta: Any = None, ask: bool = True) -> WseIdentity:
        """The user's WseIdentity: one object per user while they are connected
        here (or, with a replica, anywhere). Without ``meta``, it comes from the
        directory (a lookup unless ``ask`` is False)."""
        ident = self._identities.get(cid)
        if ident is None:
            directory = self.directory
            if meta is None and directory is not None and (ask or directory.replica):
                meta = directory.meta_of(cid)
            ident = WseIdentity(self.server, cid, meta)
            if self._table.has_user(cid) or directory is None or directory.replica:
                self._identities[cid] = ident
        return ident

    def connections(self) -> List[WseConnection]:
        """The accepted connections of this worker (not of the cluster)."""
        return self._table.all()

    def cids(self) -> List[Hashable]:
        """Every connected user of the cluster (local ones first). Without a
        replica the broker is asked, and this worker's users are read after
        its answer: a local user who joined meanwhile is in the list."""
        remote = self.directory.cids() if self.directory is not None else []
        cids = dict.fromkeys(self._table.users())
        cids.update(dict.fromkeys(remote))
        return list(cids)

    def count(self) -> int:
        """How many users the cluster has (at least this worker's)."""
        local = len(self._table.users())
        if self.directory is None:
            return local
        if self.directory.replica:
            return len(self.cids())
        count = self.directory.count()
        return local if count is None else max(local, count)

    def has_user(self, cid: Hashable) -> bool:
        return self._table.has_user(cid) or (self.directory is not None
                                             and self.directory.has(cid))

    def conns_of(self, cid: Hashable) -> Dict[str, Any]:
        """conn_id -> WseConnection (here) or RemoteConnection (elsewhere)."""
        conns: Dict[str, Any] = {c.conn_id: c for c in self._table.of_user(cid)}
        if self.directory is not None:
            for conn_id, (worker, meta) in self.directory.connections(cid).items():
                if conn_id not in conns and worker != self.worker_id:
                    conns[conn_id] = RemoteConnection(self.server, conn_id, cid, worker, meta)
        return conns

    def remote_send(self, conn_id: str, cid: Hashable, data: Any) -> None:
        self._cluster().conn_send(conn_id, cid, data)

    def remote_call(self, conn_id: str, cid: Hashable, rp: str, payload: Any,
                    timeout: float) -> Any:
        return self._cluster().call(conn_id, cid, rp, payload, timeout)

    def remote_drop(self, conn_id: str, cid: Hashable, reason: str) -> None:
        self._cluster().conn_drop(conn_id, cid, reason)

    # -- LocalPort: what the broker link asks of this worker ---------------------
    def entries(self) -> Iterable[LocalEntry]:
        return self._table.entries()

    def deliver(self, scope: str, key: Any, data: Any) -> None:
        if scope == "all":
            conns = self._table.all()
        elif scope == "cid":
            conns = self._table.of_user(key)
        else:
            conn = self._table.get(key)
            conns = [conn] if conn is not None else []
        self._write(conns, data)

    def drop(self, conn_ids: List[str], cid: Optional[Hashable], has_cid: bool,
             reason: str) -> None:
        targets = [self._table.get(i) for i in conn_ids]
        if has_cid:
            targets += self._table.of_user(cid)
        for conn in targets:
            if conn is not None:
                conn.close(1000, reason)

    def user_left(self, cid: Hashable, code: int, reason: str, meta: Any,
                  started: Optional[Callable[[], None]] = None) -> None:
        ident = (self._identities.get(cid) or self._gone.pop(cid, None)
                 or WseIdentity(self.server, cid, meta))
        self.forget(cid)
        self.emit("left", ident, code, reason, started=started)

    def user_joined(self, cid: Hashable, meta: Any,
                    started: Optional[Callable[[], None]] = None) -> None:
        self.emit("joined", self.identity(cid, meta, ask=False), meta, started=started)

    def forget(self, cid: Hashable) -> None:
        # (called from the link's reader: never a lookup round trip here)
        directory = self.directory
        if self._table.has_user(cid) or (directory is not None and directory.replica
                                         and directory.has(cid)):
            return
        self._identities.pop(cid, None)

    def call_local(self, conn_id: str, rp: str, payload: Any, timeout: Optional[float]) -> Any:
        conn = self._table.get(conn_id)
        if conn is None:
            raise WseError(WSE_ERROR.CONNECTION_NOT_READY, {"conn_id": conn_id})
        return conn.call(rp, payload, timeout)

    def error(self, error: WseError) -> None:
        self.emit_error(error, None)

    def metrics_report(self) -> Dict[str, Any]:
        """This worker's figures for the broker and /metrics (core.metrics)."""
        link = self.link
        if link is not None:
            self.counters["resends"] = link.resent
        sessions = list(self._sessions)
        return self.metrics.report({
            "connections": len(sessions),
            "unauthenticated": self.admission.unauthenticated,
            "send_queue_bytes": sum(s.conn.transport.queued for s in sessions),
            "broker_outbox": link.unconfirmed if link is not None else 0,
            "rpc_running": self.rpc_running,
            "broker_rtt_seconds": (link.rtt or 0.0) if link is not None else 0.0,
        })

    def health(self) -> Tuple[bool, Dict[str, Any]]:
        """(serving?, why): False while stopping or without a working broker link."""
        body: Dict[str, Any] = {"worker": self.worker_id, "pid": os.getpid()}
        if self.stopping:
            return False, dict(body, status="stopping")
        try:
            link = self._cluster()
        except Exception as exc:  # a bad endpoint or keys: say it
            return False, dict(body, status="no-broker", reason=str(exc))
        state = link.state
        # "partial": some broker shards are away; their users are served with
        # joins decided here, everyone else as usual (docs/cluster.md, "Shards")
        serving = state in ("up", "partial")
        body.update(status="ok" if serving else "no-broker", broker=state,
                    endpoint=link.endpoint, connections=len(self._sessions))
        shard_states = link.shard_states
        if len(shard_states) > 1:
            body["shards"] = shard_states
        if link.refused:
            body["reason"] = link.refused
        return serving, body

    # -- application code ------------------------------------------------------
    def emit(self, name: str, *args: Any, started: Optional[Callable[[], None]] = None) -> None:
        """Fire a ``when`` event: each handler in a greenlet of its own.
        ``started`` is called once, when the first handler starts (at once
        without a handler)."""
        handlers = self.server.when.emitter.handlers(name)
        if started is not None and not handlers:
            started()
        for handler in handlers:
            self.spawn(self._run_event, name, handler, args, started)
            started = None

    def emit_error(self, error: WseError, conn: Optional[Any] = None,
                   exc: Optional[BaseException] = None) -> None:
        """Fire ``when.error``; without a handler, log it: at ERROR with its
        traceback when application code raised ``exc``, else at WARNING."""
        if self.server.when.emitter.has("error"):
            self.emit("error", error, conn)
        elif exc is not None:
            log.error("%s (connection %s)", _describe(error), getattr(conn, "conn_id", None),
                      exc_info=(type(exc), exc, exc.__traceback__))
        else:
            log.warning("%s (connection %s)", _describe(error), getattr(conn, "conn_id", None))

    def spawn(self, fn: Callable, *args: Any) -> None:
        """Run application code in a greenlet of its own (counted for a graceful
        stop from now on, not only once it starts)."""
        self._busy += 1
        runner.spawn(self._counted, fn, args)

    def _counted(self, fn: Callable, args: tuple) -> None:
        try:
            if not self._abandoned:
                fn(*args)
        finally:
            self._busy -= 1

    def _run_event(self, name: str, handler: Callable, args: tuple,
                   started: Optional[Callable[[], None]] = None) -> None:
        if started is not None:
            started()
            # one turn of the loop: the confirmation goes out with this turn's
            # batch before the handler acts (a worker killed while the handler
            # runs has its event counted as fired, not fired again elsewhere)
            gevent.sleep(0)
        try:
            handler(*args)
        except Exception as exc:
            conn = args[0] if args and isinstance(args[0], WseConnection) else None
            if name == "error":
                log.exception("the error handler raised %s: %s", type(exc).__name__, exc)
            else:
                self.emit_error(WseError(WSE_ERROR.MESSAGE_PROCESSING_ERROR, {
                    "event": name, "exception": exc, "message": str(exc)}), conn, exc)

    @staticmethod
    def _write(conns: Iterable[WseConnection], data: Any) -> int:
        """Write one packed message to open connections, framed once for all."""
        frame = None
        n = 0
        for conn in conns:
            if conn.ready_state == OPEN:
                if frame is None:
                    frame = conn.transport.frame_for(data)
                conn.transport.write_raw(frame)
                n += 1
        return n

    def _sweep(self) -> None:
        """Ping idle connections; cut those silent past ping_interval + ping_timeout."""
        interval = self.server.options["ping_interval"]
        timeout = self.server.options["ping_timeout"]
        if not interval:
            return
        period = max(0.05, min(interval, timeout or interval) / 2)
        while True:
            gevent.sleep(period)
            now = time.monotonic()
            for s in list(self._sessions):
                t = s.conn.transport
                idle = now - t.last_recv
                if timeout and idle > interval + timeout:
                    log.info("connection %s silent for %.1fs: closing it", s.conn.conn_id, idle)
                    t.abort((1006, "wse.ping-timeout"))
                elif idle >= interval and t.open:
                    t.ping()


def _describe(error: WseError) -> str:
    """One line for the log: the code and the details that say what happened."""
    details = error.details
    if not isinstance(details, dict):
        return str(error)
    shown = {k: v for k, v in details.items() if k not in ("exception", "payload", "origin")}
    return f"{error.code} {shown}" if shown else error.code
