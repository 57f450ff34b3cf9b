"""Every WseServer option: its default, what it means, and how text becomes its
value (pure code).

The one table behind ``WseServer(**options)``, the ``wse-sync serve`` flags
(``--max-message-size``) and the environment (``WSE_SYNC_MAX_MESSAGE_SIZE``):
a flag wins over the environment, which wins over the app's code.
``conn_per_user`` and ``rpc_timeout`` (WseServer's named arguments) are in
the table too, so they can be set the same ways.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple

from .forwarded import parse_trusted
from .limits import parse_rate

__all__ = ["Option", "OPTIONS", "DEFAULTS", "NAMED", "ENV_PREFIX", "OptionError", "parse",
           "env_name", "flag_name", "from_environ", "DEFAULT_RPC_TIMEOUT"]

ENV_PREFIX = "WSE_SYNC_"

# seconds a call waits for its answer unless told otherwise: the server's
# rpc_timeout option and the Python client's rpc_timeout argument
DEFAULT_RPC_TIMEOUT = 20.0


class OptionError(ValueError):
    """A value given as text (a flag, an environment variable) that does not fit."""


def _int(text: str) -> int:
    try:
        return int(text.replace("_", ""))
    except ValueError:
        raise OptionError(f"{text!r} is not an integer") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise OptionError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise OptionError(f"{text!r} is not a number of seconds")
    return value


def _text(text: str) -> str:
    return text


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise OptionError(f"{text!r} is not a boolean (true/false, 1/0, yes/no, on/off)")


def _path(text: str) -> Optional[str]:
    """A URL path, or off ("", "none", "off")."""
    if text.strip().lower() in ("", "none", "off"):
        return None
    if not text.startswith("/"):
        raise OptionError(f"{text!r} is not a path starting with '/' (or 'off')")
    return text


def _rate(text: str) -> Any:
    """"RATE" (burst twice that) or "RATE,BURST" (per second), or off."""
    if text.strip().lower() in ("", "none", "off", "0"):
        return None
    parts = [p.strip() for p in text.split(",")]
    if len(parts) > 2:
        raise OptionError(f"{text!r} is not RATE or RATE,BURST")
    value: Any = _float(parts[0]) if len(parts) == 1 else (_float(parts[0]), _float(parts[1]))
    try:
        parse_rate(value)
    except ValueError:
        raise OptionError(f"{text!r}: the rate must be above 0 and the burst at least 1") from None
    return value


def _list(text: str) -> Optional[Tuple[str, ...]]:
    """Comma-separated values, or off ("" or "none")."""
    if text.strip().lower() in ("", "none"):
        return None
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _limit(text: str) -> int:
    """A count; 0 means no limit."""
    value = _int(text)
    if value < 0:
        raise OptionError(f"{text!r} is negative (0 means no limit)")
    return value


def _proxies(text: str) -> Optional[Tuple[str, ...]]:
    """Addresses or networks, comma-separated; "*" trusts everyone."""
    value = _list(text)
    try:
        parse_trusted(value)
    except ValueError as exc:
        raise OptionError(str(exc)) from None
    return value


class Option(NamedTuple):
    name: str
    default: Any
    help: str
    parse: Callable[[str], Any]
    # False: only in code (not a flag or an environment variable)
    textual: bool = True


_O = Option
OPTIONS: List[Option] = [
    # -- what the app says (WseServer's named arguments) --
    _O("conn_per_user", 1, "connections one user may hold at once in the cluster"
       " (the oldest is closed beyond; 0: no limit)", _limit),
    _O("rpc_timeout", DEFAULT_RPC_TIMEOUT, "seconds a server -> client call waits for its"
       " answer", _float),
    # -- listening --
    _O("host", "127.0.0.1", "address to listen on", _text),
    _O("port", 4200, "TCP port to listen on", _int),
    _O("path", None, "the one URL path WebSocket clients use (others get 404; default: any)",
       _path),
    _O("certfile", None, "serve TLS with this certificate chain (PEM)", _text),
    _O("keyfile", None, "the certificate's private key (PEM)", _text),
    _O("ssl_context", None, "an ssl.SSLContext (code only; else built from certfile)", _text,
       textual=False),
    _O("health_path", "/healthz", "GET path answering 200 while in sync with the broker,"
       " else 503 ('off' to turn off)", _path),
    _O("metrics_path", "/metrics", "GET path of the Prometheus metrics of the whole cluster"
       " ('off' to turn off)", _path),
    _O("client_path", None, "GET path serving the shipped JavaScript client, e.g. /wse.js",
       _path),
    # -- the protocol --
    _O("max_message_size", 1024 * 1024, "largest message a client may send, bytes (1009)",
       _int),
    _O("handshake_timeout", 10.0, "seconds for a new socket to send its ~wse:hi", _float),
    _O("auth_timeout", 10.0, "seconds for challenge + identify to decide", _float),
    _O("ping_interval", 20.0, "idle seconds before the server pings", _float),
    _O("ping_timeout", 20.0, "further silent seconds before the socket is cut", _float),
    _O("close_timeout", 2.0, "seconds to wait for the peer's close frame", _float),
    _O("max_send_queue", 4 * 1024 * 1024, "bytes queued for one slow client before it is"
       " dropped (1008)", _int),
    _O("max_fragments", 1000, "frames one message may arrive in (1008 beyond)", _limit),
    _O("rpc_tracebacks", False, "send the handler's full traceback in RPC errors (it names"
       " server files)", _bool),
    # -- the cluster --
    _O("broker", None, "broker endpoint to join (tcp://, ipc://), or the endpoints of K shards"
       " comma-separated in shard order; default: an embedded broker", _text),
    _O("broker_timeout", 5.0, "seconds to wait for a broker answer", _float),
    _O("broker_key", None, "the broker's public key, a file or 40 characters (CURVE on tcp://);"
       " with shards, one for all or one per shard, comma-separated in shard order",
       _text),
    _O("curve_secret", None, "this process's secret key, a file or 40 characters", _text),
    _O("broker_max_msg_size", 64 * 1024 * 1024, "largest message on the broker link, bytes",
       _int),
    _O("heartbeat", 1.0, "seconds between heartbeats to the broker", _float),
    _O("cluster_replica", False, "keep a copy of the whole user map here (server.clients"
       " answered from memory, ~450 bytes per cluster user) instead of asking the broker",
       _bool),
    _O("clients_cache", 1.0, "seconds a broker answer about a user (or the user count) is"
       " reused by server.clients (without cluster_replica)", _float),
    _O("trusted_proxies", ("127.0.0.1", "::1"), "addresses whose X-Forwarded-For is believed"
       " (comma-separated; '*': all)", _proxies),
    _O("stop_spread", 5.0, "seconds over which a stopping worker closes its connections"
       " (1012, in batches of 200 or more; at most half of the stop's grace), so that its"
       " clients reconnect as a stream, not a storm", _float),
    _O("gc_threshold", 7000, "wse-sync serve workers: gen-0 threshold of Python's cyclic GC,"
       " set (after gc.freeze() of what the app imported) once the worker serves (0: leave"
       " the GC as it is)", _limit),
    # -- limits (README, "Limits") --
    _O("header_timeout", 10.0, "seconds for the request line and headers (408)", _float),
    _O("tls_handshake_timeout", 10.0, "seconds for the TLS handshake (closed)", _float),
    _O("max_connections", 10000, "sockets per worker, in any state (503; 0: no limit)", _limit),
    _O("max_connections_per_ip", 256, "sockets per client address per worker; trusted proxies"
       " exempt (503)", _limit),
    _O("allowed_origins", None, "Origin values allowed to connect, comma-separated (403;"
       " default: any)", _list),
    _O("max_unauthenticated", 1000, "sockets upgraded and not yet welcomed, per worker (1013)",
       _limit),
    _O("max_unauthenticated_per_ip", 50, "... per client address (X-Forwarded-For aware)"
       " (1013)", _limit),
    _O("max_identify", 100, "identify / challenge calls running at once per worker (others"
       " wait their turn)", _limit),
    _O("identify_queue_timeout", 30.0, "seconds a connection may wait for one of max_identify"
       " slots (then 1013 wse.server-busy, which clients retry); auth_timeout starts once it"
       " has one", _float),
    _O("max_rpc_per_conn", 64, "RPC handlers running per connection (an error at once beyond)",
       _limit),
    _O("max_rpc_per_worker", 4096, "RPC handlers running per worker", _limit),
    _O("max_channel_queue", 256, "channel messages waiting per connection (1008 beyond)",
       _limit),
    _O("max_channel_queue_bytes", 8 * 1024 * 1024, "bytes of channel messages waiting per"
       " connection (1008 beyond)", _limit),
    _O("rate_limit", None, "frames per second per connection: RATE or RATE,BURST (1008;"
       " default: off)", _rate),
    _O("control_rate_limit", (50, 200), "pings + pongs per second per connection: RATE,BURST"
       " (1008)", _rate),
]

# WseServer's named arguments, kept out of ``server.options``
NAMED = ("conn_per_user", "rpc_timeout")

# the options of ``WseServer(**options)`` and their defaults
DEFAULTS: Dict[str, Any] = {o.name: o.default for o in OPTIONS if o.name not in NAMED}

_BY_NAME = {o.name: o for o in OPTIONS}


def parse(name: str, text: str) -> Any:
    """The value of option ``name`` given as ``text``; OptionError when it does not fit."""
    option = _BY_NAME.get(name)
    if option is None or not option.textual:
        raise OptionError(f"{name!r} cannot be given as text")
    return option.parse(text)


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def from_environ(environ: Mapping[str, str]) -> Dict[str, Any]:
    """The options set as ``WSE_SYNC_<OPTION>`` in ``environ``, parsed.
    Raises OptionError naming the variable."""
    out: Dict[str, Any] = {}
    for option in OPTIONS:
        if not option.textual:
            continue
        key = env_name(option.name)
        if key in environ:
            try:
                out[option.name] = option.parse(environ[key])
            except OptionError as exc:
                raise OptionError(f"{key}: {exc}") from None
    return out
