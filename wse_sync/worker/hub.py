"""One worker's life behind a WseServer: joining the cluster (the broker
link, an embedded broker), serving upgraded sockets until they close, the
public API carried out, a graceful stop, health and figures.

What it delegates: admission of new sockets (``admission.py``), who is
connected (``roster.py``), what the link may ask (``port.py``), running the
app's code (``apps.py``), the ping sweep (``sweeper.py``). Sessions report
here (``accept``, ``closed``) through the ``SessionHost`` protocol.
"""
from __future__ import annotations

import logging
import math
import os
import time
from functools import partial
from typing import (TYPE_CHECKING, Any, Callable, Counter, Dict, Hashable, List, Optional,
                    Protocol, Tuple, Union)

import gevent

from ..core.config import Config
from ..core.errors import WSE_ERROR, WSE_REASON, WseError
from ..core.events import When
from ..core.forwarded import client_address, is_trusted, origin_allowed
from ..core.ids import make_id
from ..core.metrics import WorkerMetrics
from ..core.refusals import ORIGIN_NOT_ALLOWED, SERVER_BUSY
from ..core.shards import split_endpoints
from ..socket.connection import CLOSED, OPEN, WseConnection, write_all
from ..socket.session import Session, SessionApp
from ..socket.transport import Transport, TransportLimits
from .admission import Admission, IdentifySlots
from .apps import AppCode
from .directory import make_directory
from .port import WorkerPort
from .roster import Roster
from .sweeper import sweep
from .users import WseIdentity

if TYPE_CHECKING:  # pragma: no cover
    from ..cluster.broker import Broker
    from ..cluster.link import BrokerLink
    from ..cluster.shards import ShardedLink

__all__ = ["Hub", "App", "SERVER_BUSY", "ORIGIN_NOT_ALLOWED"]

# a stop closes connections in batches of at least STOP_BATCH_MIN, one every
# STOP_STEP seconds, spread over the stop_spread option
STOP_STEP = 0.1
STOP_BATCH_MIN = 200

log = logging.getLogger("wse_sync.server")


class App(SessionApp, Protocol):
    """What the worker reads of the application (the WseServer)."""

    @property
    def when(self) -> When: ...

    @property
    def serves(self) -> bool: ...  # False: a cluster member without sockets

    def endpoint(self, broker: Optional[str] = None) -> Optional[str]: ...


class Hub:
    """The runtime of one WseServer in one process (a fork gets a new one)."""

    _warned_stock = False

    def __init__(self, app: App) -> None:
        self._app = app
        self.pid = os.getpid()
        # this worker's id in the cluster
        self.worker_id = f"w{os.getpid()}-{make_id(6)}"
        self.link: Optional[Union["BrokerLink", "ShardedLink"]] = None
        # the ZeroMQ context of link and embedded broker; terminated on shutdown
        self._ctx: Any = None
        self._terminated: Any = None
        self._broker_loop: Optional[gevent.Greenlet] = None
        self.embedded_broker: Optional["Broker"] = None
        self.stopping = False
        # the open sessions -> what releases their socket's edge counts (or None)
        self._sessions: Dict[Session, Optional[Callable[[], None]]] = {}
        self._sweeper: Optional[gevent.Greenlet] = None
        # what this worker counts (core.metrics); ``counters`` also holds what
        # the limits refused, by name ("refused.max_unauthenticated", ...)
        self.metrics = WorkerMetrics()
        self.counters: Counter[str] = self.metrics.counters
        self.tally = self.metrics.tally  # (what sessions count per message)
        self.apps = AppCode(app.when.emitter)
        # (the app-code calls sessions make per message go straight to it)
        self.spawn = self.apps.spawn
        self.emit = self.apps.emit
        self.emit_error = self.apps.emit_error
        self.roster = Roster(self, lambda: self.worker_id)
        self.port = WorkerPort(self.roster, self.apps, self.metrics_report)
        # sockets between upgrade and welcome: their limits, identify slots
        # (max_identify), refusals; options read when applied
        self.admission = Admission(lambda: app.config,
                                   lambda remote: is_trusted(remote, app.config.trusted),
                                   self.counters)
        # RPC handlers running in this worker (max_rpc_per_worker)
        self.rpc_running = 0
        self._conn_host = _ConnHost(app, self)

    # -- SessionHost: what a session asks ------------------------------------
    @property
    def app(self) -> App:
        return self._app

    @property
    def config(self) -> Config:
        return self._app.config

    @property
    def identify_slots(self) -> IdentifySlots:
        return self.admission.identify_slots

    def rpc_slot(self) -> bool:
        most = self.config.max_rpc_per_worker
        if most and self.rpc_running >= most:
            return False
        self.rpc_running += 1
        return True

    def rpc_done(self) -> None:
        self.rpc_running -= 1

    def refused(self, limit: str, remote: Optional[str], level: int = logging.WARNING,
                what: str = "refused a connection from %s: %s") -> None:
        self.admission.refusals.refused(limit, remote, level, what)

    @property
    def running(self) -> bool:
        """Joined to a cluster, in this process."""
        return self.link is not None and self.pid == os.getpid()

    @property
    def directory(self) -> Any:
        """Who is connected in the cluster (None before the worker joins)."""
        return self.roster.directory

    # -- life --------------------------------------------------------------
    def start(self, endpoint: Optional[str], worker_id: Optional[str] = None) -> None:
        """Join the broker at ``endpoint``; None starts an embedded broker."""
        if self.link is not None:
            return
        from ..cluster.link import BrokerLink
        import zmq.green as zmq
        if worker_id:
            self.worker_id = worker_id
        config = self.config
        ctx = self._ctx = zmq.Context()
        if endpoint is None:
            from ..cluster.broker import Broker
            endpoint = f"inproc://wse-broker-{self.worker_id}"
            self.embedded_broker = Broker(endpoint, zmq, context=ctx, heartbeat=config.heartbeat)
            self.embedded_broker.bind()
            self._broker_loop = gevent.spawn(self.embedded_broker.run)
        from ..cluster.curve import shard_keys
        try:
            endpoints = split_endpoints(endpoint)
            curves = shard_keys(endpoints, config.broker_key, config.curve_secret)
        except BaseException:
            ctx.term()
            self._ctx = None
            raise
        link_options = dict(limit=config.conn_per_user, serves=self._app.serves,
                            heartbeat=config.heartbeat, request_timeout=config.broker_timeout,
                            max_msg_size=config.broker_max_msg_size,
                            replica=config.cluster_replica)
        if len(endpoints) > 1:
            from ..cluster.shards import ShardedLink
            self.link = ShardedLink(self.port, self.worker_id, endpoints, ctx, curves,
                                    **link_options)
        else:
            self.link = BrokerLink(self.port, self.worker_id, endpoints[0], ctx,
                                   curve=curves[0], **link_options)
        self.roster.directory = make_directory(self.link, config.cluster_replica,
                                               config.clients_cache)
        self.link.start()
        self._sweeper = gevent.spawn(sweep, lambda: self._sessions, lambda: self.config)

    def shutdown(self, code: int, reason: str, timeout: float) -> None:
        """Close every connection (over ``stop_spread`` seconds, at most half
        of ``timeout``, so its clients reconnect as a stream, not a storm),
        wait for the handlers and the broker's last answers, leave."""
        self.stopping = True
        if self.link is not None:
            self.link.stopping()
        deadline = time.monotonic() + timeout
        sessions = list(self._sessions)
        spread = min(float(self.config.stop_spread or 0), timeout / 2)
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
        apps = self.apps
        while ((self._sessions or apps.busy
                or (link is not None and link.unanswered_leaves and not link.others_fire))
               and time.monotonic() < deadline):
            gevent.sleep(0.02)
        if apps.busy:
            log.warning("%d handler(s) still running after %.1fs: abandoning them (those not"
                        " started never will; the broker has a survivor fire their 'left')",
                        apps.busy, timeout)
            apps.abandoned = True
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
            self.start(self._app.endpoint())
        assert self.link is not None
        return self.link

    # -- a new socket --------------------------------------------------------
    def serve(self, environ: dict, ws: Any) -> None:
        """Take one upgraded WebSocket (gevent-websocket's ``ws``): it is served
        from the loop's callbacks, and this returns at once (on TLS, at the end)."""
        config = self.config
        handler = ws.handler
        if not getattr(handler, "WSE_HANDLER", False) and not Hub._warned_stock:
            Hub._warned_stock = True
            log.warning("this connection was upgraded by %s, not wse_sync.wsgi.WseHandler:"
                        " malformed upgrades get tracebacks or 500 there, allowed_origins"
                        " is checked only after the upgrade", type(handler).__name__)
        # From here on the socket is ours: keep gevent-websocket from writing to it.
        ws.closed = True
        transport = Transport(handler.socket, handler.rfile, TransportLimits.from_config(config),
                              self.counters, self.admission.refusals, tally=self.tally)
        remote = client_address(environ.get("REMOTE_ADDR"), environ.get("HTTP_X_FORWARDED_FOR"),
                                config.trusted)
        # the socket outlives this greenlet: its edge counts (WseHandler's) go with it
        keep = getattr(handler, "keep_counted", None)
        release = keep() if keep is not None else None
        try:
            self._take(environ, transport, remote, release)
        except BaseException:
            # (a bug, or this greenlet killed before the socket was handed on:
            # the place is given back; the release is idempotent)
            if release is not None:
                release()
            raise

    def _take(self, environ: dict, transport: Transport, remote: Optional[str],
              release: Optional[Callable[[], None]]) -> None:
        """Turn the socket away, or start its session; returns at once."""
        config, app = self.config, self._app
        requested = [p.strip() for p in
                     environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL", "").split(",")]
        conn = WseConnection(self._conn_host, transport, remote_addr=remote)
        if self.stopping:
            self._turn_away(transport, 1012, "", release)
            return
        if app.protocol.name not in requested:
            log.info("refused a connection from %s without subprotocol %r",
                     remote, app.protocol.name)
            self._turn_away(transport, 1000, WSE_REASON.PROTOCOL_ERR, release)
            return
        # (WseHandler answers 403 before the upgrade; this is for the stock handler)
        if not origin_allowed(environ.get("HTTP_ORIGIN"), config.allowed_origins):
            self._refuse(transport, "allowed_origins", 1008, ORIGIN_NOT_ALLOWED, remote, release)
            return
        limit = self.admission.admit(conn, remote)
        if limit is not None:
            self._refuse(transport, limit, 1013, SERVER_BUSY, remote, release)
            return
        session = Session(self, conn)
        self._sessions[session] = release
        session.start()  # (session.closed releases the place, whatever ends it)

    def _welcomed(self, session: Session) -> None:
        """The session no longer counts as unauthenticated (welcomed or gone)."""
        self.admission.done(session.conn, session.conn.remote_addr)

    def _refuse(self, transport: Transport, limit: str, code: int, reason: str,
                remote: Optional[str], release: Optional[Callable[[], None]]) -> None:
        self.admission.refused(limit, remote)
        self._turn_away(transport, code, reason, release)

    @staticmethod
    def _turn_away(transport: Transport, code: int, reason: str,
                   release: Optional[Callable[[], None]]) -> None:
        """Close a socket that gets no session (what the peer sends is dropped)."""
        transport.close(code, reason)
        transport.start(_ignore, lambda code, reason: release() if release else None)

    # -- what sessions report ------------------------------------------------
    def accept(self, session: Session, cid: Hashable, welcome: Any) -> None:
        """identify accepted: join the cluster, evict, welcome, fire the events."""
        conn = session.conn
        conn.cid = cid
        conn.joined_at = time.time()
        link = self._cluster()
        table = self.roster.table
        first, evicted = link.join(conn.conn_id, cid, conn.meta, conn.joined_at,
                                   table.ages(cid), self.config.conn_per_user)
        if not conn.transport.open:
            link.leave(conn.conn_id, cid, conn.meta, 1006, "", quiet=True)
            return
        self.roster.added(conn)
        identity = self.roster.identity(cid, conn.meta)
        conn.client = identity
        for conn_id in evicted:
            old = table.get(conn_id)
            if old is not None:
                old.close(1000, WSE_REASON.CLIENTS_CONCURRENCY)
        conn.ready_state = OPEN
        protocol = self._app.protocol
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

    def closed(self, session: Session, code: int, reason: str) -> None:
        """The socket is gone (the session's last word)."""
        release = self._sessions.pop(session, None)
        self._welcomed(session)
        if release is not None:
            release()
        conn = session.conn
        conn.ready_state = CLOSED
        log.debug("connection %s from %s closed: %s %r", conn.conn_id, conn.remote_addr, code,
                  reason)
        conn.fail_calls(code, reason)
        if not self.roster.removed(conn):
            return
        if self.link is not None:
            self.link.leave(conn.conn_id, conn.cid, conn.meta, code, reason)
        self.emit("disconnected", conn, code, reason)

    def is_pending(self, conn: WseConnection) -> bool:
        """Accepted while the broker was away: 'joined' waits for its verdict."""
        return self.link is not None and self.link.is_pending(conn.conn_id)

    # -- the public API, carried out -------------------------------------------
    def send(self, cid: Hashable, data: Any) -> None:
        self._check_size(data)
        write_all(self.roster.table.of_user(cid), data)
        self._cluster().send_cid(cid, data)

    def broadcast(self, data: Any) -> None:
        self._check_size(data)
        write_all(self.roster.table.all(), data)
        self._cluster().broadcast(data)

    def _check_size(self, data: Any) -> None:
        """A message larger than max_send_queue could never be queued for anyone."""
        limit = self.config.max_send_queue
        if len(data) > limit:
            error = WseError(WSE_ERROR.MESSAGE_PROCESSING_ERROR, {
                "message": f"a {len(data)}-byte message is larger than max_send_queue ({limit})"})
            self.emit_error(error, None)
            raise error

    def drop_client(self, cid: Hashable, reason: str) -> None:
        for conn in self.roster.table.of_user(cid):
            conn.close(1000, reason)
        self._cluster().drop_cid(cid, reason)

    def identity(self, cid: Hashable, meta: Any = None, ask: bool = True) -> WseIdentity:
        """The user's WseIdentity (roster.py)."""
        return self.roster.identity(cid, meta, ask)

    def connections(self) -> List[WseConnection]:
        """The accepted connections of this worker (not of the cluster)."""
        return self.roster.table.all()

    def cids(self) -> List[Hashable]:
        return self.roster.cids()

    def count(self) -> int:
        return self.roster.count()

    def has_user(self, cid: Hashable) -> bool:
        return self.roster.has_user(cid)

    # -- UserPort: what users and remote connections ask (users.py) -------------
    def send_user(self, cid: Hashable, type: str, payload: Any) -> None:
        self.send(cid, self._app.protocol.pack(type, payload, None))

    def drop_user(self, cid: Hashable, reason: str) -> None:
        self.drop_client(cid, reason)

    def conns_of(self, cid: Hashable) -> Dict[str, Any]:
        return self.roster.conns_of(cid)

    def user(self, cid: Hashable) -> Optional[WseIdentity]:
        return self.roster.identity(cid) if self.roster.has_user(cid) else None

    def remote_send(self, conn_id: str, cid: Hashable, type: str, payload: Any) -> None:
        self._cluster().conn_send(conn_id, cid, self._app.protocol.pack(type, payload, None))

    def remote_call(self, conn_id: str, cid: Hashable, rp: str, payload: Any,
                    timeout: Optional[float]) -> Any:
        if timeout is None:
            timeout = self.config.rpc_timeout
        return self._cluster().call(conn_id, cid, rp, payload, timeout)

    def remote_drop(self, conn_id: str, cid: Hashable, reason: str) -> None:
        self._cluster().conn_drop(conn_id, cid, reason)

    # -- health and figures -------------------------------------------------------
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


def _ignore(data: object) -> None:
    """What a socket turned away does with a message."""


class _ConnHost:
    """A connection's view of its server (socket.connection.ConnectionHost)."""

    __slots__ = ("server", "_hub", "protocol")

    def __init__(self, app: App, hub: Hub) -> None:
        self.server = app
        self._hub = hub
        # (the codec is fixed when the server is made: read once)
        self.protocol = app.protocol

    @property
    def rpc_timeout(self) -> Optional[float]:
        return self.server.config.rpc_timeout

    @property
    def worker_id(self) -> str:
        return self._hub.worker_id
