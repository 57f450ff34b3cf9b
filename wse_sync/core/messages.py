"""The broker <-> worker message schema, version 1 (pure code).

A message is a ZeroMQ multipart message::

    [b"wse1", kind, body]            or
    [b"wse1", kind, body, flag, data]

``kind`` is an ASCII word (see KINDS), ``body`` a JSON object, and the
optional ``data`` a packed wse frame carried as is (``flag`` is ``b"t"`` for
a text frame, ``b"b"`` for binary), so a broadcast is packed once by the
sender and never re-encoded. On the broker's ROUTER socket the sender's
identity frame comes first. The kinds and their bodies are listed in
docs/cluster.md.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Union

import ujson

__all__ = ["VERSION", "KINDS", "MAX_MSG_SIZE", "Message", "SchemaError", "encode", "decode",
           "table_digest",
           "batch", "split"]

VERSION = b"wse1"

# ZMQ_MAXMSGSIZE of the broker's and the workers' sockets: the largest frame
# a peer may send before it is disconnected (libzmq reads the length first).
# A frame is one packed wse message (max_message_size, 1 MiB by default) or
# one JSON body; tables, snapshots and deltas go in parts of 2,000 connections
# (~150 bytes each with a small meta), so the bound is for messages (up to
# 60 MiB) and keeps one peer from making the broker buffer gigabytes.
MAX_MSG_SIZE = 64 * 1024 * 1024

KINDS = frozenset({
    # worker -> broker
    "hello", "table", "hb", "join", "leave", "send", "bcast", "drop_cid", "conn_send",
    "conn_drop", "call", "result", "stats", "lookup", "bye", "fired",
    "stopping",
    # broker -> worker
    "snapshot", "delta", "joined", "left", "deliver", "drop", "reset", "refused", "ack",
    "resolved", "users",
})


def table_digest(conn_ids: Iterable[str]) -> List[int]:
    """A worker's table in a heartbeat: [how many connections, XOR of the
    CRC-32s of their ids] (equal for equal sets, in any order)."""
    n = x = 0
    for conn_id in conn_ids:
        n += 1
        x ^= zlib.crc32(conn_id.encode("utf-8", "surrogatepass"))
    return [n, x]


_KIND_OF = {k.encode("ascii"): k for k in KINDS}


class SchemaError(ValueError):
    """A message that does not follow this schema."""


@dataclass
class Message:
    kind: str
    body: Dict[str, Any]
    data: Optional[Union[str, bytes]] = None


def encode(kind: str, body: Optional[Dict[str, Any]] = None,
           data: Optional[Union[str, bytes]] = None) -> List[bytes]:
    frames = [VERSION, kind.encode("ascii"), ujson.dumps(body or {}).encode("utf-8")]
    if data is not None:
        if isinstance(data, str):
            frames += [b"t", data.encode("utf-8")]
        else:
            frames += [b"b", bytes(data)]
    return frames


def batch(messages: List[List[bytes]]) -> List[bytes]:
    """Several encoded messages as one ZeroMQ message (one send, one wakeup).

    ``[b"wse1", b"pack", {"n": [frames of each], "len": [bytes of each frame]},
    the frames joined]``: four ZeroMQ frames whatever the count, since each
    frame costs both sides more (in libzmq and in pyzmq's Python) than slicing
    one. A single message goes out as itself.
    """
    if len(messages) == 1:
        return messages[0]
    frames = [f for m in messages for f in m]
    head = {"n": [len(m) for m in messages], "len": [len(f) for f in frames]}
    return [VERSION, b"pack", ujson.dumps(head).encode("ascii"), b"".join(frames)]


def split(frames: List[Any]) -> List[List[Any]]:
    """The messages one ZeroMQ message carries (a batch holds several). Raises
    SchemaError. Reads ``pack`` batches and the older ``batch`` form
    (``[b"wse1", b"batch", {"n": [frames of each]}, frames...]``)."""
    if len(frames) < 3 or bytes(frames[0]) != VERSION:
        return [frames]
    kind = bytes(frames[1])
    if kind == b"pack":
        return _unpack(frames)
    if kind != b"batch":
        return [frames]
    try:
        sizes = ujson.loads(bytes(frames[2]))["n"]
    except (ValueError, KeyError, TypeError):
        raise SchemaError("batch header is not {\"n\": [sizes]}") from None
    if (not isinstance(sizes, list) or not all(isinstance(n, int) and n > 0 for n in sizes)
            or sum(sizes) != len(frames) - 3):
        raise SchemaError("batch sizes do not match its frames")
    out, pos = [], 3
    for n in sizes:
        out.append(frames[pos:pos + n])
        pos += n
    return out


def _unpack(frames: List[Any]) -> List[List[Any]]:
    if len(frames) != 4:
        raise SchemaError("a pack is 4 frames")
    try:
        head = ujson.loads(bytes(frames[2]))
        sizes, lengths = head["n"], head["len"]
    except (ValueError, KeyError, TypeError):
        raise SchemaError("pack header is not {\"n\": [...], \"len\": [...]}") from None
    blob = bytes(frames[3])
    if (not isinstance(sizes, list) or not isinstance(lengths, list)
            or not _ints(sizes) or not _ints(lengths) or (sizes and min(sizes) <= 0)
            or (lengths and min(lengths) < 0)
            or sum(sizes) != len(lengths) or sum(lengths) != len(blob)):
        raise SchemaError("pack sizes do not match its frames")
    out: List[List[Any]] = []
    pos = i = 0
    for n in sizes:
        message = []
        for size in lengths[i:i + n]:
            message.append(blob[pos:pos + size])
            pos += size
        i += n
        out.append(message)
    return out


def _ints(values: List[Any]) -> bool:
    """Every value an int (not a bool, a float or anything else)."""
    return set(map(type, values)) <= {int}


def decode(frames: List[Any]) -> Message:
    """Parse the frames after any identity frame. Raises SchemaError."""
    if frames and type(frames[0]) is not bytes:  # zmq Frames (all of one recv alike)
        frames = [bytes(f) for f in frames]
    if len(frames) not in (3, 5):
        raise SchemaError(f"expected 3 or 5 frames, got {len(frames)}")
    if frames[0] != VERSION:
        raise SchemaError(f"schema version {frames[0][:16]!r}, this side speaks {VERSION!r}")
    kind = _KIND_OF.get(frames[1])
    if kind is None:
        raise SchemaError(f"unknown kind {frames[1][:32]!r}")
    try:
        body = ujson.loads(frames[2])
    except ValueError as exc:
        raise SchemaError(f"body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise SchemaError("body is not a JSON object")
    data: Optional[Union[str, bytes]] = None
    if len(frames) == 5:
        if frames[3] == b"t":
            try:
                data = frames[4].decode("utf-8")
            except UnicodeDecodeError:
                raise SchemaError("text data is not UTF-8") from None
        elif frames[3] == b"b":
            data = frames[4]
        else:
            raise SchemaError("data flag must be b't' or b'b'")
    return Message(kind, body, data)
