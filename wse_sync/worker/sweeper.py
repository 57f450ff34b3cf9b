"""The ping sweeper: pings idle connections, cuts those silent too long."""
from __future__ import annotations

import logging
import time
from typing import Callable, Iterable

import gevent

from ..core.config import Config
from ..socket.session import Session

__all__ = ["sweep"]

log = logging.getLogger("wse_sync.server")


def sweep(sessions: Callable[[], Iterable[Session]], config: Callable[[], Config]) -> None:
    """Run forever (kill the greenlet to stop): ping a connection idle for
    ping_interval; cut one silent past ping_interval + ping_timeout (1006
    ``wse.ping-timeout``). The options are read at start."""
    interval = config().ping_interval
    timeout = config().ping_timeout
    if not interval:
        return
    period = max(0.05, min(interval, timeout or interval) / 2)
    while True:
        gevent.sleep(period)
        now = time.monotonic()
        for s in list(sessions()):
            t = s.conn.transport
            idle = now - t.last_recv
            if timeout and idle > interval + timeout:
                log.info("connection %s silent for %.1fs: closing it", s.conn.conn_id, idle)
                t.abort((1006, "wse.ping-timeout"))
            elif idle >= interval and t.open:
                t.ping()
