"""Random identifiers for connections and RPC stamps."""
from __future__ import annotations

import os
import string

__all__ = ["make_id"]

_ALPHABET = string.ascii_letters + string.digits


def make_id(n: int) -> str:
    """``n`` random characters of [A-Za-z0-9] from os.urandom."""
    # 62 * 4 = 248 <= 256: bytes >= 248 are dropped so every character is equally likely
    out = ""
    while len(out) < n:
        out += "".join(_ALPHABET[b % 62] for b in os.urandom(n + 4) if b < 248)
    return out[:n]
