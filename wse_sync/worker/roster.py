"""Who is connected, as one worker answers it: its own connection table, the
cluster's directory, and one WseIdentity object per user while it matters."""
from __future__ import annotations

from typing import Any, Callable, Dict, Hashable, List, Optional

from ..core.table import ConnectionTable
from ..socket.connection import WseConnection
from .directory import Directory
from .users import RemoteConnection, UserPort, WseIdentity

__all__ = ["Roster", "GONE_MAX"]

# identities kept for a 'left' after the user's last local connection closed
GONE_MAX = 10000


class Roster:
    """This worker's users and, through ``directory`` (None before the worker
    joins a cluster), everyone else's."""

    def __init__(self, port: UserPort, worker_id: Callable[[], str]) -> None:
        self._port = port
        self._worker_id = worker_id
        self.table: ConnectionTable[WseConnection] = ConnectionTable()
        self.directory: Optional[Directory] = None
        self._identities: Dict[Hashable, WseIdentity] = {}
        # identities of users whose last connection here closed, kept for the
        # 'left' that may come (bounded)
        self._gone: Dict[Hashable, WseIdentity] = {}

    def identity(self, cid: Hashable, meta: Any = None, ask: bool = True) -> WseIdentity:
        """The user's WseIdentity: one object per user while they are connected
        here (or followed by the directory). Without ``meta``, it comes from the
        directory (a broker round trip only if ``ask``)."""
        ident = self._identities.get(cid)
        if ident is None:
            directory = self.directory
            if meta is None and directory is not None:
                meta = directory.meta_of(cid, ask)
            ident = WseIdentity(self._port, cid, meta)
            if self.table.has_user(cid) or directory is None or directory.follows(cid):
                self._identities[cid] = ident
        return ident

    def added(self, conn: WseConnection) -> None:
        """``conn`` was accepted here."""
        self.table.add(conn)
        if self.directory is not None:
            self.directory.changed(conn.cid)

    def removed(self, conn: WseConnection) -> bool:
        """``conn`` closed; False if it had never been accepted."""
        if self.table.remove(conn.conn_id) is None:
            return False
        cid = conn.cid
        directory = self.directory
        if directory is not None:
            directory.changed(cid)
            if not self.table.has_user(cid) and not directory.follows(cid):
                ident = self._identities.pop(cid, None)
                if ident is not None:
                    self._gone[cid] = ident
                    if len(self._gone) > GONE_MAX:
                        del self._gone[next(iter(self._gone))]
        return True

    def left(self, cid: Hashable, meta: Any) -> WseIdentity:
        """The identity for a 'left' of ``cid``, which is then forgotten."""
        ident = (self._identities.get(cid) or self._gone.pop(cid, None)
                 or WseIdentity(self._port, cid, meta))
        self.forget(cid)
        return ident

    def forget(self, cid: Hashable) -> None:
        """Drop the user's identity unless they are still connected here or
        followed by the directory (never a broker round trip)."""
        directory = self.directory
        if self.table.has_user(cid) or (directory is not None and directory.follows(cid)):
            return
        self._identities.pop(cid, None)

    def cids(self) -> List[Hashable]:
        """Every connected user of the cluster (local ones first). Without a
        replica the broker is asked, and this worker's users are read after
        its answer: a local user who joined meanwhile is in the list."""
        remote = self.directory.cids() if self.directory is not None else []
        cids = dict.fromkeys(self.table.users())
        cids.update(dict.fromkeys(remote))
        return list(cids)

    def count(self) -> int:
        """How many users the cluster has (at least this worker's)."""
        local = self.table.users()
        return len(local) if self.directory is None else self.directory.count(local)

    def has_user(self, cid: Hashable) -> bool:
        return self.table.has_user(cid) or (self.directory is not None
                                            and self.directory.has(cid))

    def conns_of(self, cid: Hashable) -> Dict[str, Any]:
        """conn_id -> WseConnection (here) or RemoteConnection (elsewhere)."""
        conns: Dict[str, Any] = {c.conn_id: c for c in self.table.of_user(cid)}
        if self.directory is not None:
            me = self._worker_id()
            for conn_id, (worker, meta) in self.directory.connections(cid).items():
                if conn_id not in conns and worker != me:
                    conns[conn_id] = RemoteConnection(self._port, conn_id, cid, worker, meta)
        return conns
