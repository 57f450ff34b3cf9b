"""One log policy for repeated refusals and cuts (pure: logging only).

A flood of refusals must not become a flood of log lines: each kind is
logged at most once per ``interval`` seconds, saying how many happened since
the last line and in all. Counting for metrics stays with the caller.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, Optional

__all__ = ["ThinnedLog", "LOG_INTERVAL"]

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
