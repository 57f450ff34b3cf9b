"""The broker process: a BrokerCore on a ZeroMQ ROUTER socket.

It never imports the application, so one broker serves any app.

On a tcp:// endpoint it speaks CURVE (``curve=``, see ``cluster.curve``)
and serves ZAP in its own poll loop; without keys it refuses to start
unless ``insecure=True``, and then logs a warning. On ipc:// the socket file
is made 0600 (whatever the umask) in a directory made 0700 when it does not
exist, and removed when the broker stops.

Members are named by their links' routing identities less the nonce (see
``core.routes``): the core sees member names, and each member's traffic
goes to the identity that last spoke for it with the member's key.
"""
from __future__ import annotations

import gc
import logging
import os
import stat
import time
from typing import Any, Dict, List, Optional, Tuple

import zmq.constants as zmq_constants

from ..core.broker import HEARTBEAT, WORKER_TIMEOUT, BrokerCore, Out
from ..core.checks import ROLE_WORKER
from ..core.routes import Routes, member_of
from ..core.messages import (MAX_MSG_SIZE, Message, SchemaError, VERSION, batch, decode, encode,
                             split)
from .curve import CurveError, ServerCurve, Zap, needs_curve

__all__ = ["Broker"]

log = logging.getLogger("wse_sync.broker")

# seconds of snapshot parts sent per loop round (then the socket is read again)
PUMP_BUDGET = 0.01
# one ZeroMQ message to a worker carries at most this many bytes (or one larger message)
BATCH_BYTES = 1 << 20
# socket flags as plain ints: pyzmq's enum arithmetic costs more than the call
_NOBLOCK = int(zmq_constants.NOBLOCK)
_SNDMORE = int(zmq_constants.SNDMORE | zmq_constants.NOBLOCK)
_RCVMORE = int(zmq_constants.RCVMORE)
# seconds of reading messages per loop round (then heartbeats and parts get their turn)
READ_BUDGET = 0.05
RCVHWM = 20000
# the cyclic GC's first threshold in the broker process (Python's default is 700)
GC_THRESHOLD = 50000


# connections in the map at the last gc.freeze() (-1: never)
_frozen = {"size": -1}


def tune_gc(size: int = 0, force: bool = False) -> None:
    """The map is large and long-lived, and holds no reference cycles: move what
    is alive out of the cyclic GC's reach (``gc.collect()`` then
    ``gc.freeze()``), so a collection no longer walks a million entries, and
    collect less often. Frozen objects are still freed by reference counting
    when the map lets them go. Freezes again when the map (``size``
    connections) has grown by half since the last time (``force``: now); the
    collection before it only walks what is not frozen yet."""
    gc.set_threshold(GC_THRESHOLD, 50, 100)
    if not hasattr(gc, "freeze"):
        return
    if force or size > 1.5 * _frozen["size"] + 10000:
        gc.collect()
        gc.freeze()
        _frozen["size"] = size


class Broker:
    """Runs a BrokerCore on a ROUTER socket bound to ``endpoint``.

    Works with plain ``zmq`` (its own process) or ``zmq.green`` (a greenlet
    inside a worker, for an embedded single-process server).
    """

    def __init__(self, endpoint: str, zmq_module=None, worker_timeout: float = WORKER_TIMEOUT,
                 heartbeat: float = HEARTBEAT, context=None,
                 parent_pid: Optional[int] = None, sync_window: float = 0.0,
                 curve: Optional[ServerCurve] = None, insecure: bool = False,
                 max_msg_size: int = MAX_MSG_SIZE, shard: Tuple[int, int] = (0, 1)) -> None:
        if zmq_module is None:
            import zmq as zmq_module
        self.zmq = zmq_module
        self.endpoint = endpoint
        self.heartbeat = heartbeat
        self.core = BrokerCore(worker_timeout, sync_window=sync_window, shard=shard)
        self.routes = Routes()
        self._stop = False
        # stop when this process (the supervisor) is gone
        self.parent_pid = parent_pid
        self.ctx = context
        self._own_ctx = context is None
        self.sock = None
        self.curve = curve if needs_curve(endpoint) else None
        self.insecure = insecure
        self.max_msg_size = max_msg_size
        self.zap: Optional[Zap] = None
        self._reload = False
        # the ipc socket file this broker made (removed when it stops)
        self._ipc_path: Optional[str] = None
        # keys of messages refused as no longer allowed (logged once)
        self._revoked: Dict[str, None] = {}

    def bind(self) -> None:
        zmq = self.zmq
        if needs_curve(self.endpoint) and self.curve is None and not self.insecure:
            raise CurveError(f"a broker on {self.endpoint} needs CURVE keys, or insecure=True"
                             " (--insecure)")
        if self.ctx is None:
            self.ctx = zmq.Context()
        if self.curve is not None:
            self.zap = Zap(self.ctx, zmq, self.curve, self.core.counters)
            self.zap.bind()  # before the broker's socket: no handshake goes unchecked
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # messages queued per worker before it must wait (the default, 1000,
        # made busy workers drop heartbeats while this broker caught up)
        self.sock.setsockopt(zmq.RCVHWM, RCVHWM)
        # a peer sending a larger frame is disconnected before it is read
        self.sock.setsockopt(zmq.MAXMSGSIZE, self.max_msg_size)
        if self.curve is not None:
            self.sock.setsockopt(zmq.CURVE_SERVER, 1)
            self.sock.setsockopt(zmq.CURVE_SECRETKEY, self.curve.secret)
            self.sock.setsockopt(zmq.CURVE_PUBLICKEY, self.curve.public)
            self.sock.setsockopt(zmq.ZAP_DOMAIN, b"wse-sync")
        if self.endpoint.startswith("ipc://"):
            self._bind_ipc(self.endpoint[len("ipc://"):])
        else:
            self.sock.bind(self.endpoint)
        shard = self.core.shard
        log.info("broker listening on %s (pid %d)%s%s", self.endpoint, os.getpid(),
                 " with CURVE" if self.curve is not None else "",
                 f" as shard {shard[0]}/{shard[1]}" if shard[1] > 1 else "")
        if needs_curve(self.endpoint) and self.curve is None:
            log.warning("broker on %s runs WITHOUT CURVE (--insecure): anyone who reaches this"
                        " port can join as a worker, read every user's connections and send"
                        " to them, and the traffic is readable on the network", self.endpoint)

    def _bind_ipc(self, path: str) -> None:
        """The socket file 0600 whatever the umask; its directory 0700 when we make it."""
        if not path or path == "*" or path.startswith("@"):  # abstract or wildcard: no file
            self.sock.bind(self.endpoint)
            return
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=0o700, exist_ok=True)
            os.chmod(directory, 0o700)
        else:
            mode = os.stat(directory).st_mode
            if mode & 0o022 and not mode & stat.S_ISVTX:
                log.warning("the broker's ipc directory %s is writable by other users (mode %o)",
                            directory, mode & 0o7777)
        old = os.umask(0o177)
        try:
            self.sock.bind(self.endpoint)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._ipc_path = path

    def stop(self) -> None:
        self._stop = True

    def reload(self) -> None:
        """Read the allowed key directories again (the loop does it: safe from a
        signal handler)."""
        self._reload = True

    def run(self) -> None:
        """Serve until ``stop()``; binds first if needed."""
        zmq = self.zmq
        if self.sock is None:
            self.bind()
        sock = self.sock
        zap = self.zap
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        if zap is not None:
            poller.register(zap.sock, zmq.POLLIN)
        next_tick = time.monotonic() + self.heartbeat
        if self.zmq.__name__ == "zmq":  # its own process (not a greenlet in a worker)
            tune_gc()
        try:
            while not self._stop:
                if self._reload:
                    self._reload = False
                    if zap is not None:
                        zap.reload()
                        self._revoked.clear()
                    else:
                        log.info("SIGHUP: no CURVE keys to reload")
                timeout = max(0.0, next_tick - time.monotonic())
                if self.core.streaming:
                    timeout = 0.0
                ready = dict(poller.poll(min(timeout, 0.2) * 1000))
                if zap is not None and zap.sock in ready:
                    zap.serve()
                if sock in ready:
                    out: Out = []
                    # at most 1000 messages or READ_BUDGET s, then ticks and parts again
                    until = time.monotonic() + READ_BUDGET
                    for _ in range(1000):
                        if time.monotonic() > until:
                            break
                        try:
                            if zap is None:
                                frames = self._recv_frames()
                            else:
                                # the first frame (as a Frame) carries the sender's key
                                first = sock.recv(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        if zap is None:
                            out += self._dispatch(frames)
                        else:
                            frames = [first.bytes]
                            while sock.getsockopt(zmq.RCVMORE):  # the rest is there already
                                frames.append(sock.recv(zmq.NOBLOCK, copy=True))
                            out += self._dispatch_curve(first, frames, zap)
                    # everything this round produced: one message per worker
                    self._send_all(out)
                if self.core.streaming:
                    # snapshot parts, for PUMP_BUDGET s, then the socket again
                    until = time.monotonic() + PUMP_BUDGET
                    while self.core.streaming and time.monotonic() < until:
                        self._send_all(self.core.pump(1))
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + self.heartbeat
                    self._send_all(self.core.tick(now))
                    # (routes of members the core forgot: gone, or declared dead)
                    self.routes.keep(self.core.workers, self.core.limbo)
                    if self.zmq.__name__ == "zmq":
                        tune_gc(len(self.core.registry.conns))
                    if self.parent_pid and os.getppid() != self.parent_pid:
                        log.warning("supervisor %d is gone: broker stops", self.parent_pid)
                        break
        finally:
            sock.close(0)
            if zap is not None:
                zap.close()
            if self._own_ctx:
                self.ctx.term()
            self._remove_ipc()
            log.info("broker stopped")

    def _remove_ipc(self) -> None:
        path, self._ipc_path = self._ipc_path, None
        if path is None:
            return
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        except OSError:
            pass  # gone already

    def _dispatch_curve(self, first: Any, frames: List[bytes], zap: Zap) -> Out:
        """A message on a CURVE socket: its User-Id (the sender's key) gives the role."""
        try:
            user_id = first.get("User-Id")
        except self.zmq.ZMQError:  # no metadata: not a CURVE peer (cannot happen here)
            user_id = None
        role = zap.roles.get(user_id) if user_id else None
        if role is None:
            # allowed at the handshake, removed from the directories since
            self.core.counters["refused.revoked-key"] += 1
            if user_id not in self._revoked:
                self._revoked[user_id] = None
                log.warning("refused messages of %r: its key %s is no longer allowed",
                            frames[0], user_id)
            return []
        return self._dispatch(frames, role, user_id)

    def _dispatch(self, frames: list, role: str = ROLE_WORKER,
                  key: Optional[str] = None) -> Out:
        identity = frames[0].decode("latin-1")
        owner = self.core.owner(member_of(identity)) if key is not None else None
        sender_id = self.routes.speaks(identity, key, owner)
        if sender_id is None:  # a link speaking in another key's member's name
            self.core.identity_taken(identity, key or "")
            return []
        try:
            parts = split(frames[1:])
        except SchemaError as exc:
            self.core.counters["dropped.malformed"] += 1
            log.warning("dropped a malformed batch on the broker socket: %s", exc)
            return []
        out: Out = []
        messages: List[Message] = []
        for part in parts:
            try:
                messages.append(decode(part))
            except SchemaError as exc:
                self.core.counters["dropped.malformed"] += 1
                if part[:1] and part[0] != VERSION and part[0][:3] == b"wse":
                    log.error("refused a peer speaking schema %r (this broker speaks %r)",
                              part[0][:16], VERSION)
                    out += self.core.handle_all(sender_id, messages, time.monotonic(), role, key)
                    messages = []
                    out.append((sender_id, Message("refused", {"version": VERSION.decode()})))
                else:
                    log.warning("dropped a malformed message on the broker socket: %s", exc)
        if messages:
            out += self.core.handle_all(sender_id, messages, time.monotonic(), role, key)
        return out

    def _send_all(self, out: Out) -> None:
        """Send in order, one ZeroMQ message per worker (of at most BATCH_BYTES,
        or one larger message); a message going to several workers (a
        broadcast) is encoded once."""
        per_worker: Dict[str, List[List[bytes]]] = {}
        encoded: Dict[int, List[bytes]] = {}
        for worker_id, msg in out:
            frames = encoded.get(id(msg))
            if frames is None:
                frames = encoded[id(msg)] = encode(msg.kind, msg.body, msg.data)
                if len(frames[2]) > self.max_msg_size:
                    log.error("a %r message of %d bytes is over the max message size (%d):"
                              " its worker will drop the link (raise --max-msg-size here and"
                              " broker_max_msg_size in the workers)", msg.kind, len(frames[2]),
                              self.max_msg_size)
            messages = per_worker.get(worker_id)
            if messages is None:
                messages = per_worker[worker_id] = []
            messages.append(frames)
        for worker_id, messages in per_worker.items():
            ident = self.routes.identity(worker_id).encode("latin-1")
            start, size = 0, 0
            for i, frames in enumerate(messages):
                # (the body and the data: the version, kind and flag are a few bytes)
                size += len(frames[2]) + (len(frames[4]) if len(frames) == 5 else 0)
                if size >= BATCH_BYTES:
                    self._send(ident, batch(messages[start:i + 1]), i + 1 - start)
                    start, size = i + 1, 0
            if start < len(messages):
                self._send(ident, batch(messages[start:]), len(messages) - start)

    def _recv_frames(self) -> List[bytes]:
        """sock.recv_multipart(NOBLOCK) without its per-frame enum arithmetic
        (a tenth of the broker's CPU when routing)."""
        recv, more = self.sock.recv, self.sock.get
        frames = [recv(_NOBLOCK)]
        while more(_RCVMORE):
            frames.append(recv(_NOBLOCK))
        return frames

    def _send(self, ident: bytes, frames: List[bytes], count: int = 1) -> None:
        send = self.sock.send
        try:
            # send_multipart(NOBLOCK), with int flags (see _recv_frames)
            send(ident, _SNDMORE)
            for f in frames[:-1]:
                send(f, _SNDMORE)
            send(frames[-1], _NOBLOCK)
        except self.zmq.ZMQError as exc:
            # unreachable peer (gone) or its queue is full: counted, logged
            self.core.counters["dropped.unroutable"] += count
            # (the member's name: its link's identity stays out of the logs too)
            log.warning("could not deliver %d message(s) to %r: %s", count,
                        member_of(ident.decode("latin-1")), exc)
