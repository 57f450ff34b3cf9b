"""wse_sync: a wse 4.x compatible WebSocket server on gevent, clustered with ZeroMQ.

The public names are imported on first use, so importing a pure module
(``wse_sync.core.*``) does not pull in gevent or ZeroMQ.
"""
from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

__all__ = [
    "WseServer", "WseConnection", "WseIdentity", "WseError", "WseJSON",
    "WSE_REASON", "WSE_ERROR", "WSE_STATUS", "WseClient", "WseMount", "mount",
    "connect_cluster", "ClusterHandle",
]

from .core.version import __version__  # noqa: F401 - the public name

# the JavaScript client shipped in the package (an ES module; docs/api.md)
CLIENT_JS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "wse.js")

# public name -> the module that defines it
_LAZY = {
    "WseClient": ".socket.client",
    "ClusterHandle": ".worker.handle", "connect_cluster": ".worker.handle",
    "WseConnection": ".socket.connection", "WseIdentity": ".worker.users",
    "WSE_ERROR": ".core.errors", "WSE_REASON": ".core.errors", "WSE_STATUS": ".core.errors",
    "WseError": ".core.errors",
    "WseMount": ".integrations.mounting", "mount": ".integrations.mounting",
    "WseJSON": ".core.protocol",
    "WseServer": ".worker.server",
}

if TYPE_CHECKING:  # pragma: no cover
    from .socket.client import WseClient
    from .worker.handle import ClusterHandle, connect_cluster
    from .socket.connection import WseConnection
    from .worker.users import WseIdentity
    from .core.errors import WSE_ERROR, WSE_REASON, WSE_STATUS, WseError
    from .integrations.mounting import WseMount, mount
    from .core.protocol import WseJSON
    from .worker.server import WseServer


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'wse_sync' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))
