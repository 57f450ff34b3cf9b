"""Random identifiers for connections and RPC stamps."""
from __future__ import annotations

import os
import string

__all__ = ["make_id"]

_ALPHABET = string.ascii_letters + string.digits
# byte -> its character (62 * 4 = 248 <= 256: bytes >= 248 are dropped, so every
# character is equally likely); one C call maps a whole random string
_TABLE = bytes(ord(_ALPHABET[b % 62]) for b in range(256))
_DROP = bytes(range(248, 256))


def make_id(n: int) -> str:
    """``n`` random characters of [A-Za-z0-9] from os.urandom."""
    out = os.urandom(n + 8).translate(_TABLE, _DROP)
    while len(out) < n:  # (more than 8 of n + 8 bytes dropped: rare)
        out += os.urandom(n).translate(_TABLE, _DROP)
    return out[:n].decode("ascii")
