"""A worker's table of accepted connections (pure): by conn_id and by user.

The table only files connections; it never closes or writes to them. A
connection is anything with ``conn_id``, ``cid``, ``meta`` and ``joined_at``.
"""
from __future__ import annotations

from typing import Any, Dict, Generic, Hashable, Iterator, List, Optional, Protocol, Tuple, TypeVar

__all__ = ["ConnectionTable", "Filed"]


class Filed(Protocol):
    """What the table reads of a connection."""

    @property
    def conn_id(self) -> str: ...

    @property
    def cid(self) -> Hashable: ...

    @property
    def meta(self) -> Any: ...

    @property
    def joined_at(self) -> float: ...


C = TypeVar("C", bound=Filed)


class ConnectionTable(Generic[C]):
    """conn_id -> connection, and cid -> {conn_id -> connection}."""

    def __init__(self) -> None:
        self._conns: Dict[str, C] = {}
        self._by_cid: Dict[Hashable, Dict[str, C]] = {}

    def add(self, conn: C) -> None:
        self._conns[conn.conn_id] = conn
        self._by_cid.setdefault(conn.cid, {})[conn.conn_id] = conn

    def remove(self, conn_id: str) -> Optional[C]:
        """Take a connection out; None when it was not in the table."""
        conn = self._conns.pop(conn_id, None)
        if conn is None:
            return None
        user = self._by_cid.get(conn.cid)
        if user is not None:
            user.pop(conn_id, None)
            if not user:
                del self._by_cid[conn.cid]
        return conn

    def get(self, conn_id: Optional[str]) -> Optional[C]:
        return self._conns.get(conn_id) if conn_id is not None else None

    def of_user(self, cid: Hashable) -> List[C]:
        """The user's connections here, oldest first."""
        return list(self._by_cid.get(cid, {}).values())

    def has_user(self, cid: Hashable) -> bool:
        return cid in self._by_cid

    def users(self) -> List[Hashable]:
        return list(self._by_cid)

    def all(self) -> List[C]:
        return list(self._conns.values())

    def entries(self) -> List[Tuple[str, Hashable, Any, float]]:
        """(conn_id, cid, meta, joined_at) of every connection: what the broker is told."""
        return [(c.conn_id, c.cid, c.meta, c.joined_at) for c in self._conns.values()]

    def ages(self, cid: Hashable) -> List[Tuple[str, float]]:
        """(conn_id, joined_at) of the user's connections here."""
        return [(c.conn_id, c.joined_at) for c in self._by_cid.get(cid, {}).values()]

    def __len__(self) -> int:
        return len(self._conns)

    def __contains__(self, conn_id: object) -> bool:
        return conn_id in self._conns

    def __iter__(self) -> Iterator[C]:
        return iter(list(self._conns.values()))
