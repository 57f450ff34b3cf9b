"""Calling into a wse_sync cluster from code that is not a worker.

A Flask or Django view, a management command, a cron script::

    from wse_sync import connect_cluster

    with connect_cluster("tcp://10.0.0.5:5555", broker_key="keys/broker.key",
                         secret="keys/cron.key_secret") as cluster:   # or WSE_SYNC_* variables
        cluster.send("alice", "notice", {"text": "your export is ready"})
        cluster.broadcast("maintenance", {"in": 300})
        print(sorted(cluster.clients))                        # cids online now

The handle is a member of the cluster holding no sockets (a WseServer that
refuses every connection, joined to the broker): ``send``, ``broadcast`` and
``drop_client`` go through the broker exactly as from a worker, and
``clients`` reads the cluster's user map, which the broker keeps up to date.

On a tcp:// broker the handle speaks CURVE with ``broker_key`` (the
broker's public key) and ``secret`` (its own secret key; key files or
40-character keys; default $WSE_SYNC_BROKER_KEY and $WSE_SYNC_CURVE_SECRET).
Its key may be a client key (the broker's ``--allow-clients``): enough for
everything the handle does but reading ``clients`` (WseError
``wse.server.not-allowed``), which needs an observer key (``--allow-observers``).

Where it runs:

- in a gevent-monkey-patched process (a gunicorn gevent worker, a wse_sync
  worker, a gevent script) the member lives in the caller's hub;
- anywhere else (plain scripts, threaded servers, Django's runserver) it
  lives in a background thread of its own, so heartbeats keep flowing while
  the caller blocks, and the handle may be used from any thread.

``flush()`` waits until the broker has carried out every command sent so
far; ``close()`` flushes, then leaves the cluster. Both raise
``WseError("wse.server.broker-unavailable")`` when the broker does not
confirm in time, so nothing is lost without the caller knowing.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, Dict, Hashable, NamedTuple, Optional

import gevent

from ..core.ids import make_id
from ..core.errors import WSE_ERROR, WSE_REASON, WseError

__all__ = ["connect_cluster", "ClusterHandle", "ClusterUser"]

log = logging.getLogger("wse_sync.cluster_client")


class ClusterUser(NamedTuple):
    """A connected user as the broker's map sees it."""
    cid: Hashable
    meta: Any                      # meta of the user's first connection
    conns: Dict[str, Any]          # conn_id -> that connection's meta


def _refuse_all(refuse: Callable, **_: Any) -> None:
    refuse()


def _in_gevent_process() -> bool:
    from gevent import monkey
    return monkey.is_module_patched("socket")


class _HubThread:
    """A native thread running a gevent hub; ``run(fn)`` runs fn there."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="wse-sync-cluster", daemon=True)
        self._thread.start()
        self._ready.wait()

    def _main(self) -> None:
        from gevent.event import Event
        self.hub = gevent.get_hub()
        self._stop = Event()
        # an active watcher: the hub waits for work instead of exiting
        keepalive = self.hub.loop.async_()
        keepalive.start(lambda: None)
        self._ready.set()
        self._stop.wait()
        keepalive.stop()
        keepalive.close()
        self.hub.destroy(destroy_loop=True)

    def run(self, fn: Callable, *args: Any, timeout: Optional[float] = None) -> Any:
        from concurrent.futures import Future
        from concurrent.futures import TimeoutError as FutureTimeout
        future: Future = Future()

        def job() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # carried to the caller's thread
                future.set_exception(exc)

        self.hub.loop.run_callback_threadsafe(gevent.spawn, job)
        try:
            return future.result(timeout)
        except FutureTimeout:
            raise WseError(WSE_ERROR.BROKER_UNAVAILABLE,
                           {"reason": f"no answer from the cluster thread in {timeout}s"}) from None

    def stop(self, timeout: float = 5.0) -> None:
        self.hub.loop.run_callback_threadsafe(self._stop.set)
        self._thread.join(timeout)


class ClusterHandle:
    """A blocking handle on a cluster; see the module docstring."""

    def __init__(self, endpoint: str, timeout: float = 5.0,
                 background: Optional[bool] = None, broker_key: Any = None,
                 secret: Any = None) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._keys = (broker_key, secret)
        if background is None:
            background = not _in_gevent_process()
        self._thread: Optional[_HubThread] = _HubThread() if background else None
        self._server: Any = None
        self._closed = False
        self._pid = os.getpid()
        try:
            self._run(self._join, timeout=timeout + 5)
        except BaseException:
            if self._thread is not None:
                self._thread.stop()
            raise

    # -- plumbing ----------------------------------------------------------
    def _run(self, fn: Callable, *args: Any, timeout: Optional[float] = None) -> Any:
        if self._thread is not None:
            return self._thread.run(fn, *args, timeout=timeout if timeout else self.timeout + 5)
        return fn(*args)

    def _join(self) -> None:
        from ..worker.server import WseServer
        broker_key, secret = self._keys
        server = WseServer(identify=_refuse_all, ping_interval=0, broker_key=broker_key,
                           curve_secret=secret)
        server.serves = False  # the broker sends it no 'left' to fire
        server.start(broker=self.endpoint, worker_id=f"client-{os.getpid()}-{make_id(6)}")
        self._server = server
        deadline = time.monotonic() + self.timeout
        link = server.hub.link
        # the broker's snapshot (the user map); with shards, each shard's, or
        # it is away (only its users wait: docs/cluster.md, "Shards")
        while not (link.synced or (link.state == "partial"
                                   and "joining" not in link.shard_states)):
            if link.refused is not None or time.monotonic() > deadline:
                server.shutdown(timeout=0)
                raise WseError(WSE_ERROR.BROKER_UNAVAILABLE, {
                    "endpoint": self.endpoint,
                    "reason": link.refused or f"the broker did not answer in {self.timeout}s"})
            gevent.sleep(0.01)

    def _check_open(self) -> None:
        if self._closed:
            raise WseError(WSE_ERROR.BROKER_UNAVAILABLE, {"reason": "the cluster handle is closed"})
        if self._pid != os.getpid():
            raise WseError(WSE_ERROR.BROKER_UNAVAILABLE, {
                "reason": "this handle was made before a fork (e.g. gunicorn --preload): call"
                          " connect_cluster() in the process that uses it"})

    # -- API -------------------------------------------------------------------
    def send(self, cid: Hashable, type: str, payload: Any = None) -> None:
        """Send to every connection of user ``cid``, on every worker."""
        self._check_open()
        self._run(self._server.send, cid, type, payload)

    def broadcast(self, type: str, payload: Any = None) -> None:
        """Send to every connection of every user."""
        self._check_open()
        self._run(self._server.broadcast, type, payload)

    def drop_client(self, cid: Hashable, reason: str = WSE_REASON.NO_REASON) -> None:
        """Close every connection of ``cid`` (code 1000, ``reason``)."""
        self._check_open()
        self._run(self._server.drop_client, cid, reason)

    dropClient = drop_client  # noqa: N815 - the original name

    @property
    def background(self) -> bool:
        """The handle runs its gevent hub in a thread of its own."""
        return self._thread is not None

    @property
    def clients(self) -> Dict[Hashable, ClusterUser]:
        """cid -> ClusterUser of every connected user (a snapshot). Needs an
        observer key on a CURVE broker: a client key raises WseError
        ``wse.server.not-allowed``."""
        self._check_open()
        return self._run(self._snapshot)

    def _snapshot(self) -> Dict[Hashable, ClusterUser]:
        if self._thread is None:
            gevent.sleep(0)  # let pending map updates in
        out: Dict[Hashable, ClusterUser] = {}
        directory = self._server.hub.directory
        users = directory.users() if directory is not None else {}
        for cid, conns in users.items():
            metas = {conn_id: meta for conn_id, (_worker, meta) in conns.items()}
            if metas:
                out[cid] = ClusterUser(cid, next(iter(metas.values())), metas)
        return out

    def flush(self, timeout: Optional[float] = None) -> None:
        """Wait until the broker has carried out every command sent so far."""
        self._check_open()
        self._run(self._flush, self.timeout if timeout is None else timeout,
                  timeout=(self.timeout if timeout is None else timeout) + 5)

    def _flush(self, timeout: float) -> None:
        link = self._server.hub.link
        deadline = time.monotonic() + timeout
        while link.unconfirmed:
            if time.monotonic() > deadline:
                raise WseError(WSE_ERROR.BROKER_UNAVAILABLE, {
                    "endpoint": self.endpoint, "unconfirmed": link.unconfirmed,
                    "reason": f"the broker did not confirm in {timeout}s"})
            gevent.sleep(0.02)

    def close(self, timeout: Optional[float] = None) -> None:
        """Flush, then leave the cluster. Raises BROKER_UNAVAILABLE when
        commands were not confirmed (the handle is closed all the same)."""
        if self._closed or self._pid != os.getpid():
            return
        try:
            self.flush(timeout)
        finally:
            self._closed = True
            try:
                self._run(self._leave)
            finally:
                if self._thread is not None:
                    self._thread.stop()

    def _leave(self) -> None:
        server = self._server
        server.shutdown(1000, "", 0)
        server.hub.wait_closed()  # the goodbye is out (the socket's linger)

    def __enter__(self) -> "ClusterHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<ClusterHandle {self.endpoint} {state}>"


def connect_cluster(endpoint: Optional[str] = None, timeout: float = 5.0,
                    background: Optional[bool] = None, broker_key: Any = None,
                    secret: Any = None) -> ClusterHandle:
    """Join the cluster whose broker is at ``endpoint`` (default: the
    ``WSE_SYNC_BROKER`` environment variable) and return a blocking handle.

    Waits until the broker has sent its user map (``timeout`` seconds, else
    WseError BROKER_UNAVAILABLE; at once when the broker refuses the key).
    ``background``: None picks (a thread of its own unless gevent has
    monkey-patched this process). ``broker_key`` and ``secret``: CURVE keys
    for a tcp:// broker (files or 40-character keys; default
    ``WSE_SYNC_BROKER_KEY`` and ``WSE_SYNC_CURVE_SECRET``).
    """
    endpoint = endpoint or os.environ.get("WSE_SYNC_BROKER")
    if not endpoint:
        raise ValueError("no broker endpoint: call connect_cluster('tcp://host:port') or set"
                         " WSE_SYNC_BROKER (wse-sync serve --broker / gunicorn_conf export it)")
    return ClusterHandle(endpoint, timeout=timeout, background=background,
                         broker_key=broker_key, secret=secret)
