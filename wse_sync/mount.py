"""Put one or more WseServers beside an existing WSGI application."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

__all__ = ["WseMount", "mount"]


class WseMount:
    """A WSGI app: WebSocket requests on the mounted paths go to their
    WseServer, everything else to ``app`` (or 404 when there is none).

    Serve it with ``wse_sync.wsgi.WseHandler`` (or gevent-websocket's handler).
    """

    def __init__(self, app: Optional[Callable] = None, servers: Optional[Dict[str, Any]] = None):
        self.app = app
        self.servers: Dict[str, Any] = dict(servers or {})

    def add(self, path: str, server: Any) -> "WseMount":
        if path in self.servers:
            raise ValueError(f"path {path!r} is already mounted")
        self.servers[path] = server
        return self

    def wse_for_path(self, path: str) -> Any:
        return self.servers.get(path)

    def app_protocol(self, path: str) -> Optional[str]:
        wse = self.servers.get(path)
        return wse.protocol.name if wse is not None else None

    def __call__(self, environ: dict, start_response: Callable):
        wse = self.servers.get(environ.get("PATH_INFO", ""))
        if wse is not None and (environ.get("wsgi.websocket") is not None or self.app is None):
            return wse(environ, start_response)
        if wse is not None and environ.get("HTTP_UPGRADE", "").lower() == "websocket":
            return wse(environ, start_response)
        if self.app is not None:
            return self.app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]


def mount(app: Optional[Callable], server: Any, path: str = "/ws") -> WseMount:
    """``app`` with ``server`` answering WebSocket upgrades on ``path``."""
    return WseMount(app, {path: server})
