"""Kept at this path for deployments: see wse_sync.integrations.wsgi."""
from .integrations.wsgi import *  # noqa: F401,F403
from .integrations.wsgi import __all__  # noqa: F401
