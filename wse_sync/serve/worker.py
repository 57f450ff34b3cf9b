"""A worker process: load the app, serve on an inherited socket, join the broker.

Started by the supervisor as ``wse_sync _worker ...`` (core/children.py); the app is
imported here, after the process started, so module state is per worker.
"""
from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import socket
import sys
from typing import Any, Callable, Dict, Optional, Tuple

__all__ = ["run_worker", "load_app", "probe_app"]

log = logging.getLogger("wse_sync.worker")


def load_app(spec: str) -> Any:
    """``MODULE:ATTR`` or ``path/to/file.py:ATTR`` -> the WseServer (or what a
    factory function named by ATTR returns)."""
    import importlib
    import importlib.util

    from ..worker.server import WseServer

    module_name, sep, attr = spec.rpartition(":")
    if not sep:
        module_name, attr = spec, "server"
    if module_name.endswith(".py") or os.sep in module_name:
        path = os.path.abspath(module_name)
        if not os.path.isfile(path):
            raise SystemExit(f"wse-sync: no such file: {module_name}")
        sys.path.insert(0, os.path.dirname(path))
        name = os.path.splitext(os.path.basename(path))[0]
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise SystemExit(f"cannot load {path}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    else:
        sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                raise SystemExit(f"wse-sync: no module named {module_name!r}") from None
            raise
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise SystemExit(f"{module_name} has no attribute {attr!r}") from None
    if not isinstance(obj, WseServer) and callable(obj):
        obj = obj()
    if not isinstance(obj, WseServer):
        raise SystemExit(f"{spec} is not a WseServer")
    return obj


def probe_app(spec: str) -> Tuple[Optional[Dict[str, Any]], Optional[str], str]:
    """Load the app in a throwaway process (never import it before a fork):
    ({"host", "port"} of its options, None, ""), or (None, what went wrong in
    one line, the whole stderr)."""
    import json
    import subprocess

    from ..core.children import python_code

    code = ("import json,sys;from wse_sync.serve.worker import load_app;"
            "s=load_app(sys.argv[1]);print(json.dumps({'host':s.config.host,"
            "'port':s.config.port}))")
    out = subprocess.run(python_code(code, spec), capture_output=True, text=True)
    if out.returncode != 0:
        lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit code {out.returncode}"
        if last.startswith("wse-sync: "):
            last = last[len("wse-sync: "):]
        return None, last, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1]), None, ""


def tune_gc(threshold: int) -> None:
    """Each handshake leaves dozens of long-lived, gc-tracked objects: with
    thousands of connections, Python's default gen-0 threshold (700) walks them
    again and again (~30 % of a handshake's CPU in a profile, docs/performance.md).
    Freeze what is alive now (the app, its imports) out of the collector's
    reach and collect gen 0 after ``threshold`` allocations; cyclic garbage is
    still collected, just in larger rounds. 0 leaves the GC alone."""
    if threshold <= 0:
        return
    gc.collect()
    if hasattr(gc, "freeze"):
        gc.freeze()
    gc.set_threshold(threshold, 50, 100)


# seconds between two returns of free heap memory to the system (glibc)
TRIM_EVERY = 10.0


def memory_trimmer() -> Optional[Callable[[], None]]:
    """glibc keeps the heap a burst of connections grew (freed, but held as
    the process's RSS): ``malloc_trim(0)`` gives the free part back. None
    where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0) and None


def run_worker(app_spec: str, fd: int, broker: str, worker_id: Optional[str] = None,
               options: Optional[dict] = None, grace: float = 10.0,
               ready_fd: Optional[int] = None) -> int:
    from gevent import monkey

    # handlers may block on sockets, sleep, DNS...: only their greenlet must wait
    monkey.patch_all()
    import gevent

    from ..integrations.wsgi import make_wsgi_server

    server = load_app(app_spec)
    # flags and WSE_SYNC_<OPTION> (parsed by the CLI) over the app's own values
    server.configure(**(options or {}))
    listener = socket.socket(fileno=fd)
    from ..cluster.curve import CurveError
    try:
        server.start(broker=broker, worker_id=worker_id)
    except CurveError as exc:
        log.error("worker %d not started: %s", os.getpid(), exc)
        return 2
    http = make_wsgi_server(server, listener)  # TLS from the options, context built once
    http.start()
    tune_gc(server.config.gc_threshold)
    trim = memory_trimmer()
    if trim is not None:  # (a timer of the loop: ~1 ms per call on a 50 MB heap)
        trimmer = gevent.get_hub().loop.timer(TRIM_EVERY, TRIM_EVERY)
        trimmer.start(trim)
    log.info("worker %d serving %s on %s", os.getpid(), app_spec, listener.getsockname())
    if ready_fd is not None:
        try:
            os.write(ready_fd, b"1")
        except OSError:  # nobody waits for this worker's readiness
            pass
        os.close(ready_fd)
    stopping = gevent.event.Event()

    def on_signal() -> None:
        stopping.set()

    def on_replaced() -> None:
        # a rolling restart: the new workers accept from now on, so that the
        # clients this one closes next reconnect once, to a new worker
        log.info("worker %d replaced: no longer accepting connections", os.getpid())
        http.stop_accepting()

    gevent.signal_handler(signal.SIGTERM, on_signal)
    gevent.signal_handler(signal.SIGINT, on_signal)
    gevent.signal_handler(signal.SIGUSR2, on_replaced)
    parent = os.getppid()

    def watch_parent() -> None:
        while os.getppid() == parent:
            gevent.sleep(1)
        log.warning("supervisor is gone: worker %d stops", os.getpid())
        stopping.set()

    gevent.spawn(watch_parent)
    stopping.wait()
    log.info("worker %d stopping: closing connections with 1012", os.getpid())
    http.stop_accepting()
    try:
        listener.close()
    except OSError:
        pass
    server.shutdown(1012, "", timeout=grace)
    http.stop(timeout=1)
    log.info("worker %d stopped", os.getpid())
    return 0
