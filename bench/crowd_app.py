"""The app bench/crowd.py serves: ``wse-sync serve bench/crowd_app.py:server``.

- identify accepts identity ``u<N>`` as user ``u<N>``, anything else is
  refused; the welcome carries this worker's pid and the connection's id;
- ``joined`` / ``left`` append one JSON line ``[pid, event, cid, code,
  reason, time]`` to ``$WSE_CROWD_LOG_DIR/events-<pid>.log`` (one file per
  worker process, line-buffered: what was written survives a kill -9);
- RPC ``note`` {to, id}: ``server.send(to, "note", {id, to, from})`` (the
  target may be on any worker: the send goes through the broker), answers
  {ok: true, pid} when the send was accepted, {ok: false, code} when it
  raised (e.g. wse.server.broker-unavailable);
- RPC ``table``: this worker's own connections, through the public API
  (``server.hub.connections()``, docs/api.md): {pid, worker, conns: [[cid,
  conn_id], ...]}.
"""
import json
import os
import re
import time

from wse_sync import WseError, WseServer

LOG_DIR = os.environ.get("WSE_CROWD_LOG_DIR") or "."
USER = re.compile(r"u\d+\Z")

_log_file = None
_log_pid = None


def _log(event, cid, code=None, reason=None):
    global _log_file, _log_pid
    pid = os.getpid()
    if _log_file is None or _log_pid != pid:
        _log_file = open(os.path.join(LOG_DIR, f"events-{pid}.log"), "a", buffering=1)
        _log_pid = pid
    _log_file.write(json.dumps([pid, event, cid, code, reason, time.time()]) + "\n")


def identify(identity, accept, refuse, conn_id, **kwargs):
    if isinstance(identity, str) and USER.match(identity):
        accept(identity, {"pid": os.getpid(), "conn_id": conn_id})
    else:
        refuse()


server = WseServer(identify=identify, conn_per_user=1)


@server.when.joined
def _joined(client, meta):
    _log("joined", client.cid)


@server.when.left
def _left(client, code, reason):
    _log("left", client.cid, code, reason)


@server.register("note")
def note(conn, payload):
    try:
        server.send(payload["to"], "note", {"id": payload["id"], "to": payload["to"],
                                            "from": conn.cid})
    except WseError as e:
        return {"ok": False, "code": e.code}
    return {"ok": True, "pid": os.getpid()}


@server.register("table")
def table(conn, payload):
    return {"pid": os.getpid(), "worker": server.worker_id,
            "conns": [[c.cid, c.conn_id] for c in server.hub.connections()]}
