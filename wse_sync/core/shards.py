"""Which broker shard owns a user, and how the shards' answers combine.

With K brokers (``broker`` option: K endpoints, comma-separated, the same
list in the same order on every worker), user ``cid`` belongs to shard
``shard_of(cid, K)``: that broker alone holds the user's connections and
decides its ``joined``/``left``, ``conn_per_user``, ``send`` and ``drop``.
The function depends only on the cid's JSON text (ujson's defaults: ASCII
with ``\\u`` escapes, ``/`` escaped as ``\\/``), so workers and brokers on any
Python agree on it.
"""
from __future__ import annotations

import zlib
from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple

import ujson

__all__ = ["shard_of", "home_shard", "parse_shard", "split_endpoints", "merge_users",
           "merge_stats", "Shard"]

# (this shard's index, how many shards)
Shard = Tuple[int, int]


def shard_of(cid: Hashable, shards: int) -> int:
    """The shard (0 .. shards-1) that owns user ``cid``.

    Keys equal in a dict share a shard: ``True`` is ``1`` and ``5.0`` is ``5``
    (the map is a dict on both sides)."""
    if shards <= 1:
        return 0
    if isinstance(cid, bool) or (isinstance(cid, float) and cid.is_integer()):
        cid = int(cid)
    return zlib.crc32(ujson.dumps(cid).encode("utf-8")) % shards


def home_shard(worker_id: str, shards: int) -> int:
    """The shard a worker sends its broadcasts through (one per worker keeps
    each worker's broadcasts in order, and spreads them over the shards)."""
    if shards <= 1:
        return 0
    return zlib.crc32(worker_id.encode("utf-8")) % shards


def parse_shard(text: str) -> Shard:
    """``"I/K"`` -> (I, K), with 0 <= I < K; ValueError otherwise."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"a shard is I/K (e.g. 0/4), not {text!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"shard {text!r}: I/K needs 0 <= I < K")
    return index, count


def split_endpoints(endpoint: str) -> List[str]:
    """The broker endpoints of a ``broker`` option (one per shard, in order)."""
    parts = [p.strip() for p in endpoint.split(",")]
    if not all(parts):
        raise ValueError(f"an empty endpoint in the broker list {endpoint!r}")
    if len(set(parts)) != len(parts):
        raise ValueError(f"the broker list {endpoint!r} names one endpoint twice")
    return parts


def merge_users(answers: Sequence[Optional[Dict[str, Any]]], count: bool
                ) -> Optional[Dict[str, Any]]:
    """One ``lookup`` answer from the shards' (None: that shard did not answer).

    Users live in one shard each, so counts add up and rows concatenate; the
    answer is None when no shard answered, and says ``partial`` when some did
    not; a shard that ``refused`` (this key's role) makes the answer a refusal.
    """
    got = [a for a in answers if a is not None]
    if not got:
        return None
    refused = [a["refused"] for a in got if "refused" in a]
    if refused:
        return {"refused": refused[0]}
    out: Dict[str, Any] = ({"count": sum(int(a.get("count", 0)) for a in got)} if count
                           else {"users": [row for a in got for row in a.get("users", [])]})
    if len(got) < len(answers):
        out["partial"] = True
    return out


def merge_stats(answers: Sequence[Optional[Dict[str, Any]]]) -> Optional[Dict[str, Any]]:
    """The cluster's stats from each shard's: users, connections and counters
    add up; a worker's row is the first shard's that has it; ``shards`` keeps
    each answer (None: no answer)."""
    got = [a for a in answers if a]
    if not got:
        return None
    out: Dict[str, Any] = dict(got[0])
    for key in ("users", "connections"):
        if all(isinstance(a.get(key), int) for a in got):
            out[key] = sum(a[key] for a in got)
    counters: Dict[str, float] = {}
    for a in got:
        for name, value in (a.get("counters") or {}).items():
            if isinstance(value, (int, float)):
                counters[name] = counters.get(name, 0) + value
    out["counters"] = counters
    workers: Dict[str, Any] = {}
    for a in got:
        for wid, row in (a.get("workers") or {}).items():
            if wid not in workers:
                workers[wid] = row
            elif isinstance(row, dict) and isinstance(workers[wid], dict):
                merged = dict(workers[wid])
                merged["connections"] = (merged.get("connections", 0)
                                         + row.get("connections", 0))
                workers[wid] = merged
    if workers:
        out["workers"] = workers
    reports: Dict[str, Any] = {}
    for a in got:
        for wid, report in (a.get("reports") or {}).items():
            reports.setdefault(wid, report)
    out["reports"] = reports
    out["shards"] = list(answers)
    return out
