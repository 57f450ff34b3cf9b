"""gevent-websocket's stock ``WebSocketHandler``, made to answer bad upgrades cleanly.

Its error answers are str bodies, which pywsgi cannot write on Python 3 (a
traceback per request), and a key that is not base64 raises (a 500). A
server that uses the stock handler with a WseServer gets these fixed, once
per process, when the first WseServer is made: bytes bodies, a 400 for a bad
key. ``wse_sync.wsgi.WseHandler`` needs none of this (it overrides the
upgrade) and is still the handler to use.
"""
from __future__ import annotations

import base64
from typing import Any, List, Optional

__all__ = ["harden"]

_done = False


def _key_is_valid(key: str) -> bool:
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        return False


def harden() -> None:
    """Patch ``geventwebsocket.handler.WebSocketHandler`` (idempotent)."""
    global _done
    if _done:
        return
    _done = True
    try:
        from geventwebsocket.handler import WebSocketHandler
    except ImportError:  # pragma: no cover - it is a dependency
        return
    original = WebSocketHandler.upgrade_websocket

    def upgrade_websocket(self: Any) -> Optional[List[bytes]]:
        env = self.environ
        key = env.get("HTTP_SEC_WEBSOCKET_KEY", "").strip()
        if (env.get("HTTP_UPGRADE", "").lower() == "websocket" and key
                and env.get("HTTP_SEC_WEBSOCKET_VERSION") and not _key_is_valid(key)):
            self.start_response("400 Bad Request", [("Content-Type", "text/plain")])
            return [b"invalid Sec-WebSocket-Key\n"]
        result = original(self)
        if isinstance(result, list):
            return [(part + "\n").encode("utf-8") if isinstance(part, str) else part
                    for part in result]
        return result

    upgrade_websocket.__doc__ = original.__doc__
    WebSocketHandler.upgrade_websocket = upgrade_websocket
