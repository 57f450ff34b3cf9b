"""Run short tasks in reusable greenlets.

Creating a greenlet costs far more than switching to one (measured here:
~27 µs to create and start one, ~1 µs for a switch pair), and wse_sync
starts one per RPC, per channel batch and per event handler. ``spawn`` hands
the task to a parked greenlet when one is idle, else creates one; a task
may block (it runs under gevent's hub like any greenlet). Tasks must handle
their own exceptions: one that escapes is logged and the greenlet is reused.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, List

import greenlet
from gevent import get_hub

__all__ = ["spawn"]

log = logging.getLogger("wse_sync.runner")

# parked greenlets kept per process (and per hub). Each keeps the Python
# frame stack it grew while it ran (tens of KB): a larger pool fills up over
# minutes of churn and reads as a memory ratchet. 64 covers a steady load of
# 64 handlers at once; a burst beyond creates greenlets (~27 us each).
MAX_IDLE = 64

_idle: List[greenlet.greenlet] = []
_hub = None


def spawn(fn: Callable, *args: Any) -> None:
    """Run ``fn(*args)`` soon, in a greenlet of its own (not now, not in the caller)."""
    global _hub
    hub = get_hub()
    if hub is not _hub:  # a new process or thread: greenlets of another hub are unusable
        _hub = hub
        del _idle[:]
    g = _idle.pop() if _idle else greenlet.greenlet(_work, parent=hub)
    hub.loop.run_callback(g.switch, fn, args)


def _work(fn: Callable, args: tuple) -> None:
    while True:
        try:
            fn(*args)
        except greenlet.GreenletExit:
            return
        except BaseException:  # noqa: B036 - a task must not kill the worker greenlet
            log.exception("a task raised")
        hub = get_hub()
        if len(_idle) >= MAX_IDLE or hub is not _hub:
            return
        _idle.append(greenlet.getcurrent())
        fn, args = hub.switch()
