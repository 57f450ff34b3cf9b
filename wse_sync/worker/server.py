"""WseServer: the public API (options, handlers, events, send / broadcast / drop).

A WseServer is a WSGI application: mount it in any gevent WSGI server that
uses gevent-websocket's handler (``wse_sync.wsgi.WseHandler`` selects the
subprotocol exactly). It joins the cluster through a broker (``broker=``
endpoint); without one, it runs an embedded broker in a greenlet of its own
process, so a lone server needs nothing else. The runtime of each process
(connections, sessions, the broker link) is its ``hub``.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from typing import Any, Callable, Hashable, Iterator, Optional

from ..core.errors import WSE_ERROR, WSE_REASON, WseError
from ..core.events import Emitter, RpcHandlers, When
from ..core.config import Config
from ..core.options import DEFAULTS
from ..core.protocol import WseJSON, check_protocol
from . import endpoints
from ..socket.stock_handler import harden
from .hub import Hub
from .users import WseIdentity

__all__ = ["WseServer", "DEFAULTS"]

# DEFAULTS: the options of WseServer(**options); core/options.py says what each
# means, and how a flag or WSE_SYNC_<OPTION> sets it.


class _Clients(Mapping):
    """Read-only view cid -> WseIdentity of every connected user of the cluster."""

    def __init__(self, server: "WseServer") -> None:
        self._server = server

    def __getitem__(self, cid: Hashable) -> WseIdentity:
        hub = self._server.hub
        if hub.has_user(cid):
            return hub.identity(cid)
        raise KeyError(cid)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._server.hub.cids())

    def __len__(self) -> int:
        return self._server.hub.count()

    def __contains__(self, cid: object) -> bool:
        return self._server.hub.has_user(cid)


# "not given" (None is a value: no limit, no timeout)
_UNSET: Any = object()


class _Options(MutableMapping):
    """``server.options``: the options read from the server's current Config;
    an assignment goes through ``configure`` (checked the same way)."""

    def __init__(self, server: "WseServer") -> None:
        self._server = server

    def __getitem__(self, name: str) -> Any:
        if name not in DEFAULTS:
            raise KeyError(name)
        return getattr(self._server.config, name)

    def __setitem__(self, name: str, value: Any) -> None:
        if name not in DEFAULTS:
            raise KeyError(name)
        self._server.configure(**{name: value})

    def __delitem__(self, name: str) -> None:
        raise TypeError("an option cannot be removed (configure() sets it back)")

    def __iter__(self) -> Iterator[str]:
        return iter(DEFAULTS)

    def __len__(self) -> int:
        return len(DEFAULTS)

    def __repr__(self) -> str:
        return repr(dict(self))


class WseServer:
    """A wse 4.x compatible server. See python-api.md for the contract."""

    def __init__(self, identify: Optional[Callable] = None, conn_per_user: Any = _UNSET,
                 rpc_timeout: Any = _UNSET, protocol: Any = None, **options: Any) -> None:
        if "connPerUser" in options:
            conn_per_user = options.pop("connPerUser")
        if "tO" in options:
            rpc_timeout = options.pop("tO")
        if not callable(identify):
            raise WseError(WSE_ERROR.IDENTIFY_HANDLER_MISSING)
        self.identify = identify
        self._protocol = check_protocol(protocol if protocol is not None else WseJSON())
        named = {k: v for k, v in (("conn_per_user", conn_per_user),
                                   ("rpc_timeout", rpc_timeout)) if v is not _UNSET}
        # every option, typed (core/config.py): replaced whole by configure()
        self.config: Config = Config.make(**named, **options)
        harden()  # gevent-websocket's stock handler, should it serve us
        self.channel = Emitter()
        self.when = When()
        self._rpcs = RpcHandlers()
        self._cra_generator: Optional[Callable] = None
        self.clients: Mapping = _Clients(self)
        # False for a cluster member without sockets (connect_cluster)
        self.serves = True
        self._hub = Hub(self)

    def configure(self, **options: Any) -> None:
        """Change options (and ``conn_per_user``, ``rpc_timeout``); bad names or
        values raise here, not per connection. Limits read the new values when
        they next apply (the listening address and the broker link: at start)."""
        self.config = self.config.with_(**options)

    @property
    def options(self) -> MutableMapping[str, Any]:
        """The options as a dict, read live from ``config``; setting one is
        ``configure(name=value)``."""
        return _Options(self)

    @property
    def protocol(self) -> Any:
        """The codec (fixed when the server is made)."""
        return self._protocol

    @property
    def conn_per_user(self) -> Optional[int]:
        return self.config.conn_per_user

    @conn_per_user.setter
    def conn_per_user(self, value: Optional[int]) -> None:
        self.configure(conn_per_user=value)

    @property
    def rpc_timeout(self) -> Optional[float]:
        return self.config.rpc_timeout

    @rpc_timeout.setter
    def rpc_timeout(self, value: Optional[float]) -> None:
        self.configure(rpc_timeout=value)

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
        config = self.__dict__.get("config")
        if config is not None and name in DEFAULTS:
            return getattr(config, name)
        raise AttributeError(name)

    # -- public API ------------------------------------------------------
    def register(self, rp: str, handler: Optional[Callable] = None):
        """Register RPC ``rp``: ``handler(conn, payload) -> result``. Decorator when
        ``handler`` is omitted. Raises RP_ALREADY_REGISTERED."""
        if handler is None:
            return lambda fn: self.register(rp, fn)
        return self._rpcs.register(rp, handler)

    def unregister(self, rp: str) -> None:
        """Raises RP_NOT_REGISTERED."""
        self._rpcs.unregister(rp)

    def use_challenge(self, generator: Callable) -> None:
        """Enable challenge-response: ``generator(identity, meta, quest, refuse)``."""
        if not callable(generator):
            raise WseError(WSE_ERROR.INVALID_CRA_GENERATOR)
        self._cra_generator = generator

    def send(self, cid: Hashable, type: str, payload: Any = None) -> None:
        """Send to every connection of user ``cid``, on every worker; unknown cid: no-op."""
        self.hub.send(cid, self.protocol.pack(type, payload, None))

    def broadcast(self, type: str, payload: Any = None) -> None:
        """Send to every connection of every user; packed once for all sockets."""
        self.hub.broadcast(self.protocol.pack(type, payload, None))

    def drop_client(self, cid: Hashable, reason: str = WSE_REASON.NO_REASON) -> None:
        """Close every connection of ``cid`` on every worker (code 1000, ``reason``)."""
        self.hub.drop_client(cid, reason)

    # -- WSGI --------------------------------------------------------------
    def app_protocol(self, path: str) -> Optional[str]:
        """For gevent-websocket's stock handler: the subprotocol to select."""
        return self.protocol.name if self.wants(path) else None

    def wants(self, path: str) -> bool:
        return self.config.path in (None, path)

    def endpoint_for(self, path: str) -> Optional[str]:
        """What this server answers on ``path`` besides WebSocket upgrades:
        "health", "metrics", "client" or None (worker/endpoints.py)."""
        return endpoints.paths_of(self).get(path)

    def __call__(self, environ: dict, start_response: Callable):
        path = environ.get("PATH_INFO", "")
        if environ.get("wsgi.websocket") is None:
            what = self.endpoint_for(path)
            if what is not None:
                return endpoints.answer(self, what, environ, start_response)
        if not self.wants(path):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        ws = environ.get("wsgi.websocket")
        if ws is None:
            start_response("426 Upgrade Required", [
                ("Content-Type", "text/plain"), ("Upgrade", "websocket"),
                ("Sec-WebSocket-Version", "13")])
            return [b"this is a WebSocket endpoint (wse protocol)\n"]
        self.start()
        self.hub.serve(environ, ws)
        return []

    @property
    def trusted(self) -> Any:
        """The ``trusted_proxies`` option, parsed."""
        return self.config.trusted

    # -- runtime -------------------------------------------------------------
    @property
    def hub(self) -> Hub:
        """This process's runtime (connections, broker link); a fork gets a new one."""
        if self._hub.pid != os.getpid():
            self._hub = Hub(self)
        return self._hub

    @property
    def worker_id(self) -> str:
        return self.hub.worker_id

    @property
    def running(self) -> bool:
        """Joined to a cluster, in this process."""
        return self._hub.running

    def endpoint(self, broker: Optional[str] = None) -> Optional[str]:
        """The broker endpoint to join: ``broker``, the ``broker`` option or
        ``WSE_SYNC_BROKER``; None means an embedded broker."""
        return broker or self.config.broker or os.environ.get("WSE_SYNC_BROKER") or None

    def start(self, broker: Optional[str] = None, worker_id: Optional[str] = None) -> None:
        """Join the cluster (idempotent). Without ``broker`` and no ``broker``
        option, start an embedded broker in this process."""
        self.hub.start(self.endpoint(broker), worker_id)

    def shutdown(self, code: int = 1012, reason: str = "", timeout: float = 5.0) -> None:
        """Close every connection with ``code`` and leave the cluster.

        Waits up to ``timeout`` seconds for the connections to finish closing
        and for running handlers (RPC, channel, events) to return.
        """
        self.hub.shutdown(code, reason, timeout)

    def rpc_handler(self, rp: str) -> Optional[Callable]:
        """The handler registered for ``rp``, or None."""
        return self._rpcs.get(rp)

    @property
    def challenge_generator(self) -> Optional[Callable]:
        """The ``use_challenge`` generator, or None."""
        return self._cra_generator
