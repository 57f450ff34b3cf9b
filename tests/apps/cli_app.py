"""An app for tests/processes/test_cli.py: a module-level server and a factory.

``cli_app:server`` and ``cli_app:make_server`` (the welcome tells which one
built the server); ``not_a_server`` and ``make_nothing`` are bad specs.
"""
import os

from wse_sync import WseServer

BUILT_BY = []


def _build(kind):
    BUILT_BY.append(kind)

    def identify(identity, accept, refuse, **_):
        if identity:
            accept(identity, {"built_by": kind, "pid": os.getpid()})
        else:
            refuse()

    srv = WseServer(identify=identify, conn_per_user=3)
    srv.register("echo", lambda conn, payload: payload)
    srv.register("built_by", lambda conn, payload: list(BUILT_BY))
    return srv


server = _build("module")


def make_server():
    return _build("factory")


not_a_server = 42


def make_nothing():
    return "not a server"
