"""Broadcast a note to every open page from outside the web app (cron, a
management command): a blocking call through the cluster's broker.

    python examples/flask_app/notify.py "deploy at 17:00" --broker ipc:///tmp/notes-broker.sock

(start gunicorn with WSE_SYNC_BROKER_BIND=ipc:///tmp/notes-broker.sock so the
broker it starts listens there; or set WSE_SYNC_BROKER for both.)
"""
import argparse

from wse_sync import connect_cluster

p = argparse.ArgumentParser()
p.add_argument("text")
p.add_argument("--broker", default=None, help="default: $WSE_SYNC_BROKER")
args = p.parse_args()

with connect_cluster(args.broker) as cluster:
    cluster.broadcast("note", {"id": None, "text": args.text, "pid": None})
    print(f"sent to {len(cluster.clients)} user(s)")
