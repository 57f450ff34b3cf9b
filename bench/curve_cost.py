"""What CURVE costs the broker per routed message.

    python bench/curve_cost.py [--messages 40000] [--rounds 3] [--batch 1,32]

Starts `wse-sync broker` twice per round on 127.0.0.1, once ``--insecure``
and once with CURVE keys (made here, in a temporary directory), rounds
interleaved so both see the same machine. Two raw DEALER peers say hello as
workers; the second holds user ``u``; the first sends ``send`` commands to
``u`` (a 64-byte frame each), one ZeroMQ message per command (``--batch 1``,
the worst case for CURVE: one encryption per message each way) or
``--batch N`` commands per ZeroMQ message, as a busy worker batches what one
event-loop turn produced. The figure is the broker process's CPU time
(utime + stime from /proc) per routed ``send``, median of the rounds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import zmq
import zmq.auth

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from wse_sync.cluster.curve import write_keys  # noqa: E402
from wse_sync.core.messages import batch, decode, encode, split  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
FRAME = '["msg",' + '"' + "x" * 50 + '",null]'  # 64 bytes


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Peer:
    def __init__(self, ctx: zmq.Context, endpoint: str, identity: bytes,
                 keys: Optional[Tuple[bytes, bytes, bytes]]) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, identity)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        if keys is not None:
            server, public, secret = keys
            self.sock.curve_serverkey = server
            self.sock.curve_publickey = public
            self.sock.curve_secretkey = secret
        self.sock.connect(endpoint)

    def send(self, kind: str, body: Dict, data=None) -> None:
        self.sock.send_multipart(encode(kind, body, data))

    def wait(self, kind: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sock.poll(100):
                for part in split(self.sock.recv_multipart()):
                    if decode(part).kind == kind:
                        return
        raise SystemExit(f"no {kind!r} from the broker")

    def drain(self, kind: str) -> int:
        """Messages of ``kind`` waiting now."""
        n = 0
        while self.sock.poll(0):
            for part in split(self.sock.recv_multipart(copy=True)):
                if part[1] == kind.encode():
                    n += 1
        return n


def run_once(curve: bool, keys_dir: str, messages: int, per_batch: int) -> float:
    """Broker CPU µs per routed send."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    argv = [sys.executable, "-m", "wse_sync", "broker", "--bind", endpoint, "--sync-window", "0",
            "--log-level", "warning"]
    if curve:
        argv += ["--curve-secret", os.path.join(keys_dir, "broker.key_secret"),
                 "--allow-workers", os.path.join(keys_dir, "workers")]
    else:
        argv += ["--insecure"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    broker = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    ctx = zmq.Context()
    try:
        keys = None
        if curve:
            server = zmq.auth.load_certificate(os.path.join(keys_dir, "broker.key"))[0]
            public, secret = zmq.auth.load_certificate(
                os.path.join(keys_dir, "workers", "bench.key_secret"))
            keys = (server, public, secret)
        sender = Peer(ctx, endpoint, b"w-sender", keys)
        receiver = Peer(ctx, endpoint, b"w-receiver", keys)
        deadline = time.monotonic() + 10
        while True:  # the broker may still be starting
            sender.send("hello", {"pid": 1, "table": []})
            if sender.sock.poll(300):
                break
            if time.monotonic() > deadline:
                raise SystemExit("the broker did not answer")
        sender.wait("snapshot")
        receiver.send("hello", {"pid": 2, "table": [["c1", "u", None, 1.0]]})
        receiver.wait("snapshot")
        seq = [0]

        def burst(n: int) -> None:
            sent = got = 0
            last_hb = time.monotonic()
            while sent < n:
                chunk = []
                for _ in range(min(per_batch, n - sent)):
                    seq[0] += 1
                    chunk.append(encode("send", {"cid": "u", "seq": seq[0]}, FRAME))
                sender.sock.send_multipart(batch(chunk))
                sent += len(chunk)
                if sent - got >= 2000:  # a window: never let queues grow
                    while sent - got > 500:
                        receiver.sock.poll(100)
                        got += receiver.drain("deliver")
                if time.monotonic() - last_hb > 0.5:
                    last_hb = time.monotonic()
                    sender.send("hb", {})
                    receiver.send("hb", {})
            deadline = time.monotonic() + 30
            while got < n and time.monotonic() < deadline:
                receiver.sock.poll(100)
                got += receiver.drain("deliver")
            if got < n:
                raise SystemExit(f"only {got} of {n} deliveries arrived")

        burst(min(2000, messages))  # warm up
        before = cpu_seconds(broker.pid)
        burst(messages)
        used = cpu_seconds(broker.pid) - before
        return used / messages * 1e6
    finally:
        ctx.destroy(0)
        broker.terminate()
        broker.wait(10)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--messages", type=int, default=40000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", default="1,32", help="commands per ZeroMQ message (list)")
    args = p.parse_args(argv)
    keys_dir = tempfile.mkdtemp(prefix="wse-curve-bench-")
    write_keys("broker", keys_dir)
    write_keys("bench", os.path.join(keys_dir, "workers"))
    print(f"broker CPU µs per routed send, {args.messages} sends, median of {args.rounds}"
          f" interleaved rounds\n")
    print("| commands per ZeroMQ message | without CURVE | with CURVE | CURVE costs |")
    print("| --- | --- | --- | --- |")
    for per_batch in (int(b) for b in args.batch.split(",")):
        plain: List[float] = []
        secured: List[float] = []
        for _ in range(args.rounds):
            plain.append(run_once(False, keys_dir, args.messages, per_batch))
            secured.append(run_once(True, keys_dir, args.messages, per_batch))
        a, b = statistics.median(plain), statistics.median(secured)
        print(f"| {per_batch} | {a:.1f} | {b:.1f} | +{b - a:.1f} µs ({(b / a - 1) * 100:+.0f} %) |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
