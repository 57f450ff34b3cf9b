"""Counting rules for the limits a client can run into (pure)."""
from __future__ import annotations

from typing import Dict, Hashable, Optional, Tuple

__all__ = ["TokenBucket", "KeyedCounter", "parse_rate"]


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; starts full."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def take(self, n: float, now: float) -> bool:
        """Spend ``n`` tokens; False (and nothing spent) when there are not enough."""
        tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if tokens < n:
            self.tokens = tokens
            return False
        self.tokens = tokens - n
        return True


def parse_rate(value: object) -> Optional[Tuple[float, float]]:
    """A ``rate_limit`` option: None/0 (off), a number (per second, burst twice
    that) or a (rate, burst) pair."""
    if value is None or value == 0:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        rate = float(value)
        return rate, max(1.0, 2 * rate)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        rate, burst = float(value[0]), float(value[1])
        if rate > 0 and burst >= 1:
            return rate, burst
    raise ValueError(f"rate_limit must be None, a rate or (rate, burst), not {value!r}")


class KeyedCounter:
    """How many of something each key holds, with a cap per key (0: no cap)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._n: Dict[Hashable, int] = {}

    def acquire(self, key: Hashable) -> bool:
        n = self._n.get(key, 0)
        if self.cap and n >= self.cap:
            return False
        self._n[key] = n + 1
        return True

    def release(self, key: Hashable) -> None:
        n = self._n.get(key, 0) - 1
        if n > 0:
            self._n[key] = n
        else:
            self._n.pop(key, None)

    def __getitem__(self, key: Hashable) -> int:
        return self._n.get(key, 0)

    def total(self) -> int:
        return sum(self._n.values())
