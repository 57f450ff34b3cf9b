"""RemoteConnection (a device held by another worker) and WseIdentity (a
user, every device of one cid); both act through their worker's ``UserPort``."""
from __future__ import annotations

from typing import Any, Dict, Hashable, Mapping, Optional, Protocol

from ..core.errors import WSE_REASON
from ..socket.connection import OPEN

__all__ = ["RemoteConnection", "WseIdentity", "UserPort"]


class UserPort(Protocol):
    """What users and remote connections ask of their worker (the Hub)."""

    @property
    def app(self) -> Any: ...  # the WseServer

    def send_user(self, cid: Hashable, type: str, payload: Any) -> None: ...

    def drop_user(self, cid: Hashable, reason: str) -> None: ...

    def conns_of(self, cid: Hashable) -> Dict[str, Any]: ...

    def user(self, cid: Hashable) -> Optional["WseIdentity"]: ...

    def remote_send(self, conn_id: str, cid: Hashable, type: str, payload: Any) -> None: ...

    def remote_call(self, conn_id: str, cid: Hashable, rp: str, payload: Any,
                    timeout: Optional[float]) -> Any: ...

    def remote_drop(self, conn_id: str, cid: Hashable, reason: str) -> None: ...


class RemoteConnection:
    """A device held by another worker; operations go through the broker."""

    def __init__(self, port: UserPort, conn_id: str, cid: Hashable, worker: str,
                 meta: Any = None) -> None:
        self._port = port
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
    def server(self) -> Any:
        """The WseServer."""
        return self._port.app

    @property
    def client(self) -> Optional["WseIdentity"]:
        return self._port.user(self.cid)

    def __repr__(self) -> str:
        return f"<RemoteConnection {self.conn_id} cid={self.cid!r} worker={self.worker}>"

    def send(self, type: str, payload: Any = None) -> bool:
        self._port.remote_send(self.conn_id, self.cid, type, payload)
        return True

    def call(self, rp: str, payload: Any = None, timeout: Optional[float] = None) -> Any:
        """Like WseConnection.call, through the broker and the holding worker."""
        return self._port.remote_call(self.conn_id, self.cid, rp, payload, timeout)

    def drop(self, reason: str = WSE_REASON.BY_SERVER) -> None:
        self._port.remote_drop(self.conn_id, self.cid, reason)


class WseIdentity:
    """A user: every connection of ``cid`` on every worker."""

    def __init__(self, port: UserPort, cid: Hashable, meta: Any = None) -> None:
        self._port = port
        self.cid = cid
        self.meta = meta if meta is not None else {}

    def __repr__(self) -> str:
        return f"<WseIdentity {self.cid!r}>"

    @property
    def server(self) -> Any:
        """The WseServer."""
        return self._port.app

    @property
    def conns(self) -> Mapping[str, Any]:
        """conn_id -> connection (local WseConnection or RemoteConnection)."""
        return self._port.conns_of(self.cid)

    def send(self, type: str, payload: Any = None) -> None:
        self._port.send_user(self.cid, type, payload)

    def drop(self, reason: str = WSE_REASON.BY_SERVER) -> None:
        self._port.drop_user(self.cid, reason)
