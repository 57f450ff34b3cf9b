"""The app bench/attack.py attacks (one worker of ``wse-sync serve``).

- identify accepts every identity at once, except those starting with
  ``slow``: they wait WSE_ATTACK_SLOW seconds (default 5) first;
- RPCs: ``echo``, ``nap`` (sleeps min(payload, 5) s, then answers), ``bcast``
  (broadcasts a string of ``payload`` bytes on channel ``big``), ``stats``;
- channel ``sink``: counts its calls, then sleeps WSE_ATTACK_SINK seconds (2).

WSE_ATTACK_OPTIONS (JSON object) holds server options to try; those this
version of WseServer does not know are dropped (``stats`` says which).
"""
import json
import os
import re
import time

import gevent

from wse_sync import WseServer

SLOW = float(os.environ.get("WSE_ATTACK_SLOW", "5"))
SINK = float(os.environ.get("WSE_ATTACK_SINK", "2"))
WANTED = json.loads(os.environ.get("WSE_ATTACK_OPTIONS") or "{}")

STATE = {"sink_calls": 0, "sink_first": None, "sink_last": None, "sink_active": 0,
         "sink_bytes": 0, "rpc_calls": 0}


def identify(identity, accept, refuse, **kw):
    ident = str(identity or "")
    if not ident:
        refuse()
        return
    if ident.startswith("slow"):
        gevent.sleep(SLOW)
    accept(ident, {"pid": os.getpid()})


def _make_server():
    options = dict(WANTED)
    ignored = []
    for _ in range(len(options) + 1):
        try:
            return WseServer(identify=identify, conn_per_user=1000, **options), options, ignored
        except TypeError as exc:
            names = [k for k in options if re.search(r"\b%s\b" % re.escape(k), str(exc))]
            if not names:
                raise
            for k in names:
                ignored.append(k)
                options.pop(k)
    raise RuntimeError("cannot build the server")


server, APPLIED, IGNORED = _make_server()


@server.register("echo")
def echo(conn, payload):
    STATE["rpc_calls"] += 1
    return payload


@server.register("nap")
def nap(conn, payload):
    STATE["rpc_calls"] += 1
    try:
        seconds = min(float(payload or 0), 5.0)
    except (TypeError, ValueError):
        seconds = 0.0
    gevent.sleep(seconds)
    return payload


@server.register("bcast")
def bcast(conn, payload):
    size = int(payload or 0)
    server.broadcast("big", "x" * min(size, 64 * 1024 * 1024))
    return size


@server.register("stats")
def stats(conn, payload):
    try:
        conns = len(server.hub.connections())
    except Exception:  # the hub's API may change under the harness
        conns = None
    limits = {k: v for k, v in server.options.items()
              if isinstance(v, (int, float, type(None))) and not isinstance(v, bool)
              and (k.startswith("max_") or k.endswith("_timeout") or k == "rate_limit")}
    return dict(STATE, pid=os.getpid(), now=time.time(), conns=conns, limits=limits,
                options_applied=sorted(APPLIED), options_ignored=sorted(IGNORED))


@server.channel.on("sink")
def sink(conn, payload):
    now = time.time()
    STATE["sink_calls"] += 1
    STATE["sink_bytes"] += len(payload) if isinstance(payload, str) else 0
    STATE["sink_first"] = STATE["sink_first"] or now
    STATE["sink_last"] = now
    STATE["sink_active"] += 1
    try:
        gevent.sleep(SINK)
    finally:
        STATE["sink_active"] -= 1
