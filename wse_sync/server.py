"""WseServer: the public API, and the worker-side runtime behind it.

A WseServer is a WSGI application: mount it in any gevent WSGI server that
uses gevent-websocket's handler (``wse_sync.wsgi.WseHandler`` selects the
subprotocol exactly). It joins the cluster through a broker (``broker=``
endpoint); without one, it runs an embedded broker in a greenlet of its own
process, so a lone server needs nothing else.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any, Callable, Dict, Hashable, Iterator, Optional

import gevent

from . import runner
from .connection import CLOSED, OPEN, RemoteConnection, WseConnection, WseIdentity, make_id
from .errors import WSE_ERROR, WSE_REASON, WseError
from .events import Emitter, When
from .core.forwarded import client_address, parse_trusted
from .protocol import WseJSON, check_protocol
from .session import Session
from .transport import Transport

__all__ = ["WseServer", "DEFAULTS"]

log = logging.getLogger("wse_sync.server")

# Listening and limit options (all may be given to WseServer(**options)).
DEFAULTS: Dict[str, Any] = {
    "host": "127.0.0.1",
    "port": 4200,
    "path": None,               # None: any path; else other paths get 404
    "max_message_size": 1024 * 1024,
    "handshake_timeout": 10.0,  # seconds to receive ~wse:hi
    "auth_timeout": 10.0,       # seconds for challenge + identify to decide
    "ping_interval": 20.0,      # idle seconds before the server pings
    "ping_timeout": 20.0,       # further silent seconds before the socket is cut
    "close_timeout": 2.0,       # seconds to wait for the peer's close frame
    "max_send_queue": 4 * 1024 * 1024,  # bytes queued per slow client (every frame counts)
    "max_fragments": 1000,      # frames one message may arrive in (1008 beyond)
    "broker": None,             # endpoint; None = embedded broker
    "broker_timeout": 5.0,      # seconds to wait for a broker answer
    "heartbeat": 1.0,
    "certfile": None,
    "keyfile": None,
    # addresses whose X-Forwarded-For is believed (uvicorn's forwarded_allow_ips);
    # a string "a,b" or an iterable; "*" trusts everyone
    "trusted_proxies": ("127.0.0.1", "::1"),
    # send the handler's full traceback in RPC errors (names server files)
    "rpc_tracebacks": False,
}


class _Clients(Mapping):
    """Read-only view cid -> WseIdentity of every connected user of the cluster."""

    def __init__(self, server: "WseServer") -> None:
        self._server = server

    def _cids(self):
        s = self._server
        cids = dict.fromkeys(s._by_cid)
        if s._link is not None:
            cids.update(dict.fromkeys(s._link.view.users))
        return cids

    def __getitem__(self, cid: Hashable) -> WseIdentity:
        s = self._server
        if cid in s._by_cid or (s._link is not None and cid in s._link.view.users):
            return s._identity(cid)
        raise KeyError(cid)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._cids())

    def __len__(self) -> int:
        return len(self._cids())

    def __contains__(self, cid: object) -> bool:
        s = self._server
        return cid in s._by_cid or (s._link is not None and cid in s._link.view.users)


class WseServer:
    """A wse 4.x compatible server. See python-api.md for the contract."""

    def __init__(self, identify: Optional[Callable] = None, conn_per_user: int = 1,
                 rpc_timeout: float = 20, protocol: Any = None, **options: Any) -> None:
        if "connPerUser" in options:
            conn_per_user = options.pop("connPerUser")
        if "tO" in options:
            rpc_timeout = options.pop("tO")
        if not callable(identify):
            raise WseError(WSE_ERROR.IDENTIFY_HANDLER_MISSING)
        unknown = set(options) - set(DEFAULTS)
        if unknown:
            raise TypeError(f"unknown WseServer options: {sorted(unknown)}")
        self.identify = identify
        self.conn_per_user = conn_per_user
        self.rpc_timeout = rpc_timeout
        self.protocol = check_protocol(protocol if protocol is not None else WseJSON())
        self.options: Dict[str, Any] = dict(DEFAULTS, **options)
        self._trusted = parse_trusted(self.options["trusted_proxies"])
        self.channel = Emitter()
        self.when = When()
        self._rpcs: Dict[str, Callable] = {}
        self._cra_generator: Optional[Callable] = None
        self.clients: Mapping = _Clients(self)
        # False for a cluster member without sockets (connect_cluster)
        self.serves = True
        self._reset_runtime()

    # -- the original names ---------------------------------------------
    @property
    def connPerUser(self) -> int:  # noqa: N802
        return self.conn_per_user

    @connPerUser.setter
    def connPerUser(self, value: int) -> None:  # noqa: N802
        self.conn_per_user = value

    @property
    def tO(self) -> float:  # noqa: N802
        return self.rpc_timeout

    @tO.setter
    def tO(self, value: float) -> None:  # noqa: N802
        self.rpc_timeout = value

    def dropClient(self, cid: Hashable, reason: str = WSE_REASON.NO_REASON) -> None:  # noqa: N802
        self.drop_client(cid, reason)

    def useChallenge(self, generator: Callable) -> None:  # noqa: N802
        self.use_challenge(generator)

    # -- options as attributes -------------------------------------------
    def __getattr__(self, name: str) -> Any:
        options = self.__dict__.get("options")
        if options is not None and name in options:
            return options[name]
        raise AttributeError(name)

    # -- public API ------------------------------------------------------
    def register(self, rp: str, handler: Optional[Callable] = None):
        """Register RPC ``rp``: ``handler(conn, payload) -> result``. Decorator when
        ``handler`` is omitted. Raises RP_ALREADY_REGISTERED."""
        if handler is None:
            return lambda fn: self.register(rp, fn)
        if rp in self._rpcs:
            raise WseError(WSE_ERROR.RP_ALREADY_REGISTERED, {"rpc": rp})
        if not callable(handler):
            raise TypeError("handler must be callable")
        self._rpcs[rp] = handler
        return handler

    def unregister(self, rp: str) -> None:
        if rp not in self._rpcs:
            raise WseError(WSE_ERROR.RP_NOT_REGISTERED, {"rpc": rp})
        del self._rpcs[rp]

    def use_challenge(self, generator: Callable) -> None:
        """Enable challenge-response: ``generator(identity, meta, quest, refuse)``."""
        if not callable(generator):
            raise WseError(WSE_ERROR.INVALID_CRA_GENERATOR)
        self._cra_generator = generator

    def send(self, cid: Hashable, type: str, payload: Any = None) -> None:
        """Send to every connection of user ``cid``, on every worker; unknown cid: no-op."""
        data = self.protocol.pack(type, payload, None)
        self._deliver_local(self._by_cid.get(cid, {}).values(), data)
        self._ensure_started()
        self._link.send_cid(cid, data)

    def broadcast(self, type: str, payload: Any = None) -> None:
        """Send to every connection of every user; packed once for all sockets."""
        data = self.protocol.pack(type, payload, None)
        self._deliver_local(self._conns.values(), data)
        self._ensure_started()
        self._link.broadcast(data)

    def drop_client(self, cid: Hashable, reason: str = WSE_REASON.NO_REASON) -> None:
        """Close every connection of ``cid`` on every worker (code 1000, ``reason``)."""
        for conn in list(self._by_cid.get(cid, {}).values()):
            conn.close(1000, reason)
        self._ensure_started()
        self._link.drop_cid(cid, reason)

    # -- WSGI --------------------------------------------------------------
    def app_protocol(self, path: str) -> Optional[str]:
        """For gevent-websocket's stock handler: the subprotocol to select."""
        return self.protocol.name if self.wants(path) else None

    def wants(self, path: str) -> bool:
        return self.options["path"] in (None, path)

    def __call__(self, environ: dict, start_response: Callable):
        if not self.wants(environ.get("PATH_INFO", "")):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        ws = environ.get("wsgi.websocket")
        if ws is None:
            start_response("426 Upgrade Required", [
                ("Content-Type", "text/plain"), ("Upgrade", "websocket"),
                ("Sec-WebSocket-Version", "13")])
            return [b"this is a WebSocket endpoint (wse protocol)\n"]
        self._ensure_started()
        handler = ws.handler
        # From here on the socket is ours: keep gevent-websocket from writing to it.
        ws.closed = True
        transport = Transport(handler.socket, handler.rfile, self.options["max_message_size"],
                              self.options["max_send_queue"], self.options["close_timeout"],
                              self.options["max_fragments"])
        requested = [p.strip() for p in
                     environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL", "").split(",")]
        remote = client_address(environ.get("REMOTE_ADDR"), environ.get("HTTP_X_FORWARDED_FOR"),
                                self._trusted)
        conn = WseConnection(self, transport, remote_addr=remote)
        if self._stopping:
            transport.close(1012, "")
            transport.run(lambda data: None)
            return []
        if self.protocol.name not in requested:
            log.info("refused a connection from %s without subprotocol %r",
                     remote, self.protocol.name)
            transport.close(1000, WSE_REASON.PROTOCOL_ERR)
            transport.run(lambda data: None)
            return []
        session = Session(self, conn)
        self._sessions.add(session)
        try:
            session.run()
        finally:
            self._sessions.discard(session)
        return []

    # -- runtime -------------------------------------------------------------
    def _reset_runtime(self) -> None:
        self._pid = os.getpid()
        # this worker's id in the cluster
        self.worker_id = f"w{os.getpid()}-{make_id(6)}"
        self._conns: Dict[str, WseConnection] = {}          # accepted, local
        self._by_cid: Dict[Hashable, Dict[str, WseConnection]] = {}
        self._identities: Dict[Hashable, WseIdentity] = {}
        self._sessions: set = set()
        self._link = None
        self._embedded_broker = None
        self._sweeper: Optional[gevent.Greenlet] = None
        self._stopping = False
        # handlers running now (RPC, channel, event), for a graceful stop
        self._busy = 0

    def start(self, broker: Optional[str] = None, worker_id: Optional[str] = None) -> None:
        """Join the cluster (idempotent). Without ``broker`` and no ``broker``
        option, start an embedded broker in this process."""
        if self._pid != os.getpid():  # forked after start: a fresh runtime
            self._reset_runtime()
        if self._link is not None:
            return
        from .link import BrokerLink
        if worker_id:
            self.worker_id = worker_id
        endpoint = broker or self.options["broker"] or os.environ.get("WSE_SYNC_BROKER") or None
        import zmq.green as zmq
        ctx = zmq.Context()
        if endpoint is None:
            from .broker import Broker
            endpoint = f"inproc://wse-broker-{self.worker_id}"
            self._embedded_broker = Broker(endpoint, zmq, context=ctx,
                                           heartbeat=self.options["heartbeat"])
            self._embedded_broker.bind()
            gevent.spawn(self._embedded_broker.run)
        self._link = BrokerLink(self, endpoint, ctx, heartbeat=self.options["heartbeat"],
                                request_timeout=self.options["broker_timeout"])
        self._link.start()
        self._sweeper = gevent.spawn(self._sweep)

    def _ensure_started(self) -> None:
        if self._link is None or self._pid != os.getpid():
            self.start()

    def shutdown(self, code: int = 1012, reason: str = "", timeout: float = 5.0) -> None:
        """Close every connection with ``code`` and leave the cluster.

        Waits up to ``timeout`` seconds for the connections to finish closing
        and for running handlers (RPC, channel, events) to return.
        """
        self._stopping = True
        sessions = list(self._sessions)
        for s in sessions:
            s.conn.close(code, reason)
        deadline = time.monotonic() + timeout
        while (self._sessions or self._busy) and time.monotonic() < deadline:
            gevent.sleep(0.02)
        if self._busy:
            log.warning("%d handler(s) still running after %.1fs: abandoning them",
                        self._busy, timeout)
        if self._link is not None:
            self._link.stop()
        if self._embedded_broker is not None:
            self._embedded_broker.stop()
        if self._sweeper is not None:
            self._sweeper.kill(block=False)

    # -- called by sessions and the link ------------------------------------
    def _accept(self, session: Session, cid: Hashable, welcome: Any) -> None:
        conn = session.conn
        session._cancel_deadline()
        session.joining = True
        conn.cid = cid
        conn.joined_at = time.time()
        first, evicted = self._link.join(conn, self.conn_per_user)
        if not conn.transport.open:
            self._link.leave(conn, 1006, "", quiet=True)
            return
        self._conns[conn.conn_id] = conn
        self._by_cid.setdefault(cid, {})[conn.conn_id] = conn
        identity = self._identity(cid, conn.meta)
        conn.client = identity
        for conn_id in evicted:
            old = self._conns.get(conn_id)
            if old is not None:
                old.close(1000, WSE_REASON.CLIENTS_CONCURRENCY)
        conn.ready_state = OPEN
        conn.transport.write_message(
            self.protocol.pack(self.protocol.internal_types["welcome"], welcome, None))
        session.ready()
        if first:
            self._emit("joined", identity, conn.meta)
        self._emit("connected", conn)
        session.joining = False

    def _connection_closed(self, conn: WseConnection, code: int, reason: str) -> None:
        accepted = self._conns.pop(conn.conn_id, None) is not None
        conn.ready_state = CLOSED
        conn._fail_calls(code, reason)
        if not accepted:
            return
        user = self._by_cid.get(conn.cid)
        if user is not None:
            user.pop(conn.conn_id, None)
            if not user:
                del self._by_cid[conn.cid]
        self._link.leave(conn, code, reason)
        self._emit("disconnected", conn, code, reason)

    def _identity(self, cid: Hashable, meta: Any = None) -> WseIdentity:
        ident = self._identities.get(cid)
        if ident is None:
            if meta is None and self._link is not None:
                meta = self._link.view.meta_of(cid)
            ident = self._identities[cid] = WseIdentity(self, cid, meta)
        return ident

    def _forget_identity(self, cid: Hashable) -> None:
        if cid not in self._by_cid and (self._link is None or cid not in self._link.view.users):
            self._identities.pop(cid, None)

    def _remote_left(self, cid: Hashable, code: int, reason: str, meta: Any) -> None:
        """The broker says the user's last connection anywhere is gone."""
        ident = self._identities.get(cid) or WseIdentity(self, cid, meta)
        self._forget_identity(cid)
        self._emit("left", ident, code, reason)

    def _conns_of(self, cid: Hashable) -> Dict[str, Any]:
        conns: Dict[str, Any] = dict(self._by_cid.get(cid, {}))
        if self._link is not None:
            for conn_id, (worker, meta) in self._link.view.users.get(cid, {}).items():
                if conn_id not in conns and worker != self.worker_id:
                    conns[conn_id] = RemoteConnection(self, conn_id, cid, worker, meta)
        return conns

    def _deliver_local(self, conns, data: Any) -> int:
        frame = None
        n = 0
        for conn in conns:
            if conn.ready_state == OPEN:
                if frame is None:
                    frame = conn.transport.frame_for(data)
                conn.transport.write_raw(frame)
                n += 1
        return n

    def _local_by_cid(self, cid: Hashable):
        return self._by_cid.get(cid, {}).values()

    def _emit(self, name: str, *args: Any) -> None:
        for handler in self.when.emitter.handlers(name):
            self._spawn(self._run_event, name, handler, args)

    def _spawn(self, fn: Callable, *args: Any) -> None:
        """Run application code in a greenlet of its own, counted in ``_busy``."""
        runner.spawn(self._counted, fn, args)

    def _counted(self, fn: Callable, args: tuple) -> None:
        self._busy += 1
        try:
            fn(*args)
        finally:
            self._busy -= 1

    def _run_event(self, name: str, handler: Callable, args: tuple) -> None:
        try:
            handler(*args)
        except Exception as exc:
            conn = args[0] if args and isinstance(args[0], WseConnection) else None
            if name == "error":
                log.error("the error handler raised %s: %s", type(exc).__name__, exc)
            else:
                self._emit_error(WseError(WSE_ERROR.MESSAGE_PROCESSING_ERROR, {
                    "event": name, "exception": exc, "message": str(exc)}), conn)

    def _emit_error(self, error: WseError, conn: Optional[Any] = None) -> None:
        if self.when.emitter.has("error"):
            self._emit("error", error, conn)
        else:
            log.warning("%s (connection %s)", error, getattr(conn, "conn_id", None))

    def _sweep(self) -> None:
        """Ping idle connections; cut those silent past ping_interval + ping_timeout."""
        interval = self.options["ping_interval"]
        timeout = self.options["ping_timeout"]
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
