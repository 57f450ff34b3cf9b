"""WseConnection: a device connected to this worker (the worker layer adds
RemoteConnection and WseIdentity, in ``worker/users.py``)."""
from __future__ import annotations

from typing import Any, Hashable, Iterable, Optional, Protocol

from ..core.errors import WSE_ERROR, WSE_REASON, WseError
from ..core.ids import make_id

from .answers import Answers
from .transport import Transport

__all__ = ["WseConnection", "ConnectionHost", "write_all", "CONNECTING", "OPEN", "CLOSING", "CLOSED"]

CONNECTING, OPEN, CLOSING, CLOSED = 0, 1, 2, 3


class ConnectionHost(Protocol):
    """What a connection reads of the server it belongs to."""

    @property
    def server(self) -> Any: ...  # the WseServer (``conn.server``)

    @property
    def protocol(self) -> Any: ...  # the codec: pack(type, payload, stamp)

    @property
    def rpc_timeout(self) -> Optional[float]: ...

    @property
    def worker_id(self) -> str: ...


class WseConnection:
    """A device connected to this worker.

    ``send``, ``call`` and ``drop`` may be used from any greenlet.
    """

    def __init__(self, host: ConnectionHost, transport: Transport, identity: Any = None,
                 meta: Optional[dict] = None, remote_addr: Optional[str] = None) -> None:
        self._host = host
        self.transport = transport
        # unique id of this connection across the cluster
        self.conn_id: str = make_id(15)
        self.identity = identity
        self.meta: dict = meta if meta is not None else {}
        self.remote_addr = remote_addr
        self.cid: Optional[Hashable] = None
        # the user (a worker.users.WseIdentity) once welcomed
        self.client: Any = None
        # 0 connecting (before the welcome), 1 open, 2 closing, 3 closed
        self.ready_state = CONNECTING
        # monotonic order of acceptance, for conn_per_user (oldest first)
        self.joined_at = 0.0
        # the calls of ``call`` waiting for the device's answer
        self._answers = Answers()

    @property
    def readyState(self) -> int:  # noqa: N802 - the original name
        return self.ready_state

    @property
    def server(self) -> Any:
        """The WseServer this connection belongs to."""
        return self._host.server

    @property
    def worker(self) -> str:
        return self._host.worker_id

    def __repr__(self) -> str:
        return f"<WseConnection {self.conn_id} cid={self.cid!r} state={self.ready_state}>"

    def send(self, type: str, payload: Any = None) -> bool:
        """Send one message to this device; False when it is not open."""
        if self.ready_state != OPEN:
            return False
        return self.transport.write_message(self._host.protocol.pack(type, payload, None))

    def call(self, rp: str, payload: Any = None, timeout: Optional[float] = None) -> Any:
        """Call procedure ``rp`` on the client and block this greenlet for the result.

        Raises WseError: RP_TIMEOUT, RP_NOT_REGISTERED, RP_EXECUTION_FAILED
        (the client's details), RP_DISCONNECT (``details["disconnected"] ==
        [code, reason]``) or CONNECTION_NOT_READY.
        """
        if self.ready_state != OPEN:
            raise WseError(WSE_ERROR.CONNECTION_NOT_READY, {"conn_id": self.conn_id})
        if timeout is None:
            timeout = self._host.rpc_timeout
        answers = self._answers
        stamp = answers.new()
        return answers.wait(stamp, rp, lambda: self.transport.write_message(
            self._host.protocol.pack(rp, payload, stamp)), timeout)

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
        """The device answered call ``stamp``; False when no call waits for it."""
        return self._answers.resolve(stamp, ok, value)

    def fail_calls(self, code: int, reason: str) -> None:
        """The connection closed: the waiting calls raise RP_DISCONNECT."""
        self._answers.fail_all(code, reason)


def write_all(conns: Iterable[WseConnection], data: Any) -> int:
    """Write one packed message to the open ones of ``conns``, framed once for
    all; how many were written to."""
    frame = None
    n = 0
    for conn in conns:
        if conn.ready_state == OPEN:
            if frame is None:
                frame = conn.transport.frame_for(data)
            conn.transport.write_raw(frame)
            n += 1
    return n
