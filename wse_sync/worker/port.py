"""WorkerPort: what the broker link may ask of its worker (the link's
``LocalPort``): the table's entries, deliveries, drops, the cluster's
'joined' and 'left', and calls to a device held here."""
from __future__ import annotations

from typing import Any, Callable, Dict, Hashable, Iterable, List, Optional

from ..core.errors import WSE_ERROR, WseError
from ..core.link import LocalEntry
from ..socket.connection import write_all
from .apps import AppCode
from .roster import Roster

__all__ = ["WorkerPort"]


class WorkerPort:
    """The worker as its broker link sees it; ``report`` gives /metrics' figures."""

    def __init__(self, roster: Roster, apps: AppCode,
                 report: Callable[[], Dict[str, Any]]) -> None:
        self._roster = roster
        self._table = roster.table
        self._apps = apps
        self._report = report

    def entries(self) -> Iterable[LocalEntry]:
        return self._table.entries()

    def deliver(self, scope: str, key: Any, data: Any) -> None:
        if scope == "all":
            conns = self._table.all()
        elif scope == "cid":
            conns = self._table.of_user(key)
        else:
            conn = self._table.get(key)
            conns = [conn] if conn is not None else []
        write_all(conns, data)

    def drop(self, conn_ids: List[str], cid: Optional[Hashable], has_cid: bool,
             reason: str) -> None:
        targets = [self._table.get(i) for i in conn_ids]
        if has_cid:
            targets += self._table.of_user(cid)
        for conn in targets:
            if conn is not None:
                conn.close(1000, reason)

    def user_left(self, cid: Hashable, code: int, reason: str, meta: Any,
                  started: Optional[Callable[[], None]] = None) -> None:
        self._apps.emit("left", self._roster.left(cid, meta), code, reason, started=started)

    def user_joined(self, cid: Hashable, meta: Any,
                    started: Optional[Callable[[], None]] = None) -> None:
        self._apps.emit("joined", self._roster.identity(cid, meta, ask=False), meta,
                        started=started)

    def forget(self, cid: Hashable) -> None:
        # (called from the link's reader: never a lookup round trip here)
        self._roster.forget(cid)

    def call_local(self, conn_id: str, rp: str, payload: Any, timeout: Optional[float]) -> Any:
        conn = self._table.get(conn_id)
        if conn is None:
            raise WseError(WSE_ERROR.CONNECTION_NOT_READY, {"conn_id": conn_id})
        return conn.call(rp, payload, timeout)

    def error(self, error: WseError) -> None:
        self._apps.emit_error(error, None)

    def metrics_report(self) -> Dict[str, Any]:
        return self._report()
