"""Running application code: ``when`` events, RPC and channel handlers, each
in a greenlet of its own, counted so that a stop can wait for them."""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import gevent

from ..core.errors import WSE_ERROR, WseError
from ..core.events import Emitter
from ..socket import runner
from ..socket.connection import WseConnection

__all__ = ["AppCode"]

log = logging.getLogger("wse_sync.server")


class AppCode:
    """Fires the app's ``when`` events and runs its handlers for one worker."""

    def __init__(self, events: Emitter) -> None:
        self._events = events
        # handlers running now (RPC, channel, event), for a graceful stop
        self.busy = 0
        # a stop gave up waiting for them: what has not started, never will
        self.abandoned = False

    def emit(self, name: str, *args: Any, started: Optional[Callable[[], None]] = None) -> None:
        """Fire a ``when`` event: each handler in a greenlet of its own.
        ``started`` is called once, when the first handler starts (at once
        without a handler)."""
        handlers = self._events.handlers(name)
        if started is not None and not handlers:
            started()
        for handler in handlers:
            self.spawn(self._run_event, name, handler, args, started)
            started = None

    def emit_error(self, error: WseError, conn: Optional[Any] = None,
                   exc: Optional[BaseException] = None) -> None:
        """Fire ``when.error``; without a handler, log it: at ERROR with its
        traceback when application code raised ``exc``, else at WARNING."""
        if self._events.has("error"):
            self.emit("error", error, conn)
        elif exc is not None:
            log.error("%s (connection %s)", _describe(error), getattr(conn, "conn_id", None),
                      exc_info=(type(exc), exc, exc.__traceback__))
        else:
            log.warning("%s (connection %s)", _describe(error), getattr(conn, "conn_id", None))

    def spawn(self, fn: Callable, *args: Any) -> None:
        """Run application code in a greenlet of its own (counted for a graceful
        stop from now on, not only once it starts)."""
        self.busy += 1
        runner.spawn(self._counted, fn, args)

    def _counted(self, fn: Callable, args: tuple) -> None:
        try:
            if not self.abandoned:
                fn(*args)
        finally:
            self.busy -= 1

    def _run_event(self, name: str, handler: Callable, args: tuple,
                   started: Optional[Callable[[], None]] = None) -> None:
        if started is not None:
            started()
            # one turn of the loop: the confirmation goes out with this turn's
            # batch before the handler acts (a worker killed while the handler
            # runs has its event counted as fired, not fired again elsewhere)
            gevent.sleep(0)
        try:
            handler(*args)
        except Exception as exc:
            conn = args[0] if args and isinstance(args[0], WseConnection) else None
            if name == "error":
                log.exception("the error handler raised %s: %s", type(exc).__name__, exc)
            else:
                self.emit_error(WseError(WSE_ERROR.MESSAGE_PROCESSING_ERROR, {
                    "event": name, "exception": exc, "message": str(exc)}), conn, exc)


def _describe(error: WseError) -> str:
    """One line for the log: the code and the details that say what happened."""
    details = error.details
    if not isinstance(details, dict):
        return str(error)
    shown = {k: v for k, v in details.items() if k not in ("exception", "payload", "origin")}
    return f"{error.code} {shown}" if shown else error.code
