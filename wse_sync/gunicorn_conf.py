"""gunicorn settings for wse_sync (``-c python:wse_sync.gunicorn_conf``): see
wse_sync.integrations.gunicorn_conf."""
from wse_sync.integrations.gunicorn_conf import *  # noqa: F401,F403
