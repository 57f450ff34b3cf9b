"""What the broker accepts from a peer (pure code): roles, and the shape and
size of each message body.

A peer's *role* comes from its CURVE key (the broker's ``--allow-workers``,
``--allow-observers`` and ``--allow-clients`` directories); links without
CURVE (ipc://, inproc://, an ``--insecure`` tcp:// broker) give every peer
the worker role.

- ``worker``: everything of the worker -> broker schema.
- ``client`` (a ``connect_cluster()`` handle): only ``CLIENT_KINDS``:
  ``send``, ``bcast``, ``drop_cid``, ``stats``, ``hb``, ``bye`` and a ``hello``
  with an empty table. It holds no connections, so it may not ``join``,
  ``leave``, ``call`` or answer a call (``result``), nor address a single
  connection (``conn_send``, ``conn_drop``): the handle's API has no use for
  them, and a client key stays unable to touch the map. Nor may it read the
  map: no ``lookup``, and its hello gets no copy (an empty snapshot, no
  deltas) whatever it asks.
- ``observer``: a client that may also read the map (``lookup``, a copy
  with its hello): a ``connect_cluster()`` handle that reads ``clients``.

``check(msg, role)`` returns None for an acceptable message, else a
``Refusal``: ``what`` names the counter (``refused.role``,
``dropped.malformed``, ``dropped.oversize``) and ``why`` says it in words.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, NamedTuple, Optional

from .messages import Message
from .metrics import BUCKETS, MAX_REPORT_KEYS

__all__ = ["ROLE_WORKER", "ROLE_CLIENT", "ROLE_OBSERVER", "ROLES", "CLIENT_KINDS",
           "OBSERVER_KINDS", "READS_MAP", "Refusal", "check",
           "MAX_ID", "MAX_CID", "MAX_TEXT", "MAX_TABLE", "MAX_LOOKUP"]

ROLE_WORKER = "worker"
ROLE_CLIENT = "client"
ROLE_OBSERVER = "observer"
ROLES = frozenset({ROLE_WORKER, ROLE_CLIENT, ROLE_OBSERVER})
CLIENT_KINDS = frozenset({"hello", "hb", "bye", "stats", "send", "bcast", "drop_cid"})
OBSERVER_KINDS = CLIENT_KINDS | {"lookup"}
# the roles whose hello gets a copy of the map (when it asks for one)
READS_MAP = frozenset({ROLE_WORKER, ROLE_OBSERVER})
# users one lookup may name
MAX_LOOKUP = 1000
# fire ids one "fired" message confirms
MAX_FIRED = 10000

# bounds on the fields (characters); beyond them a message is "oversize"
MAX_ID = 128           # conn_id (15 characters here), call ids as strings, origin
MAX_CID = 1024         # a user id given as a string
MAX_TEXT = 4096        # reasons, RPC names
MAX_TABLE = 1_000_000  # connections in one worker's table


class Refusal(NamedTuple):
    what: str
    why: str


class _Bad(Exception):
    def __init__(self, what: str, why: str) -> None:
        super().__init__(why)
        self.refusal = Refusal(what, why)


def _malformed(why: str) -> _Bad:
    return _Bad("dropped.malformed", why)


def _int(body: Dict[str, Any], key: str, required: bool = False, null: bool = False) -> None:
    if key not in body:
        if required:
            raise _malformed(f"no {key!r}")
        return
    v = body[key]
    if v is None and null:
        return
    if isinstance(v, bool) or not isinstance(v, int):
        raise _malformed(f"{key!r} is not an integer")


def _number(body: Dict[str, Any], key: str) -> None:
    v = body.get(key)
    if key not in body or v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _malformed(f"{key!r} is not a finite number")


def _text(body: Dict[str, Any], key: str, limit: int = MAX_TEXT, required: bool = False,
          null: bool = False) -> None:
    if key not in body:
        if required:
            raise _malformed(f"no {key!r}")
        return
    _str_value(body[key], key, limit, null)


def _str_value(v: Any, key: str, limit: int, null: bool = False) -> None:
    if v is None and null:
        return
    if not isinstance(v, str):
        raise _malformed(f"{key!r} is not a string")
    if len(v) > limit:
        raise _Bad("dropped.oversize", f"{key!r} is {len(v)} characters (at most {limit})")


def _conn_id(v: Any, key: str = "conn_id") -> None:
    _str_value(v, key, MAX_ID)
    if not v:
        raise _malformed(f"{key!r} is empty")


def _cid_value(v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise _malformed("'cid' is not a string or an integer")
    if isinstance(v, str) and len(v) > MAX_CID:
        raise _Bad("dropped.oversize", f"'cid' is {len(v)} characters (at most {MAX_CID})")


def _cid(body: Dict[str, Any]) -> None:
    if "cid" not in body:
        raise _malformed("no 'cid'")
    _cid_value(body["cid"])


def _bool(body: Dict[str, Any], key: str) -> None:
    if key in body and not isinstance(body[key], bool):
        raise _malformed(f"{key!r} is not a boolean")


def _request_id(body: Dict[str, Any], key: str) -> None:
    if key not in body:
        raise _malformed(f"no {key!r}")
    v = body[key]
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise _malformed(f"{key!r} is not an integer or a string")
    if isinstance(v, str) and len(v) > MAX_ID:
        raise _Bad("dropped.oversize", f"{key!r} is {len(v)} characters (at most {MAX_ID})")


def _data(msg: Message) -> None:
    if msg.data is None:
        raise _malformed("no data frame")


def _hello(msg: Message) -> None:
    body = msg.body
    _int(body, "pid")
    _int(body, "base")
    _int(body, "sync")
    _int(body, "limit", null=True)
    _int(body, "of")
    _bool(body, "serves")
    if body.get("of", 1) < 1 or (body.get("of", 1) > 1 and body.get("sync") is None):
        raise _malformed("'of' is not a positive count (or parts without 'sync')")
    _rows(body.get("table", []), "table")
    shard = body.get("shard", [0, 1])
    if (not isinstance(shard, list) or len(shard) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in shard)
            or not 0 <= shard[0] < shard[1]):
        raise _malformed("'shard' is not [index, count] with 0 <= index < count")


def _table(msg: Message) -> None:
    body = msg.body
    _int(body, "sync", required=True)
    _int(body, "part", required=True)
    _rows(body.get("rows", []), "rows")


def _rows(table: Any, key: str) -> None:
    if not isinstance(table, list):
        raise _malformed(f"'{key}' is not a list")
    if len(table) > MAX_TABLE:
        raise _Bad("dropped.oversize", f"a table of {len(table)} connections")
    for row in table:
        if not isinstance(row, list) or len(row) not in (4, 5):
            raise _malformed("a table row is not [conn_id, cid, meta, joined_at(, pending)]")
        _conn_id(row[0])
        _cid_value(row[1])
        at = row[3]
        if isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at):
            raise _malformed("a table row's joined_at is not a finite number")
        if len(row) == 5 and not isinstance(row[4], bool):
            raise _malformed("a table row's pending flag is not a boolean")


def _lookup(msg: Message) -> None:
    body = msg.body
    _request_id(body, "req")
    _bool(body, "all")
    _bool(body, "count")
    cids = body.get("cids", [])
    if not isinstance(cids, list):
        raise _malformed("'cids' is not a list")
    if len(cids) > MAX_LOOKUP:
        raise _Bad("dropped.oversize", f"a lookup of {len(cids)} users")
    for cid in cids:
        _cid_value(cid)


def _join(msg: Message) -> None:
    body = msg.body
    _request_id(body, "req")
    if "conn_id" not in body:
        raise _malformed("no 'conn_id'")
    _conn_id(body["conn_id"])
    _cid(body)
    _int(body, "limit", null=True)
    _number(body, "at")


def _leave(msg: Message) -> None:
    body = msg.body
    if "conn_id" not in body:
        raise _malformed("no 'conn_id'")
    _conn_id(body["conn_id"])
    if body.get("cid") is not None:
        _cid_value(body["cid"])
    _int(body, "code", null=True)
    _text(body, "reason", null=True)
    _text(body, "epoch", limit=MAX_ID, null=True)
    _bool(body, "quiet")
    _bool(body, "pending")


def _seq(msg: Message) -> None:
    _int(msg.body, "seq")


def _send(msg: Message) -> None:
    _cid(msg.body)
    _seq(msg)
    _data(msg)


def _bcast(msg: Message) -> None:
    _seq(msg)
    _data(msg)


def _drop_cid(msg: Message) -> None:
    _cid(msg.body)
    _text(msg.body, "reason", null=True)
    _seq(msg)


def _conn_send(msg: Message) -> None:
    _conn_id(msg.body.get("conn_id"))
    _seq(msg)
    _data(msg)


def _conn_drop(msg: Message) -> None:
    _conn_id(msg.body.get("conn_id"))
    _text(msg.body, "reason", null=True)
    _seq(msg)


def _call(msg: Message) -> None:
    body = msg.body
    _request_id(body, "call")
    _conn_id(body.get("conn_id"))
    _text(body, "rp", required=True)
    _number(body, "timeout")


def _result(msg: Message) -> None:
    body = msg.body
    _request_id(body, "call")
    _conn_id(body.get("origin"), "origin")
    _bool(body, "ok")


def _empty(msg: Message) -> None:
    return None


def _hb(msg: Message) -> None:
    """``{}``, or ``{digest: [count, xor]}`` (core.link.table_digest)."""
    digest = msg.body.get("digest")
    if digest is None:
        return
    if (not isinstance(digest, list) or len(digest) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in digest)):
        raise _malformed("'digest' is not [count, xor]")


def _fired(msg: Message) -> None:
    """``{ids, joined}``: the 'left' events a worker has started (their
    ``fire`` ids), and the connections whose user's 'joined' it has started."""
    for key in ("ids", "joined"):
        ids = msg.body.get(key, [])
        if not isinstance(ids, list) or len(ids) > MAX_FIRED:
            raise _malformed(f"{key!r} is not a list of at most {MAX_FIRED}")
        for v in ids:
            _conn_id(v, key)


def _stats(msg: Message) -> None:
    """``{}`` (``wse-sync stats``), or a worker's ``{req, full, report}`` (core.metrics)."""
    body = msg.body
    if "req" in body:
        _request_id(body, "req")
    _bool(body, "full")
    report = body.get("report")
    if report is None:
        return
    if not isinstance(report, dict):
        raise _malformed("'report' is not an object")
    for part in ("counters", "gauges"):
        values = report.get(part, {})
        if not isinstance(values, dict):
            raise _malformed(f"report {part!r} is not an object")
        if len(values) > MAX_REPORT_KEYS:
            raise _Bad("dropped.oversize", f"report {part!r} has {len(values)} keys"
                                           f" (at most {MAX_REPORT_KEYS})")
        for key in values:
            if not isinstance(key, str) or len(key) > MAX_ID:
                raise _malformed(f"report {part!r} has a bad key")
            _number(values, key)
    rpc = report.get("rpc", {})
    if not isinstance(rpc, dict):
        raise _malformed("report 'rpc' is not an object")
    counts = rpc.get("counts", [])
    if (not isinstance(counts, list) or len(counts) > len(BUCKETS) + 1
            or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts)):
        raise _malformed("report 'rpc.counts' is not a list of counts")
    _number(rpc, "sum")


_CHECKS: Dict[str, Callable[[Message], None]] = {
    "hello": _hello, "table": _table, "join": _join, "leave": _leave, "send": _send,
    "bcast": _bcast, "drop_cid": _drop_cid, "conn_send": _conn_send, "conn_drop": _conn_drop, "call": _call,
    "result": _result, "lookup": _lookup, "hb": _hb, "bye": _empty, "stopping": _empty, "stats": _stats,
    "fired": _fired,
}


def check(msg: Message, role: str) -> Optional[Refusal]:
    """None when ``msg`` may be carried out for a peer of ``role``."""
    if role not in ROLES:
        return Refusal("refused.role", f"unknown role {role!r}")
    if role != ROLE_WORKER:
        if msg.kind not in (CLIENT_KINDS if role == ROLE_CLIENT else OBSERVER_KINDS):
            return Refusal("refused.role", f"a {role} key may not send {msg.kind!r}")
        if msg.kind == "hello" and (msg.body.get("table") or msg.body.get("of", 1) != 1):
            return Refusal("refused.role", f"a {role} key's hello must have an empty table")
    fn = _CHECKS.get(msg.kind)
    if fn is None:
        return Refusal("dropped.unexpected", f"{msg.kind!r} is not a worker->broker kind")
    try:
        fn(msg)
    except _Bad as exc:
        return exc.refusal
    return None
