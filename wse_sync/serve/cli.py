"""``wse-sync serve | broker | stats`` (also ``python -m wse_sync``)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import List, Optional

__all__ = ["main"]


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s [%(name)s:{os.getpid()}] %(message)s",
        stream=sys.stderr,
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wse-sync", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run an app: a broker and N workers on one port")
    s.add_argument("app", help="MODULE:ATTR or path/to/file.py:ATTR naming a WseServer")
    s.add_argument("--host", default=None)
    s.add_argument("--port", type=int, default=None)
    s.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    s.add_argument("--broker", default=None, help="attach to this broker instead of starting one")
    s.add_argument("--path", default=None)
    s.add_argument("--max-message-size", type=int, default=None)
    s.add_argument("--certfile", default=None, help="serve TLS with this certificate (PEM)")
    s.add_argument("--keyfile", default=None, help="the certificate's private key (PEM)")
    s.add_argument("--max-connections", type=int, default=None,
                   help="sockets per worker (503 beyond; default 10000)")
    s.add_argument("--max-connections-per-ip", type=int, default=None,
                   help="sockets per client address per worker (503 beyond; default 256)")
    s.add_argument("--allowed-origins", default=None,
                   help="comma-separated Origin values allowed to connect (403 otherwise)")
    s.add_argument("--trusted-proxies", default=None,
                   help="comma-separated addresses whose X-Forwarded-For is believed")
    s.add_argument("--grace", type=float, default=10.0,
                   help="seconds running handlers get to finish on stop (default 10)")
    s.add_argument("--log-level", default="info")

    b = sub.add_parser("broker", help="run a broker alone")
    b.add_argument("--bind", required=True, help="e.g. tcp://127.0.0.1:5555 or ipc:///tmp/wse")
    b.add_argument("--log-level", default="info")
    b.add_argument("--parent", type=int, default=None, help=argparse.SUPPRESS)
    b.add_argument("--sync-window", type=float, default=2.5,
                   help="seconds to hold routed commands after start while workers resend"
                        " their tables (default 2.5; 0 for a fresh cluster)")

    st = sub.add_parser("stats", help="print a broker's users, connections and counters")
    st.add_argument("--broker", required=True)
    st.add_argument("--timeout", type=float, default=3.0)

    w = sub.add_parser("_worker", help=argparse.SUPPRESS)
    w.add_argument("app")
    w.add_argument("--fd", type=int, required=True)
    w.add_argument("--broker", required=True)
    w.add_argument("--options", default="{}")
    w.add_argument("--grace", type=float, default=10.0)
    w.add_argument("--log-level", default="info")
    w.add_argument("--ready-fd", type=int, default=None)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "stats":
        return _stats(args.broker, args.timeout)
    _setup_logging(args.log_level)
    if args.command == "broker":
        return _broker(args.bind, args.parent, args.sync_window)
    if args.command == "_worker":
        from .worker import run_worker
        return run_worker(args.app, args.fd, args.broker, options=json.loads(args.options),
                          grace=args.grace, ready_fd=args.ready_fd)
    return _serve(args)


def _serve(args: argparse.Namespace) -> int:
    import subprocess

    from .supervisor import Supervisor

    # Check the app and read its listening options in a throwaway process:
    # workers import it again after they start (never before a fork).
    code = ("import json,sys;from wse_sync.serve.worker import load_app;"
            "s=load_app(sys.argv[1]);print(json.dumps([s.options['host'],s.options['port']]))")
    out = subprocess.run([sys.executable, "-c", code, args.app], capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        return 2
    app_host, app_port = json.loads(out.stdout.strip().splitlines()[-1])
    host = args.host if args.host is not None else app_host
    port = args.port if args.port is not None else app_port
    if args.certfile:
        from ..integrations.wsgi import tls_context
        try:  # fail here, once, rather than in every worker
            tls_context(args.certfile, args.keyfile)
        except (OSError, ValueError) as exc:
            sys.stderr.write(f"wse-sync: cannot use --certfile/--keyfile: {exc}\n")
            return 2
    options = {"path": args.path, "max_message_size": args.max_message_size,
               "certfile": args.certfile, "keyfile": args.keyfile,
               "max_connections": args.max_connections,
               "max_connections_per_ip": args.max_connections_per_ip,
               "allowed_origins": args.allowed_origins, "trusted_proxies": args.trusted_proxies}
    sup = Supervisor(args.app, host, port, args.workers, broker=args.broker, options=options,
                     grace=args.grace, log_level=args.log_level)
    return sup.run()


def _broker(bind: str, parent: Optional[int] = None, sync_window: float = 2.5) -> int:
    import signal

    from ..cluster.broker import Broker

    broker = Broker(bind, parent_pid=parent, sync_window=sync_window)
    signal.signal(signal.SIGTERM, lambda s, f: broker.stop())
    signal.signal(signal.SIGINT, lambda s, f: broker.stop())
    broker.run()
    return 0


def _stats(endpoint: str, timeout: float) -> int:
    import zmq

    from ..core.messages import decode, encode

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sock.send_multipart(encode("stats"))
    if not sock.poll(timeout * 1000):
        print(f"no answer from {endpoint} in {timeout}s", file=sys.stderr)
        return 1
    msg = decode(sock.recv_multipart())
    print(json.dumps(msg.body, indent=2, sort_keys=True))
    sock.close()
    ctx.term()
    return 0
