"""Put one or more WseServers beside an existing WSGI application.

The one call::

    application = wse_sync.mount(app, server, path="/ws")

returns a WSGI app that routes by exact ``PATH_INFO``:

- a WebSocket upgrade (``GET`` with ``Upgrade: websocket`` and
  ``Connection: upgrade``) on a mounted path goes to its WseServer;
- every other request goes to ``app`` untouched: the same ``environ`` and
  ``start_response`` objects, and the app's own iterable is returned as it is
  (streaming bodies, ``close()``, ``exc_info``, exceptions are the server's to
  handle as without the mount);
- a plain (not upgrade) request on a mounted path goes to ``app`` too: a path
  the app also uses is shared, upgrades to wse_sync and plain requests to the
  app. Without an app, the WseServer answers it (426) and other paths get 404.
- the WseServers' plain HTTP paths (``health_path``, ``metrics_path``,
  ``client_path``: worker/endpoints.py) go to ``app`` first; only when it
  answers 404 at once does the WseServer answer them (the app's own routes win).

Serve it with gevent's ``pywsgi.WSGIServer`` and ``wse_sync.wsgi.WseHandler``
(or gevent-websocket's ``WebSocketHandler``), or under gunicorn with
``-k wse_sync.gunicorn.Worker`` (or gevent-websocket's worker). A server that
does not do WebSocket (wsgiref, gunicorn's sync worker, Werkzeug's dev server)
still serves the app, but an upgrade on a mounted path is answered 500 with a
message naming what is required, and the error is logged.
"""
from __future__ import annotations

import logging
import weakref
from typing import Any, Callable, Dict, Iterable, List, Optional

__all__ = ["WseMount", "mount", "mounted_servers", "is_websocket_upgrade"]

log = logging.getLogger("wse_sync.mount")

# every WseMount of this process, so gunicorn hooks and WseHandler can find the
# WseServers wherever the mount sits in the app (``flask_app.wsgi_app = mount(...)``)
_MOUNTS: "weakref.WeakSet[WseMount]" = weakref.WeakSet()

NO_WEBSOCKET = (
    "wse_sync: a WebSocket upgrade for {path} reached the WSGI app without"
    " 'wsgi.websocket': this server ({software}) does not do WebSocket. wse_sync needs"
    " gevent's WSGI server with gevent-websocket's handler: gevent.pywsgi.WSGIServer(...,"
    " handler_class=wse_sync.wsgi.WseHandler) (or wse_sync.wsgi.make_wsgi_server), or gunicorn"
    " -k wse_sync.gunicorn.Worker (or -k geventwebsocket.gunicorn.workers.GeventWebSocketWorker).\n"
)


def is_websocket_upgrade(environ: dict) -> bool:
    """A request asking for a WebSocket upgrade (RFC 6455 4.2.1)."""
    if environ.get("REQUEST_METHOD") != "GET":
        return False
    if environ.get("HTTP_UPGRADE", "").lower() != "websocket":
        return False
    tokens = [t.strip().lower() for t in environ.get("HTTP_CONNECTION", "").split(",")]
    return "upgrade" in tokens


def _is_wse_server(obj: Any) -> bool:
    from ..worker.server import WseServer
    return isinstance(obj, WseServer)


def _check_path(path: Any) -> str:
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError(f"a mount path must be a string starting with '/', not {path!r}")
    return path


class WseMount:
    """A WSGI app: WebSocket upgrades on the mounted paths go to their
    WseServer, everything else to ``app`` (or 404 when there is none).

    ``servers`` maps exact paths to WseServers. See the module docstring for
    the routing rules.
    """

    def __init__(self, app: Optional[Callable] = None, servers: Optional[Dict[str, Any]] = None):
        if app is not None and not callable(app):
            raise TypeError(f"app must be a WSGI callable or None, not {type(app).__name__}")
        self.app = app
        self.servers: Dict[str, Any] = {}
        for path, server in (servers or {}).items():
            self.add(path, server)
        self._checked = False
        self._no_ws_logged = False
        _MOUNTS.add(self)

    def add(self, path: str, server: Any) -> "WseMount":
        _check_path(path)
        if not _is_wse_server(server):
            raise TypeError(f"only a WseServer can be mounted, not {type(server).__name__}")
        if path in self.servers:
            raise ValueError(f"path {path!r} is already mounted")
        own = server.config.path
        if own not in (None, path):
            raise ValueError(f"this WseServer only answers {own!r} (its path option);"
                             f" it cannot be mounted on {path!r}")
        self.servers[path] = server
        return self

    def wse_for_path(self, path: str) -> Any:
        return self.servers.get(path)

    def app_protocol(self, path: str) -> Optional[str]:
        """For gevent-websocket's stock handler: the subprotocol to select."""
        wse = self.servers.get(path)
        return wse.protocol.name if wse is not None else None

    def wse_servers(self) -> List[Any]:
        out: List[Any] = []
        for server in self.servers.values():
            if all(server is not s for s in out):
                out.append(server)
        return out

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        if not self._checked:
            self._checked = True
            _check_environment(environ)
        wse = self.servers.get(environ.get("PATH_INFO", ""))
        if wse is not None:
            if environ.get("wsgi.websocket") is not None:
                return wse(environ, start_response)
            if is_websocket_upgrade(environ):
                return self._no_websocket(environ, start_response)
            if self.app is None:
                return wse(environ, start_response)
        if self.app is not None:
            served = self._endpoint(environ.get("PATH_INFO", ""))
            if served is not None and environ.get("wsgi.websocket") is None:
                return self._app_first(served, environ, start_response)
            return self.app(environ, start_response)
        served = self._endpoint(environ.get("PATH_INFO", ""))
        if served is not None:
            return served(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]

    def _endpoint(self, path: str) -> Any:
        """The WseServer that answers ``path`` as /healthz, /metrics... or None."""
        for server in self.wse_servers():
            if server.endpoint_for(path) is not None:
                return server
        return None

    def _app_first(self, server: Any, environ: dict, start_response: Callable) -> Iterable[bytes]:
        """The app's answer, unless it is a 404 given at once: then ``server``'s."""
        held: List[Any] = []

        def hold(status: str, headers: List[Any], exc_info: Any = None) -> Callable:
            if exc_info is not None or held == ["passed"]:
                return start_response(status, headers, exc_info)
            held[:] = [status, headers]
            return _late_write

        def _late_write(data: bytes) -> None:  # the app used write(): it answers itself
            if len(held) == 2:
                status, headers = held
                held[:] = ["passed"]
                start_response(status, headers)(data)

        body = self.app(environ, hold)  # type: ignore[misc]
        if len(held) == 2 and str(held[0]).startswith("404"):
            close = getattr(body, "close", None)
            if close is not None:
                close()
            return server(environ, start_response)
        if len(held) == 2:
            status, headers = held
            held[:] = ["passed"]
            start_response(status, headers)
        else:  # it will call start_response while iterating: let it through
            held[:] = ["passed"]
        return body

    def _no_websocket(self, environ: dict, start_response: Callable) -> List[bytes]:
        text = NO_WEBSOCKET.format(path=environ.get("PATH_INFO", ""),
                                   software=environ.get("SERVER_SOFTWARE", "unknown"))
        if not self._no_ws_logged:
            self._no_ws_logged = True
            log.error("%s", text.strip())
        body = text.encode("utf-8")
        start_response("500 Internal Server Error", [
            ("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
        return [body]


def _check_environment(environ: dict) -> None:
    """Once, at the first request: say what will not work in this server."""
    software = environ.get("SERVER_SOFTWARE")
    if software is not None and not str(software).startswith("gevent/"):
        log.warning("wse_sync is mounted in a WSGI server that is not gevent's (%s): WebSocket"
                    " upgrades will be refused; use gevent.pywsgi with wse_sync.wsgi.WseHandler"
                    " or gunicorn -k wse_sync.gunicorn.Worker", software)
        return
    try:
        from gevent import monkey
        patched = monkey.is_module_patched("socket")
    except ImportError:  # pragma: no cover - gevent is a dependency
        patched = False
    if not patched:
        log.warning("gevent's monkey-patching is off in this process: a handler that blocks"
                    " (time.sleep, a database driver, an HTTP call) stalls every connection"
                    " of the worker. Call gevent.monkey.patch_all() first thing.")


def mount(app: Optional[Callable], server: Any, path: str = "/ws") -> WseMount:
    """``app`` with ``server`` answering WebSocket upgrades on ``path``.

    Give the result to the WSGI server (``application = mount(app, server)``),
    or put it in place of Flask's ``app.wsgi_app``.
    """
    return WseMount(app, {path: server})


def mounted_servers() -> List[Any]:
    """Every WseServer mounted in this process (no duplicates)."""
    out: List[Any] = []
    for m in list(_MOUNTS):
        for server in m.wse_servers():
            if all(server is not s for s in out):
                out.append(server)
    return out
