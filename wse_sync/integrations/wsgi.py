"""Serving WseServer over gevent's WSGI server with gevent-websocket.

``WseHandler`` fixes what gevent-websocket's stock handler gets wrong for
wse: the subprotocol is matched as a whole token (not a substring), and a
request the application does not want (wrong path) gets a plain HTTP answer
instead of an upgrade.
"""
from __future__ import annotations

import base64
import hashlib
import logging
from typing import Any, Optional

from gevent.pywsgi import WSGIServer
from geventwebsocket.handler import WebSocketHandler
from geventwebsocket.websocket import Stream, WebSocket

__all__ = ["WseHandler", "make_wsgi_server"]

log = logging.getLogger("wse_sync.wsgi")

_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _router(app: Any, depth: int = 8):
    """The wse-aware object (a WseMount or a WseServer) serving requests for
    ``app``: ``app`` itself, or found through the ``wsgi_app`` (Flask) and
    ``app`` (most middleware) attributes of the objects wrapping it."""
    for _ in range(depth):
        if app is None:
            return None
        if hasattr(app, "wse_for_path") or (hasattr(app, "wants") and hasattr(app, "protocol")):
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


class WseHandler(WebSocketHandler):
    """gevent-websocket's handler with exact subprotocol selection."""

    # pywsgi reads requests through an 8 KiB buffer that a WebSocket keeps for
    # its whole life; upgrade requests are a few hundred bytes.
    RFILE_BUFFER = 1024

    def __init__(self, sock, address, server, rfile=None):
        if rfile is None:
            rfile = sock.makefile("rb", self.RFILE_BUFFER)
        super().__init__(sock, address, server, rfile)

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
            self.start_response("400 Bad Request", [
                ("Sec-WebSocket-Version", ", ".join(self.SUPPORTED_VERSIONS))])
            return [b"unsupported WebSocket version\n"]
        try:
            valid_key = len(base64.b64decode(key, validate=True)) == 16
        except ValueError:
            valid_key = False
        if not valid_key:
            self.start_response("400 Bad Request", [])
            return [b"invalid Sec-WebSocket-Key\n"]
        requested = [p.strip() for p in
                     self.environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL", "").split(",") if p.strip()]
        wse = _find_wse(self.application, self.environ.get("PATH_INFO", ""))
        protocol: Optional[str] = None
        if wse is not None and wse.protocol.name in requested:
            protocol = wse.protocol.name
        self.websocket = WebSocket(self.environ, Stream(self), self)
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


def make_wsgi_server(app: Any, listener: Any, **kwargs: Any) -> WSGIServer:
    """A gevent WSGIServer for ``app`` on ``listener`` ((host, port) or a socket)."""
    kwargs.setdefault("log", None)
    kwargs.setdefault("error_log", logging.getLogger("wse_sync.http"))
    return WSGIServer(listener, app, handler_class=WseHandler, **kwargs)
