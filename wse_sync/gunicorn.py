"""Kept at this path for deployments: see wse_sync.integrations.gunicorn."""
from .integrations.gunicorn import *  # noqa: F401,F403
from .integrations.gunicorn import __all__  # noqa: F401
