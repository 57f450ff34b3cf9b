"""Which link speaks for which cluster member on the broker's socket (pure code).

A worker's link sets its ZeroMQ routing identity to ``<member>#<nonce>``: the
member's id and 16 random characters drawn anew for each socket, which
nothing shows (the broker and its answers name members, never identities).
The broker routes a member's traffic to the identity that last spoke for it
with the member's key, so a peer that connects under a worker's name while
that worker's link is down receives nothing of it: it cannot guess the
nonce. An identity without a nonce (a raw peer, ``wse-sync stats``) is its
own member name.
"""
from __future__ import annotations

from typing import Container, Dict, Optional

from .ids import make_id

__all__ = ["NONCE_LEN", "link_identity", "member_of", "Routes"]

NONCE_LEN = 16
_SEP = "#"


def link_identity(member: str) -> str:
    """A fresh routing identity for a link of ``member``."""
    return member + _SEP + make_id(NONCE_LEN)


def member_of(identity: str) -> str:
    """The member an identity speaks for."""
    member, sep, nonce = identity.rpartition(_SEP)
    if sep and member and len(nonce) == NONCE_LEN and nonce.isalnum():
        return member
    return identity


class Routes:
    """member -> the routing identity its traffic goes to (at most ``most``
    members remembered; the oldest are forgotten first)."""

    def __init__(self, most: int = 100000) -> None:
        self.most = most
        self._to: Dict[str, str] = {}

    def speaks(self, identity: str, key: Optional[str], owner: Optional[str]) -> Optional[str]:
        """A message came from ``identity`` with CURVE ``key`` (None: no
        CURVE); ``owner`` is the key the member's name is bound to (None: not
        bound yet). Returns the member it speaks for, or None when the member
        belongs to another key (then nothing changes: its traffic still goes
        to its own link)."""
        member = member_of(identity)
        if key is not None and owner is not None and owner != key:
            return None
        if member != identity and self._to.get(member) != identity:
            self._to.pop(member, None)
            if len(self._to) >= self.most:
                del self._to[next(iter(self._to))]
            self._to[member] = identity
        return member

    def keep(self, *known: Container[str]) -> None:
        """Forget the routes of members in none of ``known``."""
        for member in [m for m in self._to if not any(m in k for k in known)]:
            del self._to[member]

    def identity(self, member: str) -> str:
        """Where ``member``'s traffic goes."""
        return self._to.get(member, member)

    def __len__(self) -> int:
        return len(self._to)
