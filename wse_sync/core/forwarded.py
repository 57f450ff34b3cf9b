"""Who the client is and where it comes from: the socket peer, X-Forwarded-For
from a trusted proxy, the Origin allow-list. Pure."""
from __future__ import annotations

import functools
import ipaddress
from typing import FrozenSet, Iterable, Optional, Union

__all__ = ["parse_trusted", "is_trusted", "client_address", "origin_allowed", "Trusted"]

# "*" (everyone) or a set of networks
Trusted = Union[str, FrozenSet[Union[ipaddress.IPv4Network, ipaddress.IPv6Network]]]


def parse_trusted(spec: Union[str, Iterable[str], None]) -> Trusted:
    """``"127.0.0.1,::1"``, an iterable of addresses/networks, ``"*"`` or None (nobody).

    Raises ValueError naming an entry that is neither an address nor a network.
    """
    if spec is None:
        return frozenset()
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [i.strip() for i in items if i and i.strip()]
    if "*" in items:
        return "*"
    nets = set()
    for item in items:
        try:
            nets.add(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"trusted_proxies: {item!r} is not an IP address or network") from None
    return frozenset(nets)


def is_trusted(addr: Optional[str], trusted: Trusted) -> bool:
    """Is ``addr`` one of the trusted proxies?"""
    if trusted == "*":
        return True
    if not addr or not trusted:
        return False
    ip = _parse_ip(addr)
    if ip is None:
        return False
    return any(ip in net for net in trusted)


@functools.lru_cache(maxsize=4096)
def _parse_ip(addr: str) -> Optional[Union[ipaddress.IPv4Address, ipaddress.IPv6Address]]:
    """``addr`` as an address (IPv4-mapped IPv6 as IPv4; a zone dropped), None if it is
    not one. Cached: a handshake asks up to three times about the same peer, and
    parsing is most of what is_trusted costs (the addresses are immutable)."""
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip


def client_address(peer: Optional[str], forwarded_for: Optional[str], trusted: Trusted) -> Optional[str]:
    """The client's address.

    The peer itself unless it is a trusted proxy; then the right-most entry
    of ``X-Forwarded-For`` that is not itself a trusted proxy (a client can
    prepend anything, so entries left of the last untrusted one are ignored).
    """
    if not forwarded_for or not is_trusted(peer, trusted):
        return peer
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    for hop in reversed(hops):
        if not is_trusted(hop, trusted):
            return hop
    return hops[0] if hops else peer


def origin_allowed(origin: Optional[str], allowed: Union[str, Iterable[str], None]) -> bool:
    """The ``allowed_origins`` rule: None allows every request; else a request
    with an ``Origin`` header (every browser sends one) must name one of them
    ("*" allows any). Without the header (not a browser) it is allowed."""
    if allowed is None or origin is None:
        return True
    if isinstance(allowed, str):
        allowed = [a.strip() for a in allowed.split(",") if a.strip()]
    names = {a.rstrip("/").lower() for a in allowed}
    return "*" in names or origin.rstrip("/").lower() in names
