"""The broker process: a BrokerCore on a ZeroMQ ROUTER socket.

It never imports the application, so one broker serves any app.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Dict, List, Optional

from ..core.broker import HEARTBEAT, WORKER_TIMEOUT, BrokerCore, Out
from ..core.messages import Message, SchemaError, VERSION, batch, decode, encode, split

__all__ = ["Broker"]

log = logging.getLogger("wse_sync.broker")

class Broker:
    """Runs a BrokerCore on a ROUTER socket bound to ``endpoint``.

    Works with plain ``zmq`` (its own process) or ``zmq.green`` (a greenlet
    inside a worker, for an embedded single-process server).
    """

    def __init__(self, endpoint: str, zmq_module=None, worker_timeout: float = WORKER_TIMEOUT,
                 heartbeat: float = HEARTBEAT, context=None,
                 parent_pid: Optional[int] = None, sync_window: float = 0.0) -> None:
        if zmq_module is None:
            import zmq as zmq_module
        self.zmq = zmq_module
        self.endpoint = endpoint
        self.heartbeat = heartbeat
        self.core = BrokerCore(worker_timeout, sync_window=sync_window)
        self._stop = False
        # stop when this process (the supervisor) is gone
        self.parent_pid = parent_pid
        self.ctx = context
        self._own_ctx = context is None
        self.sock = None

    def bind(self) -> None:
        zmq = self.zmq
        if self.ctx is None:
            self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.bind(self.endpoint)
        log.info("broker listening on %s (pid %d)", self.endpoint, os.getpid())

    def stop(self) -> None:
        self._stop = True

    def run(self) -> None:
        """Serve until ``stop()``; binds first if needed."""
        zmq = self.zmq
        if self.sock is None:
            self.bind()
        sock = self.sock
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        next_tick = time.monotonic() + self.heartbeat
        try:
            while not self._stop:
                timeout = max(0.0, next_tick - time.monotonic())
                if poller.poll(min(timeout, 0.2) * 1000):
                    out: Out = []
                    for _ in range(1000):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=True)
                        except zmq.Again:
                            break
                        out += self._dispatch(frames)
                    # everything this round produced: one message per worker
                    self._send_all(out)
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + self.heartbeat
                    self._send_all(self.core.tick(now))
                    if self.parent_pid and os.getppid() != self.parent_pid:
                        log.warning("supervisor %d is gone: broker stops", self.parent_pid)
                        break
        finally:
            sock.close(0)
            if self._own_ctx:
                self.ctx.term()
            log.info("broker stopped")

    def _dispatch(self, frames: list) -> Out:
        sender = frames[0]
        sender_id = sender.decode("latin-1")
        try:
            parts = split(frames[1:])
        except SchemaError as exc:
            self.core.counters["dropped.malformed"] += 1
            log.warning("dropped a malformed batch on the broker socket: %s", exc)
            return []
        out: Out = []
        for part in parts:
            try:
                msg = decode(part)
            except SchemaError as exc:
                self.core.counters["dropped.malformed"] += 1
                if part[:1] and part[0] != VERSION and part[0][:3] == b"wse":
                    log.error("refused a peer speaking schema %r (this broker speaks %r)",
                              part[0][:16], VERSION)
                    out.append((sender_id, Message("refused", {"version": VERSION.decode()})))
                else:
                    log.warning("dropped a malformed message on the broker socket: %s", exc)
                continue
            out += self.core.handle(sender_id, msg, time.monotonic())
        return out

    def _send_all(self, out: Out) -> None:
        """Send in order, one ZeroMQ message per worker; a message going to several
        workers (a broadcast) is encoded once."""
        per_worker: Dict[str, List[List[bytes]]] = {}
        encoded: Dict[int, List[bytes]] = {}
        for worker_id, msg in out:
            frames = encoded.get(id(msg))
            if frames is None:
                frames = encoded[id(msg)] = encode(msg.kind, msg.body, msg.data)
            per_worker.setdefault(worker_id, []).append(frames)
        for worker_id, messages in per_worker.items():
            self._send(worker_id.encode("latin-1"), batch(messages), len(messages))

    def _send(self, ident: bytes, frames: List[bytes], count: int = 1) -> None:
        try:
            self.sock.send_multipart([ident] + frames, self.zmq.NOBLOCK)
        except self.zmq.ZMQError as exc:
            # unreachable peer (gone) or its queue is full: counted, logged
            self.core.counters["dropped.unroutable"] += count
            log.warning("could not deliver %d message(s) to %r: %s", count, ident, exc)
