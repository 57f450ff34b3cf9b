"""Answers: calls that wait for their answer, by stamp.

One greenlet waits per call; whoever reads the answer (a connection's reader,
the broker link's) hands it over with ``resolve``. Used by the server's
``WseConnection.call``, the Python ``WseClient.call`` and the broker link
(remote calls, joins, stats, lookups), so that registering, timing out,
dropping a late answer and failing every call at a close are written once.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Hashable, Optional, Tuple

from gevent.event import AsyncResult

from ..core.errors import WSE_ERROR, WseError
from ..core.ids import make_id

__all__ = ["Answers", "answer_error", "OK", "ERR", "CLOSED"]

# what a call ended with: an answer, an error answer, or the close of its connection
OK, ERR, CLOSED = "ok", "err", "closed"


def answer_error(rpc: str, value: Any, js_details: bool = False) -> WseError:
    """The error an error answer ``value`` raises on the caller of ``rpc``:
    the peer's code and details when it sent ``{"code": str, ...}``, else
    RP_EXECUTION_FAILED ``{"rpc", "error"}``. ``js_details``: details ``{}``
    when the peer sent none (as the JS client), else as received (None)."""
    if isinstance(value, dict) and isinstance(value.get("code"), str):
        details = value.get("details")
        if details is None and js_details:
            details = {}
        return WseError(value["code"], details, rpc=rpc)
    return WseError(WSE_ERROR.RP_EXECUTION_FAILED, {"rpc": rpc, "error": value}, rpc=rpc)


class Answers:
    """The calls waiting for an answer, by stamp (any hashable: the wire's
    string stamps, the broker link's request numbers).

    ``js_details`` gives the errors ``wait`` raises the JS client's details:
    RP_TIMEOUT ``{}``, RP_DISCONNECT ``{"disconnected": [code, reason]}`` and
    ``{}`` for an error answer without details; else (the server's)
    RP_TIMEOUT ``{"rpc", "timeout"}``, RP_DISCONNECT ``{"rpc", "disconnected"}``
    and the received details.
    """

    __slots__ = ("_waiting", "js_details")

    def __init__(self, js_details: bool = False) -> None:
        self._waiting: Dict[Hashable, AsyncResult] = {}
        self.js_details = js_details

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, stamp: Hashable) -> bool:
        return stamp in self._waiting

    def new(self) -> str:
        """A fresh 10-character stamp that no waiting call uses."""
        stamp = make_id(10)
        while stamp in self._waiting:  # pragma: no cover - 62**10 ids
            stamp = make_id(10)
        return stamp

    def resolve(self, stamp: Hashable, ok: bool, value: Any) -> bool:
        """The answer to ``stamp`` came; False when no call waits for it
        (unknown, already answered, or given up: a late answer is dropped)."""
        result = self._waiting.get(stamp)
        if result is None or result.ready():
            return False
        result.set((OK if ok else ERR, value))
        return True

    def fail_all(self, code: int, reason: str) -> None:
        """The connection closed with ``(code, reason)``: every waiting call
        ends (``wait`` raises RP_DISCONNECT)."""
        for result in list(self._waiting.values()):
            if not result.ready():
                result.set((CLOSED, (code, reason)))

    def get(self, stamp: Hashable, send: Callable[[], Any],
            timeout: Optional[float]) -> Optional[Tuple[str, Any]]:
        """Wait for ``stamp``'s answer: register it, call ``send()`` (which
        writes the request), wait up to ``timeout`` seconds (None: forever).

        Returns ``(OK | ERR | CLOSED, value)``, or None when nothing came in
        time (an answer that came in the same turn of the loop as the
        timeout is taken). The stamp is forgotten on the way out, whatever
        happens (what ``send`` raises goes through).
        """
        result = self._waiting[stamp] = AsyncResult()
        try:
            send()
            # (wait, not get: a gevent.Timeout of the caller's is not taken
            # for this call's timeout, it goes through)
            result.wait(timeout)
            if not result.ready():
                return None
            answer: Tuple[str, Any] = result.value
            return answer
        finally:
            self._waiting.pop(stamp, None)

    def wait(self, stamp: Hashable, rpc: str, send: Callable[[], Any],
             timeout: Optional[float], grace: float = 0.0) -> Any:
        """The result of call ``rpc`` (see ``get``), or raise the WseError
        its caller sees: RP_TIMEOUT after ``timeout`` (+ ``grace``) seconds,
        RP_DISCONNECT when the connection closed, or the error answered
        (``answer_error``); the error's ``rpc`` is ``rpc``."""
        js = self.js_details
        got = self.get(stamp, send, None if timeout is None else timeout + grace)
        if got is None:
            raise WseError(WSE_ERROR.RP_TIMEOUT, {} if js else {"rpc": rpc, "timeout": timeout},
                           rpc=rpc)
        kind, value = got
        if kind == OK:
            return value
        if kind == CLOSED:
            disconnected = list(value)
            raise WseError(WSE_ERROR.RP_DISCONNECT, {"disconnected": disconnected} if js
                           else {"rpc": rpc, "disconnected": disconnected}, rpc=rpc)
        raise answer_error(rpc, value, js)
