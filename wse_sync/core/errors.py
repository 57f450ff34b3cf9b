"""Errors and constants of the wse protocol.

Exception tree::

    Exception
     └── WseError(code, details)   every error wse_sync reports or raises

The string values of WSE_REASON, WSE_ERROR and WSE_STATUS are part of the
wire protocol and must not change.
"""
from __future__ import annotations

import traceback
from typing import Any, Dict, Iterator, Optional

__all__ = ["WseError", "WSE_REASON", "WSE_ERROR", "WSE_STATUS", "rpc_error_payload"]


class _Constants:
    """A namespace of string constants that also iterates over its values."""

    def __init__(self, **values: str) -> None:
        self.__dict__.update(values)

    def __iter__(self) -> Iterator[str]:
        return iter(self.__dict__.values())

    def __repr__(self) -> str:
        return f"<constants {sorted(self.__dict__)}>"


# The constant sets below declare their names for type checkers only: the
# annotations create no class attributes, the values live on the instance.
class _Reasons(_Constants):
    NO_REASON: str
    CLIENTS_CONCURRENCY: str
    NOT_AUTHORIZED: str
    PROTOCOL_ERR: str
    BY_CLIENT: str
    BY_SERVER: str


class _Errors(_Constants):
    INVALID_CRA_HANDLER: str
    RP_TIMEOUT: str
    RP_DISCONNECT: str
    CLIENT_ALREADY_CONNECTED: str
    WS_CLIENT_ERROR: str
    NOT_AUTHORIZED: str
    CONNECTION_NOT_READY: str
    NO_CLIENT_CONNECTION: str
    IDENTIFY_HANDLER_MISSING: str
    INVALID_CRA_GENERATOR: str
    RP_EXECUTION_FAILED: str
    RP_NOT_REGISTERED: str
    RP_ALREADY_REGISTERED: str
    PROTOCOL_VIOLATION: str
    CONNECTION_ERROR: str
    MESSAGE_PROCESSING_ERROR: str
    BROKER_UNAVAILABLE: str
    BROKER_BUSY: str
    RP_TOO_MANY: str
    NOT_ALLOWED: str


class _Statuses(_Constants):
    IDLE: str
    CONNECTING: str
    RE_CONNECTING: str
    READY: str
    OFFLINE: str


WSE_REASON = _Reasons(
    NO_REASON="",
    CLIENTS_CONCURRENCY="wse.clients-concurrency",
    NOT_AUTHORIZED="wse.not-authorized",
    PROTOCOL_ERR="wse.protocol-error",
    BY_CLIENT="wse.by-client",
    BY_SERVER="wse.by-server",
)

WSE_ERROR = _Errors(
    INVALID_CRA_HANDLER="wse.client.invalid-cra-handler",
    RP_TIMEOUT="wse.client.rp.timeout",
    RP_DISCONNECT="wse.client.rp.disconnect",
    CLIENT_ALREADY_CONNECTED="wse.client.already-connected",
    WS_CLIENT_ERROR="wse.client.ws-error",
    NOT_AUTHORIZED="wse.not-authorized",
    CONNECTION_NOT_READY="wse.client.not-ready",
    NO_CLIENT_CONNECTION="wse.server.client.connection-missing",
    IDENTIFY_HANDLER_MISSING="wse.server.auth.identify-handler-missing",
    INVALID_CRA_GENERATOR="wse.server.auth.invalid-cra-generator",
    RP_EXECUTION_FAILED="wse.server.rp.failed",
    RP_NOT_REGISTERED="wse.server.rp.not-registered",
    RP_ALREADY_REGISTERED="wse.server.rp.already-registered",
    PROTOCOL_VIOLATION="wse.server.protocol-violation",
    CONNECTION_ERROR="wse.server.connection-error",
    MESSAGE_PROCESSING_ERROR="wse.server.msg-processing-error",
    # added by wse_sync (the reference has no cluster)
    BROKER_UNAVAILABLE="wse.server.broker-unavailable",
    # wse_sync's: the broker runs but is behind (its acks lag): the sender
    # waited up to broker_timeout for room in the outbox; try again later
    BROKER_BUSY="wse.server.broker-busy",
    # wse_sync's own: more RPCs in flight than max_rpc_per_conn / max_rpc_per_worker
    RP_TOO_MANY="wse.server.rp.too-many-calls",
    # wse_sync's own: the broker refused what this key's role may not do (a
    # client key reading the user map: an observer key may)
    NOT_ALLOWED="wse.server.not-allowed",
)

WSE_STATUS = _Statuses(
    IDLE="IDLE",
    CONNECTING="CONNECTING",
    RE_CONNECTING="RE_CONNECTING",
    READY="READY",
    OFFLINE="OFFLINE",
)


class WseError(Exception):
    """An error with a protocol ``code`` string and JSON-able ``details``.

    ``rpc`` (keyword only) names the procedure when the error answers a call
    made here: ``call()`` sets it on what it raises, so that the message
    names the procedure even when the other side sent no details (the wire
    answer to an unknown procedure is ``{"code": "wse.server.rp.not-registered"}``
    alone, and ``details`` stay the received ones, protocol.md). It is not
    part of ``to_json()``, so nothing of it goes on the wire.
    """

    def __init__(self, code: str, details: Optional[Any] = None, *,
                 rpc: Optional[str] = None) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details
        self.rpc = rpc

    def to_json(self) -> Dict[str, Any]:
        return {"code": self.code, "details": self.details}

    def __str__(self) -> str:
        text = self.code if self.rpc is None else f"{self.code} (calling {self.rpc!r})"
        if self.details is None or (self.rpc is not None and self.details == {}):
            return text
        return f"{text} {self.details!r}"

    def __repr__(self) -> str:
        if self.rpc is None:
            return f"WseError({self.code!r}, {self.details!r})"
        return f"WseError({self.code!r}, {self.details!r}, rpc={self.rpc!r})"


def rpc_error_payload(exc: BaseException, rp: str, payload: Any,
                      traceback_in_stack: bool = False) -> Dict[str, Any]:
    """The ``~wse:response-err`` payload for an RPC handler that raised ``exc``.

    Pure: follows the table "RPC error objects" of protocol.md. ``origin.stack``
    is the one line ``"<name>: <message>"`` unless ``traceback_in_stack`` asks
    for the full traceback (it names the server's files and source lines).
    """
    if isinstance(exc, WseError):
        details = exc.details
        if details is None:
            details = {}
        if isinstance(details, dict):
            details = dict(details)
            details.setdefault("rpc", rp)
            details.setdefault("payload", payload)
        return {"code": exc.code, "details": details}
    if traceback_in_stack:
        stack = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    else:
        stack = f"{type(exc).__name__}: {exc}"
    return {
        "code": WSE_ERROR.RP_EXECUTION_FAILED,
        "message": str(exc),
        "details": {
            "origin": {"name": type(exc).__name__, "message": str(exc), "stack": stack},
            "rpc": rp,
            "payload": payload,
        },
    }
