"""CURVE on the broker's tcp:// links: key files, the peers' keys, the ZAP handler.

Key files are pyzmq's certificates (``zmq.auth.load_certificate`` reads
them): ``NAME.key`` holds a public key, ``NAME.key_secret`` (mode 0600) the
public and the secret key. ``wse-sync keys NAME --dir DIR`` writes a pair.

- The broker has a secret key; its public key is given to every worker and
  handle (``--broker-key``). It allows the public keys found in three
  directories: ``--allow-workers`` (the worker role), ``--allow-clients``
  (the client role of ``connect_cluster()`` handles: send, broadcast, drop,
  stats) and ``--allow-observers`` (a client that may also read the user
  map); see ``core.checks``.
- Each worker or handle has a secret key of its own (``--curve-secret``).

CURVE is used on every endpoint but ``ipc://`` and ``inproc://``: those stay
within one host (an ipc socket is a 0600 file) and need no keys; keys given
for them are not used, and every peer there has the worker role.

The ZAP handler (``Zap``) is a ROUTER socket bound to
``inproc://zeromq.zap.01`` in the broker's context, served from the broker's
own poll loop (so it works in a plain process and, with ``zmq.green``, in a
greenlet: pyzmq's ThreadAuthenticator does not run under gevent's
monkey-patching). libzmq asks it about each new peer during the CURVE
handshake; a peer whose key is in neither directory is refused there and
never gets a byte of the cluster. The reply's User-Id is the peer's public
key (Z85): the broker reads it from every message (``frame.get("User-Id")``)
and looks its role up, so a key removed from the directories (``reload()``,
on SIGHUP) loses its rights at once, even on a connection already made.
"""
from __future__ import annotations

import datetime
import glob
import logging
import os
from typing import Any, Dict, List, MutableMapping, NamedTuple, Optional, Sequence, Tuple

import zmq
from zmq.utils import z85

from ..core.checks import ROLE_CLIENT, ROLE_OBSERVER, ROLE_WORKER

__all__ = ["CurveError", "ClientKeys", "ServerCurve", "Zap", "needs_curve", "write_keys",
           "split_keys", "shard_keys",
           "load_public", "load_secret", "load_key_dir", "client_keys", "server_curve",
           "ZAP_ENDPOINT"]

log = logging.getLogger("wse_sync.curve")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_VERSION = b"1.0"
# keys whose refusal was logged (then only counted); the oldest are forgotten beyond this
LOGGED_KEYS_MAX = 10000

ENV_BROKER_KEY = "WSE_SYNC_BROKER_KEY"
ENV_SECRET = "WSE_SYNC_CURVE_SECRET"
ENV_ALLOW_WORKERS = "WSE_SYNC_ALLOW_WORKERS"
ENV_ALLOW_CLIENTS = "WSE_SYNC_ALLOW_CLIENTS"
ENV_ALLOW_OBSERVERS = "WSE_SYNC_ALLOW_OBSERVERS"


class CurveError(ValueError):
    """Keys missing, unreadable or not of CURVE; the message says which and how to fix it."""


def needs_curve(endpoint: str) -> bool:
    """True for an endpoint that leaves the host (tcp://...): it takes CURVE keys."""
    return not endpoint.startswith(("ipc://", "inproc://"))


# -- key files ---------------------------------------------------------------------
_BANNER = """#   ****  Generated on {when} by wse-sync (pyzmq's certificate format)  ****
#   ZeroMQ CURVE {what}
{advice}
metadata
curve
    public-key = "{public}"
"""
_PUBLIC_ADVICE = ("#   Give this file to the broker (its --allow-workers or --allow-clients\n"
                  "#   directory) or, for the broker's own key, to every worker (--broker-key).\n")
_SECRET_ADVICE = "#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.\n"


def write_keys(name: str, directory: str, force: bool = False) -> Tuple[str, str]:
    """Write DIR/NAME.key (public, 0644) and DIR/NAME.key_secret (0600); the
    directory is made 0700 when it does not exist. Returns both paths."""
    if not name or os.sep in name or name.startswith(".") or (os.altsep and os.altsep in name):
        raise CurveError(f"the key name {name!r} must be a plain file name")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    public_path = os.path.join(directory, name + ".key")
    secret_path = os.path.join(directory, name + ".key_secret")
    if not force:
        for path in (public_path, secret_path):
            if os.path.exists(path):
                raise CurveError(f"{path} exists (--force replaces it)")
    public, secret = zmq.curve_keypair()
    when = datetime.datetime.now().isoformat(timespec="seconds")
    text = _BANNER.format(when=when, what="Public Certificate", advice=_PUBLIC_ADVICE,
                          public=public.decode("ascii"))
    _write(public_path, text, 0o644)
    text = _BANNER.format(when=when, what="**Secret** Certificate", advice=_SECRET_ADVICE,
                          public=public.decode("ascii"))
    text += f'    secret-key = "{secret.decode("ascii")}"\n'
    _write(secret_path, text, 0o600)
    return public_path, secret_path


def _write(path: str, text: str, mode: int) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask
        os.write(fd, text.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _z85_key(value: Any, what: str) -> bytes:
    key = value.encode("ascii") if isinstance(value, str) else bytes(value)
    try:
        if len(key) != 40 or len(z85.decode(key)) != 32:
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise CurveError(f"{what} is not a CURVE key (40 Z85 characters)") from None
    return key


def _load(path: str) -> Tuple[bytes, Optional[bytes]]:
    from zmq.auth import load_certificate
    try:
        public, secret = load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CurveError(f"cannot read the key file {path}: {exc}") from None
    return (_z85_key(public, f"the public key in {path}"),
            None if secret is None else _z85_key(secret, f"the secret key in {path}"))


def _is_key_text(spec: Any) -> bool:
    return isinstance(spec, (bytes, str)) and len(spec) == 40 and not os.path.exists(spec)


def load_public(spec: Any) -> bytes:
    """A public key: a key file (NAME.key or NAME.key_secret) or the 40-character key."""
    if _is_key_text(spec):
        return _z85_key(spec, "the key given")
    return _load(os.fspath(spec))[0]


def load_secret(spec: Any) -> Tuple[bytes, bytes]:
    """(public, secret): a NAME.key_secret file or the 40-character secret key."""
    if _is_key_text(spec):
        secret = _z85_key(spec, "the secret key given")
        return zmq.curve_public(secret), secret
    path = os.fspath(spec)
    public, secret = _load(path)
    if secret is None:
        raise CurveError(f"{path} holds no secret key (give the NAME.key_secret file)")
    mode = os.stat(path).st_mode
    if mode & 0o077:
        log.warning("the secret key file %s can be read by other users (mode %o): chmod 600 it",
                    path, mode & 0o777)
    return public, secret


def load_key_dir(directory: str) -> Dict[bytes, str]:
    """The public keys of the ``*.key`` files in ``directory``: key -> file.
    A file that is not a key is skipped with a warning."""
    if not os.path.isdir(directory):
        raise CurveError(f"{directory} is not a directory of public keys (*.key files)")
    keys: Dict[bytes, str] = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.key"))):
        try:
            keys[_load(path)[0]] = path
        except CurveError as exc:
            log.warning("skipped %s", exc)
    return keys


# -- the two sides -------------------------------------------------------------------
class ClientKeys(NamedTuple):
    """A worker's or handle's keys for one broker."""
    server: bytes   # the broker's public key
    public: bytes
    secret: bytes

    def apply(self, sock: Any) -> None:
        """Make ``sock`` a CURVE client (before it connects)."""
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)


_warned_plain: Dict[str, None] = {}


def client_keys(endpoint: str, broker_key: Any = None, secret: Any = None,
                env: Optional[MutableMapping[str, str]] = None) -> Optional[ClientKeys]:
    """The keys to join ``endpoint`` with: the arguments, else WSE_SYNC_BROKER_KEY
    and WSE_SYNC_CURVE_SECRET. None for ipc/inproc, and for tcp without keys
    (logged: only a broker started with --insecure takes such a peer)."""
    if not needs_curve(endpoint):
        return None
    env = os.environ if env is None else env
    broker_key = broker_key or env.get(ENV_BROKER_KEY) or None
    secret = secret or env.get(ENV_SECRET) or None
    if broker_key is None and secret is None:
        if endpoint not in _warned_plain:
            _warned_plain[endpoint] = None
            log.warning("joining broker %s without CURVE (no broker key and secret): only a"
                        " broker started with --insecure accepts this, and anyone on the"
                        " network path can read and forge the cluster's traffic", endpoint)
        return None
    if broker_key is None or secret is None:
        missing = "broker key (--broker-key, broker_key=, $WSE_SYNC_BROKER_KEY)" \
            if broker_key is None else "secret key (--curve-secret, secret=, $WSE_SYNC_CURVE_SECRET)"
        raise CurveError(f"CURVE to {endpoint} needs both keys: the {missing} is missing")
    public, own_secret = load_secret(secret)
    return ClientKeys(load_public(broker_key), public, own_secret)


def split_keys(broker_key: Any, count: int) -> List[Any]:
    """One broker key per shard: one key (a file or 40 characters) for all, or
    ``count`` of them, comma-separated or a list, in the broker list's order."""
    if isinstance(broker_key, (list, tuple)):
        keys = list(broker_key)
    elif isinstance(broker_key, str) and "," in broker_key:
        keys = [k.strip() for k in broker_key.split(",")]
    else:
        return [broker_key] * count
    if len(keys) != count:
        raise CurveError(f"{len(keys)} broker keys for {count} broker(s): give one key for"
                         " all, or one per broker in the order of the broker list")
    return keys


def shard_keys(endpoints: Sequence[str], broker_key: Any = None, secret: Any = None,
               env: Optional[MutableMapping[str, str]] = None) -> List[Optional[ClientKeys]]:
    """``client_keys`` for each endpoint of a broker list (``split_keys``: one
    broker key for all, or one each; WSE_SYNC_BROKER_KEY alike)."""
    env = os.environ if env is None else env
    keys = split_keys(broker_key or env.get(ENV_BROKER_KEY) or None, len(endpoints))
    return [client_keys(e, k, secret, env) for e, k in zip(endpoints, keys)]


class ServerCurve(NamedTuple):
    """A broker's CURVE configuration."""
    public: bytes
    secret: bytes
    workers_dir: str
    clients_dir: Optional[str]
    observers_dir: Optional[str] = None


def server_curve(endpoint: str, secret: Any = None, allow_workers: Optional[str] = None,
                 allow_clients: Optional[str] = None, insecure: bool = False,
                 env: Optional[MutableMapping[str, str]] = None,
                 allow_observers: Optional[str] = None) -> Optional[ServerCurve]:
    """The broker's CURVE setup for ``endpoint``, from the arguments or the
    environment (WSE_SYNC_CURVE_SECRET, WSE_SYNC_ALLOW_WORKERS,
    WSE_SYNC_ALLOW_CLIENTS, WSE_SYNC_ALLOW_OBSERVERS). None for ipc/inproc,
    and for tcp with ``insecure`` and no keys; CurveError for tcp without
    keys otherwise."""
    if not needs_curve(endpoint):
        return None
    env = os.environ if env is None else env
    secret = secret or env.get(ENV_SECRET) or None
    allow_workers = allow_workers or env.get(ENV_ALLOW_WORKERS) or None
    allow_clients = allow_clients or env.get(ENV_ALLOW_CLIENTS) or None
    allow_observers = allow_observers or env.get(ENV_ALLOW_OBSERVERS) or None
    if secret is None:
        if insecure:
            return None
        raise CurveError(
            f"a broker on {endpoint} needs CURVE keys: --curve-secret DIR/broker.key_secret and"
            " --allow-workers DIR (wse-sync keys NAME --dir DIR makes them), or --insecure to"
            " run without (anyone who reaches the port joins the cluster)")
    if allow_workers is None:
        raise CurveError("--curve-secret needs --allow-workers DIR (the workers' public *.key"
                         " files)")
    public, own_secret = load_secret(secret)
    for directory in (allow_workers, allow_clients, allow_observers):
        if directory is not None and not os.path.isdir(directory):
            raise CurveError(f"{directory} is not a directory of public keys (*.key files)")
    return ServerCurve(public, own_secret, allow_workers, allow_clients, allow_observers)


# -- the ZAP handler -----------------------------------------------------------------
class Zap:
    """ZAP (ZeroMQ's authentication protocol) for one broker socket; see the module doc.

    ``serve()`` answers every waiting request without blocking; the broker
    calls it when ``sock`` is readable. ``roles`` maps an allowed key (Z85
    text, the User-Id of its messages) to its role.
    """

    def __init__(self, ctx: Any, zmq_module: Any, curve: ServerCurve,
                 counters: MutableMapping[str, int]) -> None:
        self.zmq = zmq_module
        self.ctx = ctx
        self.curve = curve
        self.counters = counters
        self.roles: Dict[str, str] = {}
        self.sock: Any = None
        self._logged: Dict[bytes, None] = {}
        self.reload()

    def bind(self) -> None:
        """Bind before the broker's socket: libzmq lets any key in while no
        handler is bound."""
        sock = self.ctx.socket(self.zmq.ROUTER)
        sock.setsockopt(self.zmq.LINGER, 0)
        sock.bind(ZAP_ENDPOINT)
        self.sock = sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None

    def reload(self) -> None:
        """Read the allowed keys again (SIGHUP); on an error keep the ones in force."""
        curve = self.curve
        try:
            workers = load_key_dir(curve.workers_dir)
            clients = load_key_dir(curve.clients_dir) if curve.clients_dir else {}
            observers = load_key_dir(curve.observers_dir) if curve.observers_dir else {}
        except CurveError as exc:
            log.error("allowed keys not reloaded (the previous ones stay): %s", exc)
            return
        # a key in several directories has the widest role of them
        roles = {k.decode("ascii"): ROLE_CLIENT for k in clients}
        roles.update((k.decode("ascii"), ROLE_OBSERVER) for k in observers)
        both = [path for k, path in workers.items() if k in clients or k in observers]
        if both:
            log.warning("%d key(s) are in --allow-workers and another --allow-* directory"
                        " (e.g. %s): they have the worker role", len(both), both[0])
        roles.update((k.decode("ascii"), ROLE_WORKER) for k in workers)
        self.roles = roles
        self._logged.clear()
        log.info("CURVE: %d worker key(s) from %s, %d client key(s)%s, %d observer key(s)%s",
                 len(workers), curve.workers_dir, len(clients),
                 f" from {curve.clients_dir}" if curve.clients_dir else "", len(observers),
                 f" from {curve.observers_dir}" if curve.observers_dir else "")
        if not workers:
            log.warning("no worker key in %s: no worker can join", self.curve.workers_dir)

    def serve(self) -> None:
        zmq = self.zmq
        while True:
            try:
                request = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            reply = self._answer(request)
            if reply is not None:
                try:
                    self.sock.send_multipart(reply, zmq.NOBLOCK)
                except zmq.ZMQError as exc:  # the handshake has gone meanwhile
                    log.debug("ZAP reply not sent: %s", exc)

    def _answer(self, request: list) -> Optional[list]:
        # [zap peer, b"", version, request id, domain, address, identity, mechanism, creds...]
        if len(request) < 8 or request[1] != b"":
            log.error("dropped a malformed ZAP request (%d frames)", len(request))
            return None
        head = request[:2]
        version, request_id, _domain, address, _identity, mechanism = request[2:8]
        credentials = request[8:]

        def reply(status: bytes, text: bytes, user_id: bytes = b"") -> list:
            return head + [ZAP_VERSION, request_id, status, text, user_id, b""]

        if version != ZAP_VERSION:
            return reply(b"400", b"unknown ZAP version")
        peer = address.decode("utf-8", "replace")
        if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            self.counters["refused.no-curve"] += 1
            log.warning("refused a peer at %s: %s instead of CURVE", peer,
                        mechanism.decode("ascii", "replace")[:16])
            return reply(b"400", b"CURVE required")
        key = z85.encode(credentials[0])
        user_id = key.decode("ascii")
        if user_id in self.roles:
            return reply(b"200", b"OK", key)
        self.counters["refused.unknown-key"] += 1
        if key not in self._logged:
            if len(self._logged) >= LOGGED_KEYS_MAX:
                del self._logged[next(iter(self._logged))]
            self._logged[key] = None
            log.warning("refused a peer at %s with an unknown CURVE key %s (not in the allowed"
                        " directories; counted as 'refused.unknown-key', logged once per key)",
                        peer, user_id)
        return reply(b"400", b"unknown key")
