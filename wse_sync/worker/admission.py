"""Admission of upgraded sockets until their welcome: the limits on sockets
not yet welcomed and on identify calls, and the worker's one ``Refusals``
(count + thinned log) that every limit reports to.

Where each limit is checked (a new one goes where its data is, and reports
here): before the upgrade, ``integrations/wsgi.py`` (max_connections,
max_connections_per_ip, header_timeout, tls_handshake_timeout,
allowed_origins); between upgrade and welcome, this module
(max_unauthenticated, max_unauthenticated_per_ip, max_identify,
identify_queue_timeout); per socket, ``socket/transport.py`` (rate_limit,
control_rate_limit, max_send_queue; max_message_size and max_fragments are
the WebSocket protocol's own rules in ``core/websocket.py``, answered with
1009 / 1008 as protocol errors, not counted as refusals); per session,
``socket/session.py`` (handshake_timeout, auth_timeout, max_rpc_per_conn,
max_rpc_per_worker, max_channel_queue, max_channel_queue_bytes).

Every limit is read from the server's Config at the moment it is applied,
so a value given after the server was built (``configure()``, a ``wse-sync
serve`` flag, an environment variable) takes effect. Refusals are counted
(``refused.<limit>``) and logged once per interval with a count.
"""
from __future__ import annotations

import logging
from collections import Counter, deque
from typing import Any, Callable, Deque, Hashable, Optional, Set

from gevent.event import Event

from ..core.config import Config
from ..core.refusals import Refusals

__all__ = ["Admission", "IdentifySlots"]

log = logging.getLogger("wse_sync.server")


class IdentifySlots:
    """At most ``cap()`` identify / challenge calls at once; the others wait
    their turn in arrival order (the caller bounds the wait: a greenlet
    killed while it waits leaves the queue)."""

    def __init__(self, cap: Callable[[], int]) -> None:
        self._cap = cap
        self.running = 0
        self._waiting: Deque[Event] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def try_acquire(self) -> bool:
        """Take a slot if one is free and nobody waits for one."""
        if not self._waiting and self.running < max(1, self._cap()):
            self.running += 1
            return True
        return False

    def acquire(self) -> None:
        """Take a slot, waiting for one in arrival order."""
        if self.try_acquire():
            return
        turn = Event()
        self._waiting.append(turn)
        try:
            turn.wait()
        except BaseException:
            if turn.is_set():  # the slot was handed over just now: give it on
                self.release()
            else:
                self._waiting.remove(turn)
            raise

    def release(self) -> None:
        self.running -= 1
        cap = max(1, self._cap())
        while self._waiting and self.running < cap:
            self.running += 1  # (handed to the next in line, who owns it now)
            self._waiting.popleft().set()

    def __enter__(self) -> "IdentifySlots":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class Admission:
    """The sockets of one worker between upgrade and welcome."""

    def __init__(self, config: Callable[[], Config], is_trusted: Callable[[Optional[str]], bool],
                 counters: Counter) -> None:
        self._config = config
        self._is_trusted = is_trusted
        self.refusals = Refusals(counters, log)
        # sessions upgraded and not yet welcomed, and how many per address
        self._pending: Set[Hashable] = set()
        self._per_ip: Counter = Counter()
        self.identify_slots = IdentifySlots(lambda: int(config().max_identify or 0))

    @property
    def unauthenticated(self) -> int:
        return len(self._pending)

    def admit(self, key: Hashable, remote: Optional[str]) -> Optional[str]:
        """Count ``key`` as unauthenticated; else the name of the limit it hits."""
        config = self._config()
        limit = config.max_unauthenticated
        if limit and len(self._pending) >= limit:
            return "max_unauthenticated"
        # (a trusted proxy's own address is not a client's: not counted, as at the edge)
        counted = not self._is_trusted(remote)
        if counted:
            per_ip = config.max_unauthenticated_per_ip
            if per_ip and self._per_ip[remote] >= per_ip:
                return "max_unauthenticated_per_ip"
            self._per_ip[remote] += 1
        self._pending.add(key)
        return None

    def done(self, key: Hashable, remote: Optional[str]) -> None:
        """``key`` is welcomed or gone: it no longer counts."""
        if key not in self._pending:
            return
        self._pending.discard(key)
        if not self._is_trusted(remote):
            n = self._per_ip[remote] - 1
            if n > 0:
                self._per_ip[remote] = n
            else:
                del self._per_ip[remote]

    def refused(self, limit: str, remote: Optional[str], level: int = logging.WARNING) -> None:
        """Count a refusal by ``limit``; log it once per interval with the counts
        (at ``level``)."""
        self.refusals.refused(limit, remote, level)
