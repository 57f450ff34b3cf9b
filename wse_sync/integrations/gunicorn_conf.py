"""gunicorn settings that make N gunicorn workers one wse_sync cluster.

One command::

    gunicorn -c python:wse_sync.gunicorn_conf -w 4 -b 0.0.0.0:8000 myapp:application

- ``worker_class`` is ``wse_sync.gunicorn.Worker`` (``-k`` still overrides it;
  gevent-websocket's ``GeventWebSocketWorker`` works too).
- ``on_starting`` (in the master, before any worker): unless
  ``WSE_SYNC_BROKER`` is set (in the environment or with ``-e``), starts a
  broker as a child (``python -m wse_sync.serve.broker_keeper``, which restarts it
  if it dies) on a private ``ipc://`` endpoint, or on ``WSE_SYNC_BROKER_BIND``
  when set (so other processes, e.g. ``wse_sync.connect_cluster``, can reach
  it), and exports the endpoint as ``WSE_SYNC_BROKER``: every worker's
  WseServer joins it. With ``WSE_SYNC_BROKER`` set, the workers join that
  broker and none is started.
- ``post_worker_init``: checks the worker class (a sync, gthread or plain
  gevent worker is refused with a message saying what to use), starts the
  app's WseServers, and closes their connections with 1012 on SIGTERM.
- ``on_exit``: stops the broker it started, after the workers.
- ``logconfig_dict``: gunicorn's and wse_sync's lines in one format.

In your own config file: ``from wse_sync.gunicorn_conf import *`` and set
``bind``, ``workers``... beside (see ``workers/gunicorn.conf.py``).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from typing import Any, Dict

from ..core.children import python_code
from ..core.logs import dict_config

__all__ = ["worker_class", "logconfig_dict", "on_starting", "post_worker_init", "on_exit"]

worker_class = "wse_sync.gunicorn.Worker"

# one log format for gunicorn's lines and wse_sync's (wse_sync.core.logs);
# gunicorn's access log stays quiet unless you set logconfig_dict yourself
logconfig_dict = dict_config()

_state: Dict[str, Any] = {}


def on_starting(server: Any) -> None:
    configured = os.environ.get("WSE_SYNC_BROKER") or (server.cfg.env or {}).get("WSE_SYNC_BROKER")
    if configured:
        server.log.info("wse_sync: workers join the broker at %s", configured)
        return
    bind = os.environ.get("WSE_SYNC_BROKER_BIND")
    if not bind:
        _state["tmpdir"] = tempfile.mkdtemp(prefix="wse-sync-gunicorn-")
        bind = f"ipc://{_state['tmpdir']}/broker.sock"
    level = str(server.cfg.loglevel or "info").lower()
    # its own session: a terminal's Ctrl-C reaches the master only, which
    # stops the workers first and the broker last (on_exit)
    _state["keeper"] = subprocess.Popen(
        python_code("from wse_sync.serve.broker_keeper import main\nraise SystemExit(main())\n",
                    "--bind", bind, "--parent", str(os.getpid()), "--log-level", level),
        start_new_session=True)
    os.environ["WSE_SYNC_BROKER"] = bind
    server.log.info("wse_sync: broker keeper (pid %d) on %s", _state["keeper"].pid, bind)


def post_worker_init(worker: Any) -> None:
    from .gunicorn import prepare_worker
    prepare_worker(worker)


def on_exit(server: Any) -> None:
    keeper = _state.pop("keeper", None)
    if keeper is not None:
        if keeper.poll() is None:
            keeper.terminate()
        try:
            keeper.wait(15)
        except subprocess.TimeoutExpired:
            keeper.kill()
            keeper.wait()
        server.log.info("wse_sync: broker stopped")
    tmpdir = _state.pop("tmpdir", None)
    if tmpdir:
        shutil.rmtree(tmpdir, ignore_errors=True)
