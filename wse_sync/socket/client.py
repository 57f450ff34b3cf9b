"""WseClient: a blocking Python client with the JS WseClient's features.

It runs on gevent but needs no monkey-patching: a plain script calls
``connect()``, ``call()`` etc. and only the calling code waits. Incoming
messages and RPC calls from the server run their handlers in greenlets, so
they make progress whenever the script waits in a client call or in
``client.wait()`` / ``gevent.sleep()``.

After its HTTP handshake the socket is the server's loop's: a ``Transport``
(``side=CLIENT``) reads, writes, answers pings and keeps the close deadline,
and never leaves a watcher on a closed descriptor. A send waits while more
than SEND_HIGH_WATER bytes are queued for the socket (back-pressure, as a
blocking write would).
"""
from __future__ import annotations

import base64
import hashlib
import logging
import os
import random
import ssl as _ssl
import sys
from typing import Any, Callable, Dict, Optional
from urllib.parse import urlsplit

import gevent
from gevent import socket as gsocket
from gevent import ssl as gssl
from gevent.event import AsyncResult, Event

from . import runner
from .answers import Answers
from .transport import Transport, TransportLimits
from ..core.errors import WSE_ERROR, WSE_REASON, WSE_STATUS, WseError, rpc_error_payload
from ..core.events import Emitter, RpcHandlers
from ..core.options import DEFAULT_RPC_TIMEOUT
from ..core.websocket import CLIENT
from ..core.protocol import WseJSON, check_protocol

__all__ = ["WseClient", "RECONNECT_CODES"]

log = logging.getLogger("wse_sync.client")

# close codes after which a client with reconnect=True comes back
RECONNECT_CODES = frozenset({1005, 1006, 1011, 1012, 1013, 1014, 4000})

_CLIENT_EVENTS = ("ready", "closed", "error", "updated", "ignored", "connected")
# events whose last value a late subscriber gets at once (the JS client's
# memorable signals)
_MEMORABLE = frozenset({"ready", "updated"})

# seconds a close waits for the server's close frame before cutting TCP
CLOSE_TIMEOUT = 3.0
# bytes queued for the socket beyond which a send waits for them to go
SEND_HIGH_WATER = 1 << 20
# the longest HTTP response head read in the handshake
MAX_HEAD = 65536


class _ClientWhen:
    def __init__(self) -> None:
        self.emitter = Emitter()
        # name -> the arguments of its last emit, for the memorable events
        self.last: Dict[str, tuple] = {}
        for name in _CLIENT_EVENTS:
            setattr(self, name, self._binder(name))

    def _binder(self, name: str) -> Callable:
        def bind(handler: Callable) -> Callable:
            self.emitter.on(name, handler)
            if name in self.last:
                try:
                    handler(*self.last[name])
                except Exception:
                    log.exception("client %s handler failed", name)
            return handler
        bind.__name__ = name
        return bind


class WseClient:
    """``WseClient(url, rpc_timeout=20, reconnect=False, protocol=None)``
    (``rpc_timeout`` defaults to ``core.options.DEFAULT_RPC_TIMEOUT``).

    Events (``client.when.X(handler)``): ``ready(welcome)``,
    ``closed(code, reason)``, ``error(WseError)``, ``updated(status)``,
    ``ignored(type, payload)``.
    """

    def __init__(self, url: str, rpc_timeout: float = DEFAULT_RPC_TIMEOUT,
                 reconnect: bool = False,
                 protocol: Any = None, connect_timeout: float = 10.0,
                 max_message_size: Optional[int] = None,
                 ssl_context: Optional[_ssl.SSLContext] = None, **options: Any) -> None:
        if "tO" in options:
            rpc_timeout = options.pop("tO")
        if "re" in options:
            reconnect = options.pop("re")
        if options:
            raise TypeError(f"unknown WseClient options: {sorted(options)}")
        self.url = url
        self.rpc_timeout = rpc_timeout
        self.reconnect = reconnect
        self.protocol = check_protocol(protocol if protocol is not None else WseJSON())
        self.connect_timeout = connect_timeout
        self.max_message_size = max_message_size
        # for wss://: None means the system's default verification
        self.ssl_context = ssl_context
        self.channel = Emitter()
        self.when = _ClientWhen()
        self.status = WSE_STATUS.IDLE
        self.identity: Any = ""
        self.meta: dict = {}
        self.welcome: Any = None
        self._rpcs = RpcHandlers()
        self._solver: Optional[Callable] = None
        # calls waiting for the server's answer (details as the JS client's)
        self._answers = Answers(js_details=True)
        # the open socket's loop, None while no socket is open
        self._transport: Optional[Transport] = None
        self._reader: Optional[gevent.Greenlet] = None
        self._ready: Optional[AsyncResult] = None
        # set while no socket is open (a client that never connected is closed)
        self._closed_event = Event()
        self._closed_event.set()
        self._user_closed = False
        self._reconnector: Optional[gevent.Greenlet] = None
        self.close_status: Optional[tuple] = None

    # -- public API ------------------------------------------------------------
    def connect(self, identity: Any = "", meta: Optional[dict] = None) -> Any:
        """Open, authenticate and return the welcome payload.

        Raises WseError: ``wse.not-authorized`` (or the server's close reason)
        when refused, CLIENT_ALREADY_CONNECTED, WS_CLIENT_ERROR.
        """
        if self.status in (WSE_STATUS.READY, WSE_STATUS.CONNECTING):
            raise WseError(WSE_ERROR.CLIENT_ALREADY_CONNECTED)
        self.identity = identity
        self.meta = meta if meta is not None else {}
        self._user_closed = False
        return self._connect(WSE_STATUS.CONNECTING)

    def send(self, type: str, payload: Any = None) -> None:
        self._require_ready()
        self._write_message(self.protocol.pack(type, payload, None))

    def call(self, rp: str, payload: Any = None, timeout: Optional[float] = None) -> Any:
        """Call a server procedure and return its result.

        ``timeout`` defaults to ``rpc_timeout``; 0 (or less) waits forever, as
        in the JS client. Raises WseError with the server's code and details
        (``{}`` when it sent none), RP_TIMEOUT (details ``{}``), RP_DISCONNECT
        (``{"disconnected": [code, reason]}``) or CONNECTION_NOT_READY; the
        error's ``rpc`` is ``rp``, and its message names it.
        """
        self._require_ready()
        timeout = self.rpc_timeout if timeout is None else timeout
        answers = self._answers
        stamp = answers.new()
        return answers.wait(stamp, rp, lambda: self._write_message(
            self.protocol.pack(rp, payload, stamp)), timeout if timeout and timeout > 0 else None)

    def register(self, rp: str, handler: Optional[Callable] = None):
        """``handler(payload) -> result`` answers server calls of ``rp``; decorator too."""
        if handler is None:
            return lambda fn: self.register(rp, fn)
        return self._rpcs.register(rp, handler)

    def unregister(self, rp: str) -> None:
        """Raises RP_NOT_REGISTERED."""
        self._rpcs.unregister(rp)

    def challenge(self, solver: Callable) -> None:
        """``solver(quest, solve)`` answers a server challenge by calling ``solve(answer)``."""
        if not callable(solver):
            raise WseError(WSE_ERROR.INVALID_CRA_HANDLER)
        self._solver = solver

    def close(self, reason: str = WSE_REASON.BY_CLIENT, code: int = 1000) -> None:
        """Close (no reconnect) and wait until the socket is closed."""
        self._user_closed = True
        if self._reconnector is not None:
            self._reconnector.kill()
            self._reconnector = None
        self._close(code, reason)
        self._closed_event.wait(timeout=5)  # set at once when nothing was open
        self._set_status(WSE_STATUS.OFFLINE)

    def jump(self, url: str, identity: Any = None, meta: Optional[dict] = None) -> Any:
        """Close with 4000 ``jump`` and connect to ``url``; returns the new welcome."""
        self._user_closed = True
        self._close(4000, "jump")
        self._closed_event.wait(timeout=5)  # set at once when nothing was open
        self.when.last.pop("ready", None)  # a late ready() subscriber waits for the new welcome
        self.url = url
        if identity is not None:
            self.identity = identity
        if meta is not None:
            self.meta = meta
        self._user_closed = False
        return self._connect(WSE_STATUS.CONNECTING)

    def wait(self, seconds: Optional[float] = None) -> None:
        """Let incoming messages be handled for ``seconds`` (until closed if None)."""
        if seconds is None:
            self._closed_event.wait()
        else:
            gevent.sleep(seconds)

    @property
    def reconnecting(self) -> bool:
        """A reconnect loop is running (after a lost connection, ``reconnect=True``)."""
        return self._reconnector is not None and not self._reconnector.dead

    @property
    def ready(self) -> bool:
        return self.status == WSE_STATUS.READY

    # -- connection ------------------------------------------------------------
    def _connect(self, status: str) -> Any:
        self._set_status(status)
        self._ready = AsyncResult()
        self.close_status = None
        try:
            self._open_socket()
        except (OSError, WseError) as exc:
            err = exc if isinstance(exc, WseError) else WseError(
                WSE_ERROR.WS_CLIENT_ERROR, {"message": str(exc)})
            # as the JS client over ws: an error, then closed 1006, then OFFLINE
            self._emit("error", err)
            self.close_status = (1006, "")
            self._emit("closed", 1006, "")
            self._set_status(WSE_STATUS.OFFLINE)
            raise err from None
        self._closed_event.clear()
        self._emit("connected")
        self._reader = gevent.spawn(self._read_loop, self._transport)
        self._write_message(self.protocol.pack(
            self.protocol.internal_types["hi"], {"identity": self.identity, "meta": self.meta},
            None))
        try:
            welcome = self._ready.get(timeout=self.connect_timeout)
        except gevent.Timeout:
            self._close(1000, "")
            raise WseError(WSE_ERROR.WS_CLIENT_ERROR, {"message": "no welcome in time"}) from None
        return welcome

    def _open_socket(self) -> None:
        parts = urlsplit(self.url)
        secure = parts.scheme == "wss"
        host = parts.hostname or "127.0.0.1"
        port = parts.port or (443 if secure else 80)
        sock = gsocket.create_connection((host, port), timeout=self.connect_timeout)
        rfile = None
        try:
            sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
            if secure:
                # gevent's SSLSocket, whatever kind of context: the stdlib one
                # would block the whole process on reads
                context = self.ssl_context or gssl.create_default_context()
                sock = gssl.SSLSocket(sock=sock, server_hostname=host, _context=context)
            # (as the server's: the head is read through the buffered reader,
            # and the Transport reads what it holds beyond the head first)
            rfile = sock.makefile("rb")
            self._handshake(sock, rfile, parts)
            sock.settimeout(None)
            self._transport = Transport(sock, rfile, TransportLimits(
                max_message_size=self.max_message_size, max_send_queue=sys.maxsize,
                close_timeout=CLOSE_TIMEOUT), side=CLIENT)
        except BaseException:
            # a refused or broken handshake must not leave the socket open (the
            # reader first: while it is open, closing the socket keeps the descriptor)
            for closeable in (rfile, sock):
                try:
                    if closeable is not None:
                        closeable.close()
                except OSError:
                    pass
            raise

    def _handshake(self, sock: Any, rfile: Any, parts: Any) -> None:
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        request = (
            f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {self.protocol.name}\r\n\r\n"
        )
        sock.sendall(request.encode("latin-1"))
        lines = []
        size = 0
        while True:
            line = rfile.readline(MAX_HEAD + 1)
            if not line or not line.endswith(b"\n"):
                if size + len(line) > MAX_HEAD:
                    raise WseError(WSE_ERROR.WS_CLIENT_ERROR, {"message": "handshake too long"})
                raise WseError(WSE_ERROR.WS_CLIENT_ERROR,
                               {"message": "connection closed in handshake"})
            size += len(line)
            if size > MAX_HEAD:
                raise WseError(WSE_ERROR.WS_CLIENT_ERROR, {"message": "handshake too long"})
            if line in (b"\r\n", b"\n"):
                break
            lines.append(line.rstrip(b"\r\n").decode("latin-1"))
        status = lines[0].split(" ", 2) if lines else []
        if len(status) < 2 or status[1] != "101":
            raise WseError(WSE_ERROR.WS_CLIENT_ERROR,
                           {"message": f"server answered {(lines or [''])[0]!r}"})
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        expected = base64.b64encode(hashlib.sha1(
            (key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
        if headers.get("sec-websocket-accept") != expected:
            raise WseError(WSE_ERROR.WS_CLIENT_ERROR, {"message": "bad Sec-WebSocket-Accept"})
        if headers.get("sec-websocket-protocol") != self.protocol.name:
            raise WseError(WSE_ERROR.WS_CLIENT_ERROR,
                           {"message": "server did not select the subprotocol"})

    def _write_message(self, data: Any) -> None:
        """Queue one message (raises CONNECTION_NOT_READY); waits while more
        than SEND_HIGH_WATER bytes are queued."""
        transport = self._transport
        if transport is None or not transport.write_message(data):
            raise WseError(WSE_ERROR.CONNECTION_NOT_READY)
        if transport.queued > SEND_HIGH_WATER and gevent.getcurrent() is not gevent.get_hub():
            transport.wait_sent()

    def _close(self, code: int, reason: str) -> None:
        """Start the closing handshake; the reader ends when the server ends
        TCP (or after CLOSE_TIMEOUT)."""
        if self._transport is not None:
            self._transport.close(code, reason)

    def _read_loop(self, transport: Transport) -> None:
        try:
            transport.run(self._on_message)
        finally:
            if self._transport is transport:
                self._transport = None
            ws = transport.protocol
            if ws.failure is not None:
                # the server broke the framing rules or sent too much: say why
                self._emit("error", WseError(WSE_ERROR.WS_CLIENT_ERROR, {
                    "message": ws.failure.reason}))
                code, reason = ws.failure.code, ws.failure.reason
            else:
                # what the server said (its echo when we closed first), as the JS client
                code, reason = ws.close_rcvd or (1006, "")
            self._on_closed(code, reason)

    def _on_closed(self, code: int, reason: str) -> None:
        self.close_status = (code, reason)
        self._answers.fail_all(code, reason)
        was_ready = self.status == WSE_STATUS.READY
        if self._ready is not None and not self._ready.ready():
            self._ready.set_exception(WseError(reason or WSE_ERROR.WS_CLIENT_ERROR,
                                               {"code": code, "reason": reason}))
        self._closed_event.set()
        self._emit("closed", code, reason)
        if (was_ready and self.reconnect and not self._user_closed
                and code in RECONNECT_CODES):
            # OFFLINE first, as the JS client reports it between READY and RE_CONNECTING
            self._set_status(WSE_STATUS.OFFLINE)
            self._set_status(WSE_STATUS.RE_CONNECTING)
            self._reconnector = gevent.spawn(self._reconnect_loop)
        elif self.status != WSE_STATUS.RE_CONNECTING or self._user_closed:
            self._set_status(WSE_STATUS.OFFLINE)

    def _reconnect_loop(self) -> None:
        delay = 0.1
        while not self._user_closed:
            gevent.sleep(delay * (0.75 + random.random() / 2))
            try:
                self._connect(WSE_STATUS.RE_CONNECTING)
                return
            except WseError as exc:
                log.info("reconnect to %s failed: %s", self.url, exc)
                if exc.code == WSE_ERROR.NOT_AUTHORIZED:
                    self._set_status(WSE_STATUS.OFFLINE)
                    return
                self._set_status(WSE_STATUS.RE_CONNECTING)
            delay = min(delay * 2, 5.0)

    # -- incoming --------------------------------------------------------------
    def _on_message(self, data: Any) -> None:
        types = self.protocol.internal_types
        try:
            type_, payload, stamp = self.protocol.unpack(data)
        except Exception as exc:
            self._emit("error", WseError(WSE_ERROR.MESSAGE_PROCESSING_ERROR, {"message": str(exc)}))
            return
        if type_ == types["welcome"] and stamp is None and self.status != WSE_STATUS.READY:
            self.welcome = payload
            self._set_status(WSE_STATUS.READY)
            if self._ready is not None and not self._ready.ready():
                self._ready.set(payload)
            self._emit("ready", payload)
        elif type_ == types["challenge"] and stamp is None and self.status != WSE_STATUS.READY:
            gevent.spawn(self._solve, payload)
        elif type_ in (types["response"], types["response_error"]) and stamp is not None:
            self._answers.resolve(stamp, type_ == types["response"], payload)
        elif stamp is not None:
            runner.spawn(self._serve_call, type_, payload, stamp)
        elif self.channel.has(type_):
            for handler in self.channel.handlers(type_):
                runner.spawn(self._run_handler, handler, payload)
        else:
            self._emit("ignored", type_, payload)

    def _solve(self, quest: Any) -> None:
        solver = self._solver
        if solver is None:
            self._emit("error", WseError(WSE_ERROR.INVALID_CRA_HANDLER))
            return

        def solve(answer: Any) -> None:
            self._write_message(self.protocol.pack(
                self.protocol.internal_types["challenge"], answer, None))

        try:
            solver(quest, solve)
        except Exception as exc:
            self._emit("error", WseError(WSE_ERROR.INVALID_CRA_HANDLER, {"message": str(exc)}))

    def _serve_call(self, rp: str, payload: Any, stamp: str) -> None:
        types = self.protocol.internal_types
        handler = self._rpcs.get(rp)
        if handler is None:
            answer = (types["response_error"], {"code": WSE_ERROR.RP_NOT_REGISTERED})
        else:
            try:
                answer = (types["response"], handler(payload))
            except Exception as exc:
                answer = (types["response_error"], rpc_error_payload(exc, rp, payload))
        try:
            self._write_message(self.protocol.pack(answer[0], answer[1], stamp))
        except WseError:
            pass

    def _run_handler(self, handler: Callable, payload: Any) -> None:
        try:
            handler(payload)
        except Exception as exc:
            self._emit("error", WseError(WSE_ERROR.MESSAGE_PROCESSING_ERROR, {"message": str(exc)}))

    def _require_ready(self) -> None:
        if self.status != WSE_STATUS.READY or self._transport is None:
            raise WseError(WSE_ERROR.CONNECTION_NOT_READY)

    def _set_status(self, status: str) -> None:
        if status != self.status:
            self.status = status
            self._emit("updated", status)

    def _emit(self, name: str, *args: Any) -> None:
        if name in _MEMORABLE:
            self.when.last[name] = args
        for handler in self.when.emitter.handlers(name):
            try:
                handler(*args)
            except Exception:
                log.exception("client %s handler failed", name)
