"""Refusals: the close reasons the limits give, and one log policy for
repeated refusals and cuts (pure: logging only).

A flood of refusals must not become a flood of log lines: each kind is
logged at most once per ``interval`` seconds, saying how many happened since
the last line and in all. Counting for metrics stays with the caller.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, MutableMapping, Optional

__all__ = ["Refusals", "ThinnedLog", "LOG_INTERVAL", "SERVER_BUSY", "HANDSHAKE_TIMEOUT", "CHANNEL_QUEUE_FULL",
           "ORIGIN_NOT_ALLOWED"]

# close reasons (docs/api.md, "Limits"): 1013, retried by the JS client: the
# server is busy (a limit, an identify queue, a slow loop) ...
SERVER_BUSY = "wse.server-busy"
# ... or a socket sent no ~wse:hi within handshake_timeout
HANDSHAKE_TIMEOUT = "wse.handshake-timeout"
# 1008: too many channel messages waiting for their handler
CHANNEL_QUEUE_FULL = "wse.channel-queue-full"
# 1008: an Origin not in allowed_origins
ORIGIN_NOT_ALLOWED = "wse.origin-not-allowed"

# a collections.Counter of names
CounterLike = MutableMapping[str, int]

# seconds between two log lines of one kind
LOG_INTERVAL = 10.0


class ThinnedLog:
    """``note(kind, fmt, *args)``: count ``kind``; log ``fmt % args`` (with the
    counts appended) on the first one and then at most once per interval."""

    def __init__(self, logger: logging.Logger, level: int = logging.WARNING,
                 interval: float = LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.level = level
        self.interval = interval
        self._clock = clock
        self.total: Dict[str, int] = {}
        self._since: Dict[str, int] = {}
        self._last: Dict[str, float] = {}

    def note(self, kind: str, fmt: str, *args: Any, now: Optional[float] = None,
             level: Optional[int] = None) -> bool:
        """Count one; True when this call wrote a log line (at ``level``, else
        the one given at construction)."""
        self.total[kind] = self.total.get(kind, 0) + 1
        self._since[kind] = self._since.get(kind, 0) + 1
        now = self._clock() if now is None else now
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            return False
        self._last[kind] = now
        since, self._since[kind] = self._since[kind], 0
        level = self.level if level is None else level
        if self.logger.isEnabledFor(level):
            self.logger.log(level, fmt + " (%d since the last line, %d in all)",
                            *args, since, self.total[kind])
        return True


class Refusals:
    """Every limit's refusal goes through ``refused``: counted in ``counters``
    as ``refused.<limit>`` (``wse_limit_refusals_total`` in /metrics) and
    logged through one ThinnedLog."""

    def __init__(self, counters: CounterLike, logger: logging.Logger) -> None:
        self.counters = counters
        self._log = ThinnedLog(logger)

    def refused(self, limit: str, who: Any, level: int = logging.WARNING,
                what: str = "refused a connection from %s: %s") -> None:
        """Count one refusal by ``limit``; ``what % (who, limit)`` is the log line."""
        self.counters["refused." + limit] += 1
        if self._log.logger.isEnabledFor(level):
            self._log.note(limit, what, who, limit, level=level)
