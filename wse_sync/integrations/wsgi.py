"""Serving WseServer over gevent's WSGI server with gevent-websocket.

``WseHandler`` fixes what gevent-websocket's stock handler gets wrong for
wse: the subprotocol is matched as a whole token (not a substring), a
request the application does not want (wrong path) gets a plain HTTP answer
instead of an upgrade, and a malformed upgrade gets a 4xx with a body and one
log line (the stock handler writes str bodies, a traceback on Python 3).

It also keeps the edge limits of the WseServer it serves (its options):
``header_timeout`` (408), ``max_connections`` and ``max_connections_per_ip``
(503), ``allowed_origins`` (403). ``make_wsgi_server`` adds
``tls_handshake_timeout`` and builds the TLS context once.
"""
from __future__ import annotations

import base64
from collections import Counter
import hashlib
import logging
import ssl
from typing import Any, Callable, Dict, List, Optional, Tuple

import gevent
from gevent import ssl as gssl
from gevent.pywsgi import WSGIServer
from geventwebsocket.handler import WebSocketHandler
from geventwebsocket.websocket import Stream, WebSocket

from ..core.config import Config
from ..core.forwarded import is_trusted, origin_allowed
from ..core.limits import KeyedCounter
from ..core.refusals import Refusals

__all__ = ["WseHandler", "WseWSGIServer", "make_wsgi_server", "tls_context"]

log = logging.getLogger("wse_sync.wsgi")

_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _router(app: Any, depth: int = 8):
    """The wse-aware object (a WseMount or a WseServer) serving requests for
    ``app``: ``app`` itself, or found through the ``wsgi_app`` (Flask) and
    ``app`` (most middleware) attributes of the objects wrapping it."""
    for _ in range(depth):
        if app is None:
            return None
        # (a WseServer answers the first two at once: asking it for wse_for_path
        # first would raise through its __getattr__, several times per handshake)
        if (hasattr(app, "wants") and hasattr(app, "protocol")) or hasattr(app, "wse_for_path"):
            return app
        inner = getattr(app, "wsgi_app", None)
        if inner is None or getattr(inner, "__self__", None) is app:
            inner = getattr(app, "app", None)  # Flask's own wsgi_app method: not a wrapper
        if inner is app:
            return None
        app = inner
    return None


def _find_wse(app: Any, path: str):
    """The WseServer that serves ``path`` in ``app`` (an app or a mount), or None."""
    router = _router(app)
    if router is None:
        return None
    find = getattr(router, "wse_for_path", None)
    if find is not None:
        return find(path)
    return router if router.wants(path) else None


def _server_of(app: Any) -> Any:
    """The WseServer behind ``app`` (the first one of a mount), or None."""
    router = _router(app)
    if router is not None and hasattr(router, "wse_servers"):
        servers = router.wse_servers()
        router = servers[0] if servers else None
    return router if isinstance(getattr(router, "config", None), Config) else None


_DEFAULT_CONFIG = Config()


def _config_of(app: Any) -> Config:
    """The Config of the WseServer behind ``app`` (its edge limits), read anew
    each time (``configure()`` and the serve flags replace it)."""
    server = _server_of(app)
    return server.config if server is not None else _DEFAULT_CONFIG


def _refused(app: Any, limit: str, address: Any, level: int = logging.WARNING,
             what: str = "refused a connection from %s: %s") -> None:
    """Report a refusal to the server's Refusals (counted as ``refused.<limit>``
    in its ``hub.counters``, logged thinned); without a WseServer, to the
    edge's own."""
    server = _server_of(app)
    refusals = server.hub.admission.refusals if server is not None else _edge_of(app).refusals
    refusals.refused(limit, address, level, what)


def _response(status: str, text: str, headers: Tuple[Tuple[str, str], ...] = ()) -> bytes:
    body = (text + "\n").encode("utf-8")
    head = "".join(f"{k}: {v}\r\n" for k, v in headers)
    return (f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n{head}\r\n").encode(
                "latin-1") + body


class _Edge:
    """Sockets held by one application in this process, in all and per address."""

    def __init__(self) -> None:
        self.active = 0
        # (the cap is set from the options at each connection: they may change)
        self.per_ip = KeyedCounter(0)
        # refusals of an app without a WseServer behind it
        self.refusals = Refusals(Counter(), log)


_EDGES: Dict[int, Tuple[Any, _Edge]] = {}


def _edge_of(app: Any) -> _Edge:
    entry = _EDGES.get(id(app))
    if entry is None or entry[0] is not app:
        entry = _EDGES[id(app)] = (app, _Edge())
    return entry[1]


def _nothing() -> None:
    pass


class _WebSocket(WebSocket):
    """gevent-websocket's WebSocket, which wse_sync only uses to hand the socket
    over: its ``__del__`` (a ``close()`` that builds a new class on every call
    once the socket is ours) would leave cyclic garbage per connection."""

    __slots__ = ()

    def __del__(self) -> None:
        pass


class WseHandler(WebSocketHandler):
    """gevent-websocket's handler with exact subprotocol selection."""

    # the runtime warns once when a stock handler upgraded a connection instead
    WSE_HANDLER = True

    # pywsgi reads requests through an 8 KiB buffer that a WebSocket keeps for
    # its whole life; upgrade requests are a few hundred bytes.
    RFILE_BUFFER = 1024

    def __init__(self, sock, address, server, rfile=None):
        if rfile is None:
            rfile = sock.makefile("rb", self.RFILE_BUFFER)
        super().__init__(sock, address, server, rfile)
        self._header_timer: Optional[gevent.Timeout] = None
        self._release_edge: Optional[Callable[[], None]] = None

    def handle(self):
        """Count the socket against max_connections / max_connections_per_ip (503)."""
        app = self.server.application
        config = _config_of(app)
        self.wse_config = config
        edge = _edge_of(app)
        edge.per_ip.cap = int(config.max_connections_per_ip or 0)
        ip = self.client_address[0] if isinstance(self.client_address, tuple) else ""
        counted_ip = bool(ip) and not is_trusted(ip, config.trusted)
        limit = int(config.max_connections or 0)
        if limit and edge.active >= limit:
            return self._refuse(edge, "503 Service Unavailable", "the server is full",
                                "max_connections")
        if counted_ip and not edge.per_ip.acquire(ip):
            return self._refuse(edge, "503 Service Unavailable",
                                "too many connections from your address",
                                "max_connections_per_ip")
        edge.active += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                edge.active -= 1
                if counted_ip:
                    edge.per_ip.release(ip)

        self._release_edge = release
        try:
            super().handle()
        finally:
            if self._release_edge is not None:
                release()
            self._release_edge = None

    def keep_counted(self) -> Callable[[], None]:
        """The upgraded socket outlives this handler (its reads run in the
        loop's callbacks): its place under max_connections and
        max_connections_per_ip is kept until the returned function is called."""
        release = self._release_edge or _nothing
        self._release_edge = None
        # pywsgi must not read another request from a socket that is not its own
        self.close_connection = True
        return release

    def _refuse(self, edge: _Edge, status: str, text: str, limit: str) -> None:
        _refused(self.server.application, limit, self.client_address)
        try:
            self.socket.setblocking(False)
            self.socket.send(_response(status, text, (("Retry-After", "5"),)))
        except OSError:
            pass
        try:
            self.socket.close()
        except OSError:  # pragma: no cover
            pass

    def handle_one_request(self):
        """Read the request within ``header_timeout`` (else 408 and close)."""
        seconds = self.wse_config.header_timeout if hasattr(self, "wse_config") else None
        timer = self._header_timer = gevent.Timeout(seconds) if seconds else None
        if timer is not None:
            timer.start()
        try:
            return super().handle_one_request()
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            # (the timer is the exception: its traceback holds this handler)
            exc.__traceback__ = None
            _refused(self.server.application, "header_timeout", self.client_address, logging.INFO,
                     "no complete request from %s in time: 408 (%s)")
            self.close_connection = True
            return ("408", _response("408 Request Timeout", "request timeout"))
        finally:
            if timer is not None:
                timer.close()
            self._header_timer = None

    def read_request(self, raw_requestline):
        ok = super().read_request(raw_requestline)
        if self._header_timer is not None:
            self._header_timer.close()  # the headers are in: the rest has its own limits
        return ok

    def _handle_client_error(self, ex):
        """A malformed request: one log line and a 400 with a body."""
        if isinstance(ex, (ValueError, OSError)):
            log.info("bad request from %s: %s", self.client_address, ex)
        else:  # not the client's doing
            log.exception("failed to read a request from %s", self.client_address)
        self.close_connection = True
        return ("400", _response("400 Bad Request", "bad request"))

    def upgrade_websocket(self):
        """gevent-websocket's checks, answered with bytes bodies and exact statuses."""
        env = self.environ
        if env.get("REQUEST_METHOD", "") != "GET":
            return None
        if env.get("HTTP_UPGRADE", "").lower() != "websocket":
            return None
        if "upgrade" not in env.get("HTTP_CONNECTION", "").lower():
            return None
        if self.request_version != "HTTP/1.1":
            return self._bad("400 Bad Request", "a WebSocket upgrade needs HTTP/1.1")
        if not env.get("HTTP_SEC_WEBSOCKET_VERSION"):
            return self._bad("426 Upgrade Required", "no Sec-WebSocket-Version",
                             [("Sec-WebSocket-Version", ", ".join(self.SUPPORTED_VERSIONS))])
        config = getattr(self, "wse_config", None) or _config_of(self.application)
        if not origin_allowed(env.get("HTTP_ORIGIN"), config.allowed_origins):
            _refused(self.application, "allowed_origins", env.get("HTTP_ORIGIN"), logging.INFO,
                     "refused an upgrade with Origin %s: %s")
            return self._bad("403 Forbidden", "origin not allowed")
        return self.upgrade_connection()

    def _bad(self, status: str, text: str,
             headers: Optional[List[Tuple[str, str]]] = None) -> List[bytes]:
        log.info("refused an upgrade from %s: %s", self.client_address, text)
        self.close_connection = True
        self.start_response(status, [("Content-Type", "text/plain; charset=utf-8")] +
                            (headers or []))
        return [(text + "\n").encode("utf-8")]

    def run_application(self):
        path = self.environ.get("PATH_INFO", "")
        if (self.environ.get("HTTP_UPGRADE", "").lower() == "websocket"
                and _router(self.application) is not None
                and _find_wse(self.application, path) is None):
            # not ours: answer as plain HTTP (404 from the app)
            self.environ.pop("HTTP_UPGRADE", None)
        return super().run_application()

    def upgrade_connection(self):
        version = self.environ.get("HTTP_SEC_WEBSOCKET_VERSION")
        key = self.environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip()
        if version not in self.SUPPORTED_VERSIONS:
            return self._bad("400 Bad Request", "unsupported WebSocket version",
                             [("Sec-WebSocket-Version", ", ".join(self.SUPPORTED_VERSIONS))])
        try:
            valid_key = len(base64.b64decode(key, validate=True)) == 16
        except ValueError:
            valid_key = False
        if not valid_key:
            return self._bad("400 Bad Request", "invalid Sec-WebSocket-Key")
        requested = [p.strip() for p in
                     self.environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL", "").split(",") if p.strip()]
        wse = _find_wse(self.application, self.environ.get("PATH_INFO", ""))
        protocol: Optional[str] = None
        if wse is not None and wse.protocol.name in requested:
            protocol = wse.protocol.name
        self.websocket = _WebSocket(self.environ, Stream(self), self)
        self.environ.update({"wsgi.websocket_version": version,
                             "wsgi.websocket": self.websocket})
        accept = base64.b64encode(
            hashlib.sha1((key + _GUID).encode("latin-1")).digest()).decode("latin-1")
        headers = [("Upgrade", "websocket"), ("Connection", "Upgrade"),
                   ("Sec-WebSocket-Accept", accept)]
        if protocol:
            headers.append(("Sec-WebSocket-Protocol", protocol))
        self.start_response("101 Switching Protocols", headers)

    def log_request(self):
        if "101" not in str(self.status):
            log.debug(self.format_request())


def tls_context(certfile: str, keyfile: Optional[str] = None) -> ssl.SSLContext:
    """A server TLS context (gevent's, so handshakes never block the loop):
    TLS 1.2 at least, the default ciphers."""
    ctx = gssl.SSLContext(gssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.load_cert_chain(certfile, keyfile)
    return ctx


class WseWSGIServer(WSGIServer):
    """gevent's WSGIServer with a time limit on the TLS handshake
    (``tls_handshake_timeout``: the socket is closed, one log line)."""

    handler_class = WseHandler

    def wrap_socket_and_handle(self, client_socket, address):
        seconds = _config_of(self.application).tls_handshake_timeout
        try:
            with gevent.Timeout(seconds or None):
                tls = self.wrap_socket(client_socket, **self.ssl_args)
        except gevent.Timeout:
            _refused(self.application, "tls_handshake_timeout", address, logging.INFO,
                     "no TLS handshake from %s in time: closed (%s)")
            client_socket.close()
            return None
        except (ssl.SSLError, OSError) as exc:
            log.info("TLS handshake with %s failed: %s", address, exc)
            client_socket.close()
            return None
        try:
            return self.handle(tls, address)
        finally:
            tls.close()


def make_wsgi_server(app: Any, listener: Any, **kwargs: Any) -> WSGIServer:
    """A gevent WSGIServer for ``app`` on ``listener`` ((host, port) or a socket).

    TLS: ``ssl_context=`` (a ``gevent.ssl.SSLContext``, or any SSLContext in a
    monkey-patched process), or ``certfile=`` / ``keyfile=`` (a context is
    built once, TLS 1.2 minimum); without either, the WseServer's options of
    those names are used.
    """
    kwargs.setdefault("log", None)
    kwargs.setdefault("error_log", logging.getLogger("wse_sync.http"))
    config = _config_of(app)
    context = kwargs.pop("ssl_context", None) or config.ssl_context
    certfile = kwargs.pop("certfile", None) or config.certfile
    keyfile = kwargs.pop("keyfile", None) or config.keyfile
    if context is None and certfile:
        context = tls_context(certfile, keyfile)
    if context is not None:
        kwargs["ssl_context"] = context
    return WseWSGIServer(listener, app, handler_class=WseHandler, **kwargs)
