"""Config: every WseServer option as one typed, frozen value (pure code).

The option table (``core/options.py``) says each option's default, meaning
and text form; ``Config`` is how code reads them: ``config.max_message_size``,
never ``options["max_message_size"]``. A WseServer holds one Config and
replaces it whole when ``configure()`` changes something, so whatever reads
``server.config`` at the time it applies a limit sees the option however it
was given (code, flag, environment).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from typing import Any, Dict, Optional, Tuple, Union

from .forwarded import Trusted, parse_trusted
from .limits import parse_rate
from .options import NAMED, OPTIONS

__all__ = ["Config", "Rate"]

# "RATE" or (RATE, BURST), per second, as given; None: off
Rate = Union[None, float, Tuple[float, float]]

_DEFAULT = {o.name: o.default for o in OPTIONS}


def _d(name: str) -> Any:
    return field(default=_DEFAULT[name])


@dataclass(frozen=True)
class Config:
    """Every option, typed; ``Config.make(**options)`` checks names and values."""

    conn_per_user: Optional[int] = _d("conn_per_user")  # 0 or None: no limit
    rpc_timeout: Optional[float] = _d("rpc_timeout")  # None: wait for ever
    host: str = _d("host")
    port: int = _d("port")
    path: Optional[str] = _d("path")
    certfile: Optional[str] = _d("certfile")
    keyfile: Optional[str] = _d("keyfile")
    ssl_context: Any = _d("ssl_context")
    health_path: Optional[str] = _d("health_path")
    metrics_path: Optional[str] = _d("metrics_path")
    client_path: Optional[str] = _d("client_path")
    max_message_size: int = _d("max_message_size")
    handshake_timeout: float = _d("handshake_timeout")
    auth_timeout: float = _d("auth_timeout")
    ping_interval: float = _d("ping_interval")
    ping_timeout: float = _d("ping_timeout")
    close_timeout: float = _d("close_timeout")
    max_send_queue: int = _d("max_send_queue")
    max_fragments: int = _d("max_fragments")
    rpc_tracebacks: bool = _d("rpc_tracebacks")
    broker: Optional[str] = _d("broker")
    broker_timeout: float = _d("broker_timeout")
    broker_key: Optional[str] = _d("broker_key")
    curve_secret: Optional[str] = _d("curve_secret")
    broker_max_msg_size: int = _d("broker_max_msg_size")
    heartbeat: float = _d("heartbeat")
    cluster_replica: bool = _d("cluster_replica")
    clients_cache: float = _d("clients_cache")
    trusted_proxies: Any = _d("trusted_proxies")
    stop_spread: float = _d("stop_spread")
    gc_threshold: int = _d("gc_threshold")
    header_timeout: float = _d("header_timeout")
    tls_handshake_timeout: float = _d("tls_handshake_timeout")
    max_connections: int = _d("max_connections")
    max_connections_per_ip: int = _d("max_connections_per_ip")
    allowed_origins: Optional[Tuple[str, ...]] = _d("allowed_origins")
    max_unauthenticated: int = _d("max_unauthenticated")
    max_unauthenticated_per_ip: int = _d("max_unauthenticated_per_ip")
    max_identify: int = _d("max_identify")
    identify_queue_timeout: float = _d("identify_queue_timeout")
    max_rpc_per_conn: int = _d("max_rpc_per_conn")
    max_rpc_per_worker: int = _d("max_rpc_per_worker")
    max_channel_queue: int = _d("max_channel_queue")
    max_channel_queue_bytes: int = _d("max_channel_queue_bytes")
    rate_limit: Rate = _d("rate_limit")
    control_rate_limit: Rate = _d("control_rate_limit")

    @classmethod
    def make(cls, base: Optional["Config"] = None, **options: Any) -> "Config":
        """``base`` (or the defaults) with ``options`` changed. Raises TypeError
        for an unknown name and ValueError for a value that cannot work."""
        unknown = set(options) - _NAMES
        if unknown:
            raise TypeError(f"unknown WseServer options: {sorted(unknown)}")
        config = replace(base, **options) if base is not None else cls(**options)
        config.rate  # noqa: B018 - each parse raises ValueError on a bad value
        config.control_rate  # noqa: B018
        config.trusted  # noqa: B018
        return config

    def with_(self, **options: Any) -> "Config":
        """A copy with ``options`` changed (checked as by ``make``)."""
        return Config.make(self, **options)

    @cached_property
    def rate(self) -> Optional[Tuple[float, float]]:
        """``rate_limit`` as (rate, burst), or None (off)."""
        return parse_rate(self.rate_limit)

    @cached_property
    def control_rate(self) -> Optional[Tuple[float, float]]:
        """``control_rate_limit`` as (rate, burst), or None (off)."""
        return parse_rate(self.control_rate_limit)

    @cached_property
    def trusted(self) -> Trusted:
        """``trusted_proxies``, parsed."""
        return parse_trusted(self.trusted_proxies)

    def options(self) -> Dict[str, Any]:
        """The WseServer options as a dict (without the named arguments
        ``conn_per_user`` and ``rpc_timeout``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in NAMED}


_NAMES = frozenset(f.name for f in fields(Config))
if _NAMES != set(_DEFAULT):  # pragma: no cover - caught by any import
    raise RuntimeError("Config and the option table differ: "
                       f"{sorted(_NAMES ^ set(_DEFAULT))}")

