"""WseConnection (a device), RemoteConnection (a device on another worker)
and WseIdentity (a user)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Hashable, Mapping, Optional

import gevent
from gevent.event import AsyncResult

from ..core.errors import WSE_ERROR, WSE_REASON, WseError
from ..core.ids import make_id

if TYPE_CHECKING:  # pragma: no cover
    from .server import WseServer
    from .transport import Transport

__all__ = ["WseConnection", "RemoteConnection", "WseIdentity"]

CONNECTING, OPEN, CLOSING, CLOSED = 0, 1, 2, 3


class _Disconnected:
    """Marker put into pending calls when the connection closes."""

    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason


class WseConnection:
    """A device connected to this worker.

    ``send``, ``call`` and ``drop`` may be used from any greenlet.
    """

    def __init__(self, server: "WseServer", transport: "Transport", identity: Any = None,
                 meta: Optional[dict] = None, remote_addr: Optional[str] = None) -> None:
        self.server = server
        self.transport = transport
        # unique id of this connection across the cluster
        self.conn_id: str = make_id(15)
        self.identity = identity
        self.meta: dict = meta if meta is not None else {}
        self.remote_addr = remote_addr
        self.cid: Optional[Hashable] = None
        self.client: Optional[WseIdentity] = None
        # 0 connecting (before the welcome), 1 open, 2 closing, 3 closed
        self.ready_state = CONNECTING
        # monotonic order of acceptance, for conn_per_user (oldest first)
        self.joined_at = 0.0
        self._calls: Dict[str, AsyncResult] = {}

    @property
    def readyState(self) -> int:  # noqa: N802 - the original name
        return self.ready_state

    @property
    def worker(self) -> str:
        return self.server.worker_id

    def __repr__(self) -> str:
        return f"<WseConnection {self.conn_id} cid={self.cid!r} state={self.ready_state}>"

    def send(self, type: str, payload: Any = None) -> bool:
        """Send one message to this device; False when it is not open."""
        if self.ready_state != OPEN:
            return False
        return self.transport.write_message(self.server.protocol.pack(type, payload, None))

    def call(self, rp: str, payload: Any = None, timeout: Optional[float] = None) -> Any:
        """Call procedure ``rp`` on the client and block this greenlet for the result.

        Raises WseError: RP_TIMEOUT, RP_NOT_REGISTERED, RP_EXECUTION_FAILED
        (the client's details), RP_DISCONNECT (``details["disconnected"] ==
        [code, reason]``) or CONNECTION_NOT_READY.
        """
        if self.ready_state != OPEN:
            raise WseError(WSE_ERROR.CONNECTION_NOT_READY, {"conn_id": self.conn_id})
        if timeout is None:
            timeout = self.server.rpc_timeout
        stamp = make_id(10)
        while stamp in self._calls:  # pragma: no cover - 62**10 ids
            stamp = make_id(10)
        result = AsyncResult()
        self._calls[stamp] = result
        try:
            self.transport.write_message(self.server.protocol.pack(rp, payload, stamp))
            try:
                kind, value = result.get(timeout=timeout)
            except gevent.Timeout:
                raise WseError(WSE_ERROR.RP_TIMEOUT, {"rpc": rp, "timeout": timeout},
                               rpc=rp) from None
        finally:
            self._calls.pop(stamp, None)
        if kind == "ok":
            return value
        if kind == "closed":
            raise WseError(WSE_ERROR.RP_DISCONNECT,
                           {"rpc": rp, "disconnected": [value.code, value.reason]}, rpc=rp)
        if isinstance(value, dict) and isinstance(value.get("code"), str):
            raise WseError(value["code"], value.get("details"), rpc=rp)
        raise WseError(WSE_ERROR.RP_EXECUTION_FAILED, {"rpc": rp, "error": value}, rpc=rp)

    def drop(self, reason: str = WSE_REASON.BY_SERVER) -> None:
        """Close this connection (code 1000 with ``reason``)."""
        self.close(1000, reason)

    def close(self, code: int = 1000, reason: str = "") -> None:
        if self.ready_state in (CLOSING, CLOSED):
            return
        self.ready_state = CLOSING
        self.transport.close(code, reason)

    # -- used by the runtime --------------------------------------------
    def resolve(self, stamp: str, ok: bool, value: Any) -> bool:
        result = self._calls.get(stamp)
        if result is None or result.ready():
            return False
        result.set(("ok" if ok else "err", value))
        return True

    def fail_calls(self, code: int, reason: str) -> None:
        marker = _Disconnected(code, reason)
        for result in list(self._calls.values()):
            if not result.ready():
                result.set(("closed", marker))


class RemoteConnection:
    """A device held by another worker; operations go through the broker."""

    def __init__(self, server: "WseServer", conn_id: str, cid: Hashable, worker: str,
                 meta: Any = None) -> None:
        self.server = server
        self.conn_id = conn_id
        self.cid = cid
        self.worker = worker
        self.meta = meta if meta is not None else {}
        self.identity = None
        self.remote_addr = None
        self.ready_state = OPEN

    @property
    def readyState(self) -> int:  # noqa: N802
        return self.ready_state

    @property
    def client(self) -> Optional["WseIdentity"]:
        return self.server.clients.get(self.cid)

    def __repr__(self) -> str:
        return f"<RemoteConnection {self.conn_id} cid={self.cid!r} worker={self.worker}>"

    def send(self, type: str, payload: Any = None) -> bool:
        data = self.server.protocol.pack(type, payload, None)
        self.server.hub.remote_send(self.conn_id, self.cid, data)
        return True

    def call(self, rp: str, payload: Any = None, timeout: Optional[float] = None) -> Any:
        if timeout is None:
            timeout = self.server.rpc_timeout
        return self.server.hub.remote_call(self.conn_id, self.cid, rp, payload, timeout)

    def drop(self, reason: str = WSE_REASON.BY_SERVER) -> None:
        self.server.hub.remote_drop(self.conn_id, self.cid, reason)


class WseIdentity:
    """A user: every connection of ``cid`` on every worker."""

    def __init__(self, server: "WseServer", cid: Hashable, meta: Any = None) -> None:
        self.server = server
        self.cid = cid
        self.meta = meta if meta is not None else {}

    def __repr__(self) -> str:
        return f"<WseIdentity {self.cid!r}>"

    @property
    def conns(self) -> Mapping[str, Any]:
        """conn_id -> connection (local WseConnection or RemoteConnection)."""
        return self.server.hub.conns_of(self.cid)

    def send(self, type: str, payload: Any = None) -> None:
        self.server.send(self.cid, type, payload)

    def drop(self, reason: str = WSE_REASON.BY_SERVER) -> None:
        self.server.drop_client(self.cid, reason)
