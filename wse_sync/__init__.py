"""wse_sync: a wse 4.x compatible WebSocket server on gevent, clustered with ZeroMQ."""
from .client import WseClient
from .cluster_client import ClusterHandle, connect_cluster
from .connection import WseConnection, WseIdentity
from .errors import WSE_ERROR, WSE_REASON, WSE_STATUS, WseError
from .mount import WseMount, mount
from .protocol import WseJSON
from .server import WseServer

__all__ = [
    "WseServer", "WseConnection", "WseIdentity", "WseError", "WseJSON",
    "WSE_REASON", "WSE_ERROR", "WSE_STATUS", "WseClient", "WseMount", "mount",
    "connect_cluster", "ClusterHandle",
]

__version__ = "0.1.0"
