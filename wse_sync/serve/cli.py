"""The wse-sync command: serve, broker, stats, keys (also python -m wse_sync)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Any, Dict, List, NoReturn, Optional, Tuple

from ..core.broker import SYNC_WINDOW
from ..core.options import OPTIONS, OptionError, env_name, flag_name, from_environ
from ..core import logs

if TYPE_CHECKING:
    from ..cluster.curve import ClientKeys

__all__ = ["main", "build_parser"]

DESCRIPTION = ("Run a wse_sync app (a broker and N gevent workers on one port), a broker"
               " alone, or ask a broker for its figures. Every WseServer option of"
               " `serve` is also read from WSE_SYNC_<OPTION> (a flag wins over the"
               " environment, which wins over the app's code).")

# flags of `serve` itself (not WseServer options), each also read from WSE_SYNC_<NAME>
SERVE_FLAGS = ("workers", "grace", "log_level", "log_format", "log_config", "reload")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, but not "(default: None)" / "(default: False)"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return text + " (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """Usage mistakes in two lines, not the whole (long) usage."""

    def error(self, message: str) -> "NoReturn":  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


def _fail(message: str, code: int = 2) -> int:
    print(f"wse-sync: {message}", file=sys.stderr)
    return code


def _env_default(name: str, default: Any) -> Any:
    """argparse default from WSE_SYNC_<NAME> (parsed by argparse's type later)."""
    return os.environ.get(env_name(name), default)


def _log_flags(p: argparse.ArgumentParser, env: bool = False) -> None:
    d = (lambda n, v: _env_default(n, v)) if env else (lambda n, v: v)
    p.add_argument("--log-level", default=d("log_level", "info"), choices=logs.LEVELS,
                   type=str.lower, help="least severe level logged")
    p.add_argument("--log-format", default=d("log_format", "text"), choices=logs.FORMATS,
                   help="text lines, or one JSON object per line")
    p.add_argument("--log-config", default=d("log_config", None), metavar="FILE",
                   help="a logging configuration file (.json: dictConfig; .ini: fileConfig);"
                        " replaces --log-level and --log-format")


def build_parser() -> argparse.ArgumentParser:
    from ..core.version import __version__

    p = _Parser(prog="wse-sync", description=DESCRIPTION, formatter_class=_Formatter)
    p.add_argument("--version", action="version", version=f"wse-sync {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{serve,broker,stats,keys}")

    s = sub.add_parser("serve", help="run an app: a broker and N workers on one port",
                       description="Run an app: a broker (unless --broker) and N gevent"
                                   " workers sharing one port. SIGTERM stops gracefully,"
                                   " SIGHUP replaces the workers one at a time.",
                       formatter_class=_Formatter)
    s.add_argument("app", help="MODULE:ATTR or path/to/file.py:ATTR naming a WseServer"
                               " (or a function returning one)")
    s.add_argument("--workers", type=int, default=_env_default("workers", os.cpu_count() or 1),
                   help="worker processes [WSE_SYNC_WORKERS] (default: the number of CPUs,"
                        " %(default)s here)")
    s.add_argument("--grace", type=float, default=_env_default("grace", 10.0),
                   help="seconds running handlers get to finish on stop [WSE_SYNC_GRACE]")
    s.add_argument("--reload", action="store_true",
                   default=_env_default("reload", "") not in ("", "0", "false", "no"),
                   help="development: replace the workers when a *.py file under the app's"
                        " directory (or --reload-dir) changes")
    s.add_argument("--reload-dir", action="append", default=None, metavar="DIR",
                   help="a directory to watch with --reload (repeatable)")
    _client_key_flags(s, server_options=True)
    group = s.add_argument_group("WseServer options (flag > WSE_SYNC_<OPTION> > the app's code)")
    for option in OPTIONS:
        if not option.textual or option.name in ("broker_key", "curve_secret"):
            continue
        # (SUPPRESS: absent unless given, so "--health-path off" can mean None)
        group.add_argument(flag_name(option.name), dest="opt_" + option.name,
                           default=argparse.SUPPRESS,
                           metavar=_metavar(option), type=_parser_of(option),
                           help=f"{option.help} [{env_name(option.name)}]"
                                + _shown_default(option.default))
    _log_flags(s, env=True)

    b = sub.add_parser("broker", help="run a broker alone", formatter_class=_Formatter,
                       description="Run a broker alone: workers on any host join it with"
                                   " `wse-sync serve APP --broker ENDPOINT`.")
    b.add_argument("--bind", required=True, help="e.g. tcp://127.0.0.1:5555 or ipc:///tmp/wse")
    _log_flags(b)
    b.add_argument("--parent", type=int, default=None, help=argparse.SUPPRESS)
    b.add_argument("--sync-window", type=float, default=SYNC_WINDOW,
                   help="seconds to hold routed commands after start while workers resend"
                        " their tables (0 for a fresh cluster)")
    b.add_argument("--curve-secret", default=None, metavar="FILE",
                   help="the broker's secret key file (NAME.key_secret; default"
                        " $WSE_SYNC_CURVE_SECRET): CURVE on tcp://")
    b.add_argument("--allow-workers", default=None, metavar="DIR",
                   help="directory of the public keys (*.key) allowed as workers (default"
                        " $WSE_SYNC_ALLOW_WORKERS); reloaded on SIGHUP")
    b.add_argument("--allow-clients", default=None, metavar="DIR",
                   help="directory of the public keys allowed as connect_cluster() clients:"
                        " send, broadcast, drop_client and stats only, no reading of the"
                        " user map (default $WSE_SYNC_ALLOW_CLIENTS); reloaded on SIGHUP")
    b.add_argument("--allow-observers", default=None, metavar="DIR",
                   help="directory of the public keys allowed as connect_cluster() clients"
                        " that may also read the user map (cluster.clients; default"
                        " $WSE_SYNC_ALLOW_OBSERVERS); reloaded on SIGHUP")
    b.add_argument("--insecure", action="store_true",
                   help="allow tcp:// without CURVE keys (anyone who reaches the port joins)")
    b.add_argument("--max-msg-size", type=int, default=None, metavar="BYTES",
                   help="largest frame a peer may send (ZMQ_MAXMSGSIZE; default 64 MiB)")
    b.add_argument("--shard", type=_shard_arg, default=(0, 1), metavar="I/K",
                   help="this broker is shard I of K (0-based): it owns the users whose cid"
                        " hashes to I; workers list the K brokers in shard order in --broker"
                        " (docs/cluster.md, 'Shards')")

    st = sub.add_parser("stats", help="print a broker's users, connections and counters",
                        formatter_class=_Formatter,
                        description="Print a broker's users, connections and counters as"
                                    " JSON. Without --broker: the broker of the local"
                                    " `wse-sync serve` (--port picks one of several).")
    st.add_argument("--broker", default=None,
                    help="the broker's endpoint (K shards: their endpoints, comma-separated:"
                         " the sum, with each shard's answer under \"shards\")")
    st.add_argument("--port", type=int, default=None,
                    help="without --broker: the local serve listening on this port")
    st.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    _client_key_flags(st)

    k = sub.add_parser("keys", help="make a CURVE key pair: DIR/NAME.key and DIR/NAME.key_secret",
                       formatter_class=_Formatter)
    k.add_argument("name", help="e.g. broker, worker1, cron")
    k.add_argument("--dir", required=True, help="where to write them (made 0700 if missing)")
    k.add_argument("--force", action="store_true", help="replace existing files")

    w = sub.add_parser("_worker")  # the supervisor's children (not listed)
    w.add_argument("app")
    w.add_argument("--fd", type=int, required=True)
    w.add_argument("--broker", required=True)
    w.add_argument("--options", default="{}")
    w.add_argument("--grace", type=float, default=10.0)
    _log_flags(w)
    w.add_argument("--ready-fd", type=int, default=None)
    return p


_METAVARS = {"_int": "N", "_limit": "N", "_float": "SECONDS", "_path": "PATH", "_bool": "BOOL",
             "_rate": "RATE[,BURST]", "_list": "A,B,...", "_proxies": "A,B,..."}


def _metavar(option: Any) -> str:
    named = {"host": "HOST", "port": "PORT", "certfile": "FILE", "keyfile": "FILE",
             "broker": "ENDPOINT", "max_message_size": "BYTES", "max_send_queue": "BYTES",
             "broker_max_msg_size": "BYTES", "max_channel_queue_bytes": "BYTES"}
    return named.get(option.name) or _METAVARS.get(option.parse.__name__, "VALUE")


def _parser_of(option: Any) -> Any:
    def parse(text: str) -> Any:
        try:
            return option.parse(text)
        except OptionError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = option.name  # argparse names it in "invalid <name> value"
    return parse


def _shown_default(value: Any) -> str:
    if value is None or value is False:
        return ""
    if isinstance(value, tuple):
        value = ",".join(str(v) for v in value)
    return f" (default: {value})"


def _client_key_flags(p: argparse.ArgumentParser, server_options: bool = False) -> None:
    dest = {"dest": "opt_broker_key"} if server_options else {}
    p.add_argument("--broker-key", default=None, metavar="FILE", **dest,
                   help="the broker's public key file (broker.key; default $WSE_SYNC_BROKER_KEY):"
                        " CURVE to a tcp:// broker; with shards, one for all or one per shard,"
                        " comma-separated in shard order")
    dest = {"dest": "opt_curve_secret"} if server_options else {}
    p.add_argument("--curve-secret", default=None, metavar="FILE", **dest,
                   help="this side's secret key file (NAME.key_secret; default"
                        " $WSE_SYNC_CURVE_SECRET)")


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "keys":
        return _keys(args.name, args.dir, args.force)
    if args.command == "stats":
        return _stats_command(args)
    try:
        # (a WSE_SYNC_LOG_LEVEL default is not checked against the choices by argparse)
        logs.setup(logs.check_level(args.log_level), args.log_format, args.log_config)
    except logs.LogConfigError as exc:
        return _fail(str(exc))
    if args.command == "broker":
        return _broker(args)
    if args.command == "_worker":
        from .worker import run_worker
        return run_worker(args.app, args.fd, args.broker, options=json.loads(args.options),
                          grace=args.grace, ready_fd=args.ready_fd)
    return _serve(args)


def server_options(args: argparse.Namespace, environ: Dict[str, str]) -> Dict[str, Any]:
    """The WseServer options given by WSE_SYNC_<OPTION> and by flags (flags win)."""
    options = from_environ(environ)
    for option in OPTIONS:
        key = "opt_" + option.name
        if hasattr(args, key) and (getattr(args, key) is not None
                                   or option.name not in ("broker_key", "curve_secret")):
            options[option.name] = getattr(args, key)
    return options


def _serve(args: argparse.Namespace) -> int:
    from .supervisor import Supervisor
    from .worker import probe_app

    try:
        options = server_options(args, dict(os.environ))
    except OptionError as exc:
        return _fail(str(exc))
    if args.workers < 1:
        return _fail(f"--workers must be at least 1, not {args.workers}")
    info, error, details = probe_app(args.app)
    if info is None:
        if details.strip().count("\n") > 0:  # a traceback of the app's own code
            sys.stderr.write(details if details.endswith("\n") else details + "\n")
        return _fail(f"cannot load {args.app}: {error}")
    host = options.pop("host", None) or info["host"]
    port = options.pop("port", None)
    port = info["port"] if port is None else port
    if options.get("certfile"):
        from ..integrations.wsgi import tls_context
        try:  # fail here, once, rather than in every worker
            tls_context(options["certfile"], options.get("keyfile"))
        except (OSError, ValueError) as exc:
            return _fail(f"cannot use --certfile/--keyfile: {exc}")
    broker = options.pop("broker", None)
    if broker:
        if not broker.startswith(("tcp://", "ipc://")):
            return _fail(f"--broker {broker!r}: not a tcp:// or ipc:// endpoint")
        from ..cluster.curve import CurveError, shard_keys
        from ..core.shards import split_endpoints
        try:  # here, once, rather than in every worker
            shard_keys(split_endpoints(broker), options.get("broker_key"),
                       options.get("curve_secret"))
        except (CurveError, ValueError) as exc:
            return _fail(str(exc))
    log_args = ["--log-level", args.log_level, "--log-format", args.log_format]
    if args.log_config:
        log_args += ["--log-config", os.path.abspath(args.log_config)]
    reload_dirs = None
    if args.reload:
        reload_dirs = args.reload_dir or [_app_dir(args.app)]
    keys = {k: ",".join(os.path.abspath(p) for p in options[k].split(","))
            for k in ("broker_key", "curve_secret")
            if options.get(k) and all(os.path.isfile(p) for p in options[k].split(","))}
    sup = Supervisor(args.app, host, port, args.workers, broker=broker, options=options,
                     grace=args.grace, log_level=args.log_level, log_args=log_args,
                     reload_dirs=reload_dirs, runinfo=keys)
    try:
        return sup.run()
    except OSError as exc:  # the listening socket
        reason = exc.strerror or str(exc)
        return _fail(f"cannot listen on {host}:{port}: {reason}"
                     + (" (is another server running there? pick another --port)"
                        if exc.errno == 98 else ""))


def _app_dir(spec: str) -> str:
    module = spec.rpartition(":")[0] or spec
    if module.endswith(".py") or os.sep in module:
        return os.path.dirname(os.path.abspath(module)) or os.getcwd()
    return os.getcwd()


def _shard_arg(text: str) -> Tuple[int, int]:
    from ..core.shards import parse_shard
    try:
        return parse_shard(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _broker(args: argparse.Namespace) -> int:
    import signal

    from ..cluster.broker import Broker
    from ..cluster.curve import CurveError, server_curve
    from ..core.messages import MAX_MSG_SIZE

    log = logging.getLogger("wse_sync.broker")
    try:
        curve = server_curve(args.bind, args.curve_secret, args.allow_workers,
                             args.allow_clients, args.insecure,
                             allow_observers=args.allow_observers)
        broker = Broker(args.bind, parent_pid=args.parent, sync_window=args.sync_window,
                        curve=curve, insecure=args.insecure,
                        max_msg_size=args.max_msg_size or MAX_MSG_SIZE, shard=args.shard)
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


def _stats_command(args: argparse.Namespace) -> int:
    endpoint, broker_key, secret = args.broker, args.broker_key, args.curve_secret
    if endpoint is None:
        from . import runfile
        found = [i for i in runfile.live() if args.port in (None, i.get("port"))]
        if not found:
            where = f" on port {args.port}" if args.port else ""
            return _fail(f"no local `wse-sync serve`{where} is running (looked in"
                         f" {runfile.directory()}); give --broker ENDPOINT")
        if len(found) > 1:
            ports = ", ".join(str(i.get("port")) for i in found)
            return _fail(f"{len(found)} local `wse-sync serve` are running (ports {ports}):"
                         " pick one with --port")
        endpoint = found[0]["broker"]
        broker_key = broker_key or found[0].get("broker_key")
        secret = secret or found[0].get("curve_secret")
    return _stats(endpoint, args.timeout, broker_key, secret)


def _stats(endpoint: str, timeout: float, broker_key: Optional[str] = None,
           secret: Optional[str] = None) -> int:
    """Print a broker's stats; for K shards (comma-separated), their sum with
    each shard's answer under "shards" (exit 1 if one did not answer)."""
    from ..cluster.curve import CurveError, shard_keys
    from ..core.shards import merge_stats, split_endpoints

    try:
        endpoints = split_endpoints(endpoint)
    except ValueError as exc:
        return _fail(str(exc))
    try:
        curves = shard_keys(endpoints, broker_key, secret)
    except CurveError as exc:
        return _fail(str(exc))
    answers = [_ask_stats(one, timeout, curve) for one, curve in zip(endpoints, curves)]
    if len(endpoints) == 1:
        if answers[0] is None:
            return 1
        print(json.dumps(answers[0], indent=2, sort_keys=True))
        return 0
    merged = merge_stats(answers)
    if merged is None:
        return 1
    print(json.dumps(merged, indent=2, sort_keys=True))
    return 0 if all(a is not None for a in answers) else 1


def _ask_stats(endpoint: str, timeout: float, curve: Optional[ClientKeys]
               ) -> Optional[Dict[str, Any]]:
    """One broker's ``stats`` answer; None (said on stderr) without one in ``timeout``."""
    import zmq

    from ..core.messages import MAX_MSG_SIZE, decode, encode

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MSG_SIZE)
    try:
        if curve is not None:
            curve.apply(sock)
        sock.connect(endpoint)
        sock.send_multipart(encode("stats"))
        if not sock.poll(timeout * 1000):
            hint = " (is this key allowed by the broker?)" if curve is not None else ""
            print(f"no answer from {endpoint} in {timeout}s{hint}", file=sys.stderr)
            return None
        return decode(sock.recv_multipart()).body
    finally:
        sock.close(0)
        ctx.term()
