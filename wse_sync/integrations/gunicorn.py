"""Running wse_sync under gunicorn.

``wse_sync.gunicorn.Worker`` is gevent-websocket's gunicorn worker with
``wse_sync.wsgi.WseHandler`` (exact subprotocol selection, finds a mount
anywhere in the app, e.g. in ``flask_app.wsgi_app``). At boot it checks the
setup, starts the app's WseServers so the worker joins the broker at once,
and on SIGTERM closes the WebSocket connections with 1012 (the clients come
back) instead of waiting for gunicorn's graceful timeout.

Each gunicorn worker is a wse_sync worker; with more than one they must share
ONE broker: ``gunicorn -c python:wse_sync.gunicorn_conf ...`` starts it (see
``wse_sync.gunicorn_conf``), or set ``WSE_SYNC_BROKER`` to a running broker.

``prepare_worker(worker)`` is what the worker (and ``gunicorn_conf``'s
``post_worker_init`` hook, for gevent-websocket's own worker class) runs.
"""
from __future__ import annotations

import logging
import os
import signal
from typing import Any, List

import gevent
from gunicorn.workers.ggevent import GeventPyWSGIWorker, GeventWorker

from .mounting import mounted_servers
from .wsgi import WseHandler, _router

__all__ = ["Worker", "prepare_worker", "servers_of", "WorkerSetupError"]

log = logging.getLogger("wse_sync.gunicorn")

WORKER_HINT = ("run gunicorn with -k wse_sync.gunicorn.Worker (or -k"
               " geventwebsocket.gunicorn.workers.GeventWebSocketWorker), or with"
               " -c python:wse_sync.gunicorn_conf, which sets it")


class WorkerSetupError(RuntimeError):
    """The gunicorn setup cannot run wse_sync: the message says what to change."""


def servers_of(app: Any) -> List[Any]:
    """The WseServers of a WSGI app (found through wrappers) and of every mount
    made in this process."""
    found: List[Any] = []
    router = _router(app)
    if router is not None:
        if hasattr(router, "wse_servers"):
            found += router.wse_servers()
        else:
            found.append(router)
    for server in mounted_servers():
        if all(server is not s for s in found):
            found.append(server)
    return found


def check_worker(worker: Any) -> None:
    """Raise WorkerSetupError unless ``worker`` can serve wse_sync."""
    name = f"{type(worker).__module__}.{type(worker).__name__}"
    if not isinstance(worker, GeventWorker):
        raise WorkerSetupError(
            f"wse_sync cannot run in gunicorn's {name} worker: it needs a gevent worker"
            f" (monkey-patched, with gevent-websocket's handler); {WORKER_HINT}")
    handler = getattr(worker, "wsgi_handler", None)
    from geventwebsocket.handler import WebSocketHandler
    if getattr(worker, "server_class", None) is None or not (
            isinstance(handler, type) and issubclass(handler, WebSocketHandler)):
        raise WorkerSetupError(
            f"gunicorn's {name} worker is gevent but has no WebSocket handler, so WebSocket"
            f" upgrades would never reach wse_sync; {WORKER_HINT}")
    from gevent import monkey
    if not monkey.is_module_patched("socket"):
        raise WorkerSetupError(
            f"the {name} worker did not monkey-patch the standard library: handlers that"
            f" block would stall the worker; {WORKER_HINT}")


def prepare_worker(worker: Any) -> List[Any]:
    """Check the worker, make its WseServers join the broker, and close their
    connections with 1012 on SIGTERM. Idempotent; returns the servers."""
    if getattr(worker, "_wse_prepared", None) is not None:
        return worker._wse_prepared
    try:
        check_worker(worker)
    except WorkerSetupError as exc:
        worker.log.error("%s", exc)
        raise
    servers = servers_of(getattr(worker, "wsgi", None))
    worker._wse_prepared = servers
    _share_gunicorn_log(worker)
    if not servers:
        worker.log.warning("wse_sync: no WseServer found in %s: nothing to start",
                           worker.cfg.wsgi_app or "the app")
        return servers
    shared = (os.environ.get("WSE_SYNC_BROKER") or (worker.cfg.env or {}).get("WSE_SYNC_BROKER"))
    if worker.cfg.workers > 1:
        alone = [s for s in servers if not s.config.broker and not shared]
        if alone:
            raise WorkerSetupError(
                f"{worker.cfg.workers} gunicorn workers but no shared broker: each worker would"
                " run its own and send/broadcast/clients would only reach its own connections."
                " Start gunicorn with -c python:wse_sync.gunicorn_conf (it starts a broker),"
                " or set WSE_SYNC_BROKER to a running `wse-sync broker`")
    for server in servers:
        server.start()
    _finish_closing_before_exit(worker)
    worker.log.info("wse_sync: worker %d serves %d WseServer(s), broker %s", os.getpid(),
                    len(servers), shared or servers[0].config.broker or "embedded")
    if not isinstance(worker, Worker):
        _chain_sigterm(worker, servers)
    return servers


def _share_gunicorn_log(worker: Any) -> None:
    """Without a logging setup of the app's own, wse_sync's lines go through
    gunicorn's error log (its handlers, format and level): one format."""
    ours = logging.getLogger("wse_sync")
    if ours.handlers or logging.getLogger().handlers:
        return
    error_log = getattr(worker.log, "error_log", None)
    if error_log is None or not error_log.handlers:
        return
    for handler in error_log.handlers:
        ours.addHandler(handler)
    ours.setLevel(error_log.level or logging.INFO)
    ours.propagate = False


def close_connections(worker: Any, servers: List[Any]) -> None:
    """Close every WebSocket of ``servers`` with 1012 and leave the cluster."""
    grace = max(1.0, float(getattr(worker.cfg, "graceful_timeout", 30)) - 1.0)
    closing = worker.__dict__.setdefault("_wse_closing", [])
    for server in servers:
        if server.running:
            closing.append(gevent.spawn(server.shutdown, 1012, "", grace))


def _finish_closing_before_exit(worker: Any) -> None:
    """gunicorn's worker leaves its ``run()`` once its pool is idle, and a
    WebSocket holds no pool greenlet (its reads run in the loop's callbacks):
    ``run()`` then waits for the 1012 shutdown that SIGTERM started."""
    run = worker.run

    def run_then_finish_closing() -> None:
        run()
        grace = float(getattr(worker.cfg, "graceful_timeout", 30))
        gevent.joinall(worker.__dict__.get("_wse_closing", []), timeout=grace)

    worker.run = run_then_finish_closing


def _chain_sigterm(worker: Any, servers: List[Any]) -> None:
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(sig: int, frame: Any) -> None:
        if callable(previous):
            previous(sig, frame)
        close_connections(worker, servers)

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.siginterrupt(signal.SIGTERM, False)


class Worker(GeventPyWSGIWorker):
    """gevent-websocket's gunicorn worker with wse_sync's WseHandler."""

    wsgi_handler = WseHandler

    def load_wsgi(self) -> None:
        super().load_wsgi()
        prepare_worker(self)

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        close_connections(self, getattr(self, "_wse_prepared", None) or [])
