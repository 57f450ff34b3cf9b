"""The wse message codec (pure: no sockets, no gevent).

A protocol object has ``name`` (the WebSocket subprotocol),
``internal_types`` (a mapping of the six internal names to type values) and
``pack(type, payload=None, stamp=None)`` / ``unpack(data) -> (type, payload,
stamp)``. ``pack`` returning ``str`` means a text frame, ``bytes`` a binary
frame. Any exception from ``unpack`` is a message processing error.
"""
from __future__ import annotations

import json
import re
from typing import Any, Mapping, Optional, Tuple, Union

import ujson

__all__ = ["WseJSON", "INTERNAL_TYPE_NAMES", "check_protocol"]

INTERNAL_TYPE_NAMES = ("hi", "challenge", "welcome", "call", "response", "response_error")

_SURROGATE = re.compile("[\ud800-\udfff]")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# Strict like JSON.parse (ujson.loads takes NaN, Infinity, 01, 1., raw control
# characters); the stdlib C decoder is about as fast for wse-sized messages.
_decoder = json.JSONDecoder(parse_constant=_refuse_constant, strict=True)
_decode = _decoder.decode
# the C scanner under decode(): decode() adds two regex matches (whitespace
# around the value) and two Python calls, needless for "[...]" without spaces
_scan = _decoder.scan_once  # type: ignore[attr-defined]


def _decode_array(data: str) -> Any:
    """``_decode(data)``, faster for text that starts with "[" and ends with "]"."""
    if data[:1] == "[" and data[-1:] == "]":
        try:
            value, end = _scan(data, 0)
        except StopIteration:
            value, end = None, -1  # decode() says why, below
        if end == len(data):
            return value
    return _decode(data)  # the general path (and its errors, word for word)


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None, as JSON.stringify does."""
    if isinstance(value, float):
        return value if value - value == 0.0 else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class WseJSON:
    """The default protocol: ``[type, payload, stamp]`` as JSON text frames."""

    name = "wse-default-json"
    internal_types: Mapping[str, str] = {
        "hi": "~wse:hi",
        "challenge": "~wse:challenge",
        "welcome": "~wse:welcome",
        "call": "~wse:call",
        "response": "~wse:response",
        "response_error": "~wse:response-err",
    }

    def pack(self, type: Any, payload: Any = None, stamp: Optional[str] = None) -> str:
        # Same bytes as JSON.stringify: no ASCII escaping, no escaped slashes.
        message = [type, payload, stamp]
        try:
            data = ujson.dumps(message, ensure_ascii=False, escape_forward_slashes=False,
                               allow_nan=False)
        except OverflowError:  # NaN or an infinity: JSON.stringify writes null
            message = _finite(message)
            data = ujson.dumps(message, ensure_ascii=False, escape_forward_slashes=False)
        if not data.isascii() and _SURROGATE.search(data):
            # a lone surrogate cannot be sent as UTF-8: escape it, as JSON.stringify does
            data = ujson.dumps(message, ensure_ascii=True, escape_forward_slashes=False)
        return data

    def unpack(self, data: Union[str, bytes]) -> Tuple[Any, Any, Any]:
        """Parse one frame. Raises ValueError when it is not a JSON array of 1+ items."""
        if isinstance(data, (bytes, bytearray, memoryview)):
            data = bytes(data).decode("utf-8")
        message = _decode_array(data)
        if not isinstance(message, list) or not message:
            raise ValueError("a wse message is a JSON array [type, payload, stamp]")
        n = len(message)
        return (
            message[0],
            message[1] if n > 1 else None,
            message[2] if n > 2 else None,
        )


def check_protocol(protocol: Any) -> Any:
    """Validate a custom protocol object; returns it. Raises TypeError."""
    for attr in ("name", "internal_types", "pack", "unpack"):
        if not hasattr(protocol, attr):
            raise TypeError(f"protocol object lacks {attr!r}")
    if not isinstance(protocol.name, str) or not protocol.name:
        raise TypeError("protocol.name must be a non-empty string")
    missing = [k for k in INTERNAL_TYPE_NAMES if k not in protocol.internal_types]
    if missing:
        raise TypeError(f"protocol.internal_types lacks {missing}")
    return protocol
