"""gunicorn configuration for a wse_sync app (a WseServer mounted in a WSGI app).

    gunicorn -c workers/gunicorn.conf.py myapp:application

Every gunicorn worker is a wse_sync worker; they share ONE broker, started by
the master as a child (restarted if it dies) unless WSE_SYNC_BROKER names a
running one. Environment:

  WSE_SYNC_BIND         where to listen (default 0.0.0.0:8000)
  WEB_CONCURRENCY       number of workers (default: the number of CPUs)
  WSE_SYNC_BROKER       join this broker (e.g. ipc:///run/wse-sync/broker.sock)
                        instead of starting one
  WSE_SYNC_BROKER_BIND  where the started broker listens (default: a private
                        ipc:// endpoint), so that scripts can connect_cluster() to it
"""
import multiprocessing
import os

# worker_class (wse_sync.gunicorn.Worker) and the on_starting / post_worker_init /
# on_exit hooks that start the broker, check the workers and stop gracefully
from wse_sync.gunicorn_conf import *  # noqa: F401,F403

bind = os.environ.get("WSE_SYNC_BIND", "0.0.0.0:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", multiprocessing.cpu_count()))
# a gevent worker holds many sockets; WebSockets are long-lived
worker_connections = 10000
# SIGTERM: connections are closed with 1012 (clients reconnect), handlers get this long
graceful_timeout = 15
timeout = 30
# a proxy in front (nginx, a load balancer) passes X-Forwarded-For
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
