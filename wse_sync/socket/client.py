"""WseClient: a blocking Python client with the JS WseClient's features.

It runs on gevent but needs no monkey-patching: a plain script calls
``connect()``, ``call()`` etc. and only the calling code waits. Incoming
messages and RPC calls from the server run their handlers in greenlets, so
they make progress whenever the script waits in a client call or in
``client.wait()`` / ``gevent.sleep()``.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import os
import random
import ssl as _ssl
from typing import Any, Callable, Dict, Optional
from urllib.parse import urlsplit

import gevent
from gevent import socket as gsocket
from gevent import ssl as gssl
from gevent.event import AsyncResult, Event

from . import runner
from ..core.ids import make_id
from ..core.errors import WSE_ERROR, WSE_REASON, WSE_STATUS, WseError, rpc_error_payload
from ..core.events import Emitter, RpcHandlers
from ..core.websocket import CLIENT, Message, Protocol
from ..core.protocol import WseJSON, check_protocol

__all__ = ["WseClient", "RECONNECT_CODES"]

log = logging.getLogger("wse_sync.client")

# close codes after which a client with reconnect=True comes back
RECONNECT_CODES = frozenset({1005, 1006, 1011, 1012, 1013, 1014, 4000})

_CLIENT_EVENTS = ("ready", "closed", "error", "updated", "ignored", "connected")
# events whose last value a late subscriber gets at once (the JS client's
# memorable signals)
_MEMORABLE = frozenset({"ready", "updated"})


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
    """``WseClient(url, rpc_timeout=20, reconnect=False, protocol=None)``.

    Events (``client.when.X(handler)``): ``ready(welcome)``,
    ``closed(code, reason)``, ``error(WseError)``, ``updated(status)``,
    ``ignored(type, payload)``.
    """

    def __init__(self, url: str, rpc_timeout: float = 20, reconnect: bool = False,
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
        self._calls: Dict[str, AsyncResult] = {}
        self._sock = None
        self._ws: Optional[Protocol] = None
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
        stamp = make_id(10)
        result = self._calls[stamp] = AsyncResult()
        timeout = self.rpc_timeout if timeout is None else timeout
        try:
            self._write_message(self.protocol.pack(rp, payload, stamp))
            try:
                ok, value = result.get(timeout=timeout if timeout and timeout > 0 else None)
            except gevent.Timeout:
                raise WseError(WSE_ERROR.RP_TIMEOUT, {}, rpc=rp) from None
        finally:
            self._calls.pop(stamp, None)
        if ok == "ok":
            return value
        if ok == "closed":
            raise WseError(WSE_ERROR.RP_DISCONNECT, {"disconnected": list(value)}, rpc=rp)
        if isinstance(value, dict) and isinstance(value.get("code"), str):
            details = value.get("details")
            raise WseError(value["code"], details if details is not None else {}, rpc=rp)
        raise WseError(WSE_ERROR.RP_EXECUTION_FAILED, {"rpc": rp, "error": value}, rpc=rp)

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
        self._reader = gevent.spawn(self._read_loop)
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
        try:
            sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
            if secure:
                # gevent's SSLSocket, whatever kind of context: the stdlib one
                # would block the whole process on reads
                context = self.ssl_context or gssl.create_default_context()
                sock = gssl.SSLSocket(sock=sock, server_hostname=host, _context=context)
            self._handshake(sock, parts)
        except BaseException:
            # a refused or broken handshake must not leave the socket open
            try:
                sock.close()
            except OSError:
                pass
            raise

    def _handshake(self, sock, parts) -> None:
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        request = (
            f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {self.protocol.name}\r\n\r\n"
        )
        sock.sendall(request.encode("latin-1"))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                raise WseError(WSE_ERROR.WS_CLIENT_ERROR, {"message": "connection closed in handshake"})
            head += chunk
            if len(head) > 65536:
                raise WseError(WSE_ERROR.WS_CLIENT_ERROR, {"message": "handshake too long"})
        head, _, rest = head.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = lines[0].split(" ", 2)
        if len(status) < 2 or status[1] != "101":
            raise WseError(WSE_ERROR.WS_CLIENT_ERROR, {"message": f"server answered {lines[0]!r}"})
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
        sock.settimeout(None)
        self._sock = sock
        self._ws = Protocol(CLIENT, self.max_message_size)
        self._pending_bytes = rest

    def _write_message(self, data: Any) -> None:
        ws = self._ws
        if self._sock is None or ws is None:
            raise WseError(WSE_ERROR.CONNECTION_NOT_READY)
        if not (ws.send_text(data) if isinstance(data, str) else ws.send_binary(data)):
            raise WseError(WSE_ERROR.CONNECTION_NOT_READY)
        self._flush()

    def _flush(self) -> None:
        """Write what the protocol has to send (raises WS_CLIENT_ERROR)."""
        sock, ws = self._sock, self._ws
        if sock is None or ws is None:
            return
        for chunk in ws.data_to_send():
            try:
                if chunk:
                    sock.sendall(chunk)
                else:
                    sock.shutdown(gsocket.SHUT_WR)
            except OSError as exc:
                raise WseError(WSE_ERROR.WS_CLIENT_ERROR, {"message": str(exc)}) from None

    def _close(self, code: int, reason: str) -> None:
        if self._sock is None or self._ws is None or not self._ws.send_close(code, reason):
            return
        try:
            self._flush()
        except WseError:
            self._sock.close()
        # the reader finishes when the server answers (or the socket dies)
        gevent.spawn_later(3, self._abort)

    def _abort(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(gsocket.SHUT_RDWR)
            except OSError:
                pass

    def _read_loop(self) -> None:
        sock, ws = self._sock, self._ws
        data = self._pending_bytes
        try:
            while True:
                if data:
                    ws.receive_data(data)
                    for ev in ws.events_received():
                        if type(ev) is Message:
                            self._on_message(ev.data)
                    ws.settle()
                    if ws.failure is not None:
                        # the server broke the framing rules or sent too much: say why
                        self._emit("error", WseError(WSE_ERROR.WS_CLIENT_ERROR, {
                            "message": ws.failure.reason}))
                    try:
                        self._flush()  # pongs, the close echo, our failure's close
                    except WseError:
                        break
                    if ws.handshake_done() or ws.failure is not None:
                        break
                try:
                    data = sock.recv(65536)
                except OSError:
                    break
                if not data:
                    break
        finally:
            ws.receive_eof()
            try:
                sock.close()
            except OSError:
                pass
            self._sock = None
            if ws.failure is not None:
                code, reason = ws.failure.code, ws.failure.reason
            else:
                # what the server said (its echo when we closed first), as the JS client
                code, reason = ws.close_rcvd or (1006, "")
            self._on_closed(code, reason)

    def _on_closed(self, code: int, reason: str) -> None:
        self.close_status = (code, reason)
        for result in list(self._calls.values()):
            if not result.ready():
                result.set(("closed", (code, reason)))
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
            result = self._calls.get(stamp)
            if result is not None and not result.ready():
                result.set(("ok" if type_ == types["response"] else "err", payload))
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
        if self.status != WSE_STATUS.READY or self._sock is None:
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
