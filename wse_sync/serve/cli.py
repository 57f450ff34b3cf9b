"""``wse-sync serve | broker | stats | keys`` (also ``python -m wse_sync``)."""
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
    _client_key_flags(s)
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
    b.add_argument("--curve-secret", default=None, metavar="FILE",
                   help="the broker's secret key file (NAME.key_secret; default"
                        " $WSE_SYNC_CURVE_SECRET): CURVE on tcp://")
    b.add_argument("--allow-workers", default=None, metavar="DIR",
                   help="directory of the public keys (*.key) allowed as workers (default"
                        " $WSE_SYNC_ALLOW_WORKERS); reloaded on SIGHUP")
    b.add_argument("--allow-clients", default=None, metavar="DIR",
                   help="directory of the public keys allowed as connect_cluster() clients:"
                        " send, broadcast, drop_client and stats only (default"
                        " $WSE_SYNC_ALLOW_CLIENTS); reloaded on SIGHUP")
    b.add_argument("--insecure", action="store_true",
                   help="allow tcp:// without CURVE keys (anyone who reaches the port joins)")
    b.add_argument("--max-msg-size", type=int, default=None, metavar="BYTES",
                   help="largest frame a peer may send (ZMQ_MAXMSGSIZE; default 64 MiB)")

    st = sub.add_parser("stats", help="print a broker's users, connections and counters")
    st.add_argument("--broker", required=True)
    st.add_argument("--timeout", type=float, default=3.0)
    _client_key_flags(st)

    k = sub.add_parser("keys", help="make a CURVE key pair: DIR/NAME.key and DIR/NAME.key_secret")
    k.add_argument("name", help="e.g. broker, worker1, cron")
    k.add_argument("--dir", required=True, help="where to write them (made 0700 if missing)")
    k.add_argument("--force", action="store_true", help="replace existing files")

    w = sub.add_parser("_worker", help=argparse.SUPPRESS)
    w.add_argument("app")
    w.add_argument("--fd", type=int, required=True)
    w.add_argument("--broker", required=True)
    w.add_argument("--options", default="{}")
    w.add_argument("--grace", type=float, default=10.0)
    w.add_argument("--log-level", default="info")
    w.add_argument("--ready-fd", type=int, default=None)
    return p


def _client_key_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker-key", default=None, metavar="FILE",
                   help="the broker's public key file (broker.key; default $WSE_SYNC_BROKER_KEY):"
                        " CURVE to a tcp:// broker")
    p.add_argument("--curve-secret", default=None, metavar="FILE",
                   help="this side's secret key file (NAME.key_secret; default"
                        " $WSE_SYNC_CURVE_SECRET)")


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "keys":
        return _keys(args.name, args.dir, args.force)
    if args.command == "stats":
        return _stats(args.broker, args.timeout, args.broker_key, args.curve_secret)
    _setup_logging(args.log_level)
    if args.command == "broker":
        return _broker(args)
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
    if args.broker:
        from ..cluster.curve import CurveError, client_keys
        try:  # here, once, rather than in every worker
            client_keys(args.broker, args.broker_key, args.curve_secret)
        except CurveError as exc:
            sys.stderr.write(f"wse-sync: {exc}\n")
            return 2
    options = {"path": args.path, "max_message_size": args.max_message_size,
               "broker_key": args.broker_key, "curve_secret": args.curve_secret,
               "certfile": args.certfile, "keyfile": args.keyfile,
               "max_connections": args.max_connections,
               "max_connections_per_ip": args.max_connections_per_ip,
               "allowed_origins": args.allowed_origins, "trusted_proxies": args.trusted_proxies}
    sup = Supervisor(args.app, host, port, args.workers, broker=args.broker, options=options,
                     grace=args.grace, log_level=args.log_level)
    return sup.run()


def _broker(args: argparse.Namespace) -> int:
    import signal

    from ..cluster.broker import Broker
    from ..cluster.curve import CurveError, server_curve
    from ..core.messages import MAX_MSG_SIZE

    log = logging.getLogger("wse_sync.broker")
    try:
        curve = server_curve(args.bind, args.curve_secret, args.allow_workers,
                             args.allow_clients, args.insecure)
        broker = Broker(args.bind, parent_pid=args.parent, sync_window=args.sync_window,
                        curve=curve, insecure=args.insecure,
                        max_msg_size=args.max_msg_size or MAX_MSG_SIZE)
        broker.bind()
    except CurveError as exc:
        log.error("broker not started: %s", exc)
        return 2
    except Exception as exc:  # zmq.ZMQError (address in use...), OSError
        log.error("broker not started: cannot bind %s: %s", args.bind, exc)
        return 1
    signal.signal(signal.SIGTERM, lambda s, f: broker.stop())
    signal.signal(signal.SIGINT, lambda s, f: broker.stop())
    signal.signal(signal.SIGHUP, lambda s, f: broker.reload())
    broker.run()
    return 0


def _keys(name: str, directory: str, force: bool) -> int:
    from ..cluster.curve import CurveError, write_keys

    try:
        public, secret = write_keys(name, directory, force)
    except (CurveError, OSError) as exc:
        print(f"wse-sync: {exc}", file=sys.stderr)
        return 2
    print(f"public key: {public}\nsecret key: {secret} (mode 0600: keep it on this host)")
    return 0


def _stats(endpoint: str, timeout: float, broker_key: Optional[str] = None,
           secret: Optional[str] = None) -> int:
    import zmq

    from ..cluster.curve import CurveError, client_keys
    from ..core.messages import MAX_MSG_SIZE, decode, encode

    try:
        curve = client_keys(endpoint, broker_key, secret)
    except CurveError as exc:
        print(f"wse-sync: {exc}", file=sys.stderr)
        return 2
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MSG_SIZE)
    if curve is not None:
        curve.apply(sock)
    sock.connect(endpoint)
    sock.send_multipart(encode("stats"))
    if not sock.poll(timeout * 1000):
        hint = " (is this key allowed by the broker?)" if curve is not None else ""
        print(f"no answer from {endpoint} in {timeout}s{hint}", file=sys.stderr)
        sock.close(0)
        ctx.term()
        return 1
    msg = decode(sock.recv_multipart())
    print(json.dumps(msg.body, indent=2, sort_keys=True))
    sock.close()
    ctx.term()
    return 0
