"""Where the bytes of an idle authenticated connection go: tracemalloc in one process.

    PYTHONPATH=. python bench/idle_memory.py --conns 2000            # wse_sync (bench_app's options)
    PYTHONPATH=. python bench/idle_memory.py --conns 2000 --bare     # pywsgi + stock gevent-websocket

Serves bench/bench_app.py's server in this process (embedded broker, as tests/helpers.py
does) or, with --bare, a gevent-websocket app that answers hi -> welcome and then waits in
``ws.receive()`` (what bench/bare_gevent.py does for an idle socket). The load generator
(bench/node/loadgen.js --scenario connect --sync, another process) warms up, then opens N
connections and keeps them open; around those N this script takes tracemalloc snapshots
(after gc.collect()), counts the gc-tracked objects by type and sums the greenlets' saved
C-stack slices (``greenlet._stack_saved``, heap copies made with PyMem_Realloc, so also in
tracemalloc). It prints bytes per connection by file and line, by type, and VmRSS's growth.
tracemalloc's own bookkeeping is in VmRSS here, so VmRSS/conn is larger than the bench's.
Not a benchmark: a breakdown.
"""
from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import sys
import tracemalloc

import gevent
from gevent import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def bare_app():
    from geventwebsocket.handler import WebSocketHandler

    class App:
        def app_protocol(self, path):
            return "wse-default-json"

        def __call__(self, environ, start_response):
            ws = environ["wsgi.websocket"]
            if ws.receive() is None:
                return []
            ws.send('["~wse:welcome",{},null]')
            while ws.receive() is not None:
                pass
            return []
    return App(), WebSocketHandler


def mallinfo():
    """glibc's heap: (bytes in use, bytes free but kept), mallinfo2(); (0, 0) elsewhere."""
    import ctypes

    class MI2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                     "usmblks", "fsmblks", "uordblks", "fordblks",
                                                     "keepcost")]
    try:
        f = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return 0, 0
    f.restype = MI2
    m = f()
    return m.uordblks + m.hblkhd, m.fordblks


def smaps() -> dict:
    """Rss (KB) of /proc/self/smaps by mapping: [heap], [stack], a file name, or
    "anon <size class>" for anonymous mappings (pymalloc's 1 MiB arenas, mmap'd malloc
    chunks, thread stacks)."""
    out = collections.Counter()
    name = None
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and len(parts) >= 5 and not parts[0].endswith(":"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                if len(parts) >= 6:
                    name = os.path.basename(parts[5]) if parts[5].startswith("/") else parts[5]
                else:
                    size = hi - lo
                    name = ("anon 1MiB (pymalloc arena)" if size == 1 << 20 else
                            "anon other")
            elif parts[0] == "Rss:":
                out[name] += int(parts[1])
    return out


def _stderr_of(fn) -> str:
    import tempfile
    with tempfile.TemporaryFile(mode="w+") as f:
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)
        try:
            fn()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        return f.read()


def arenas() -> list:
    """glibc malloc_stats(): (system bytes, in-use bytes) of each arena (main first; the
    others belong to threads: ZeroMQ's I/O thread, gevent's thread pool)."""
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    text = _stderr_of(lambda: (libc.malloc_stats(), libc.fflush(None)))
    sys_, use = [], []
    for line in text.splitlines():
        if line.startswith("system bytes"):
            sys_.append(int(line.split("=")[1]))
        elif line.startswith("in use bytes"):
            use.append(int(line.split("=")[1]))
    return list(zip(sys_, use))[:-1]  # the last pair is the total


def pymalloc() -> dict:
    """sys._debugmallocstats()'s totals (bytes): allocated blocks, free blocks in used
    pools, empty pools, arena total."""
    text = _stderr_of(sys._debugmallocstats)
    out = {}
    for line in text.splitlines():
        for key, name in (("# bytes in allocated blocks", "allocated"),
                          ("# bytes in available blocks", "available"),
                          ("# bytes lost to pool headers", "pool_headers"),
                          ("# bytes lost to quantization", "quantization"),
                          ("Total", "arenas")):
            if line.startswith(key) and name not in out:
                out[name] = int(line.split("=")[-1].replace(",", "").strip())
        if "unused pools *" in line:
            out["unused_pools"] = int(line.split("=")[-1].replace(",", "").strip())
    return out


def census():
    gc.collect()
    types = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
    import greenlet
    lets = [o for o in gc.get_objects() if isinstance(o, greenlet.greenlet)]
    return types, len(lets), sum(g._stack_saved for g in lets)


def short(path: str) -> str:
    for marker in ("site-packages/", "perf2/", "lib/python3.11/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conns", type=int, default=2000)
    ap.add_argument("--bare", action="store_true")
    ap.add_argument("--frames", type=int, default=1, help="tracemalloc traceback depth")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-trace", action="store_true", help="VmRSS and greenlet stacks only")
    ap.add_argument("--callers", default=None, help="with --cprofile: print the callers of these (regexes, comma list)")
    ap.add_argument("--cprofile", action="store_true",
                    help="no memory figures: count the Python calls per connection made during"
                         " the N handshakes (cProfile; its times are skewed by greenlets, the"
                         " counts are exact)")
    args = ap.parse_args()
    from gevent.pywsgi import WSGIServer
    if args.bare:
        app, handler = bare_app()
        http = WSGIServer(("127.0.0.1", 0), app, handler_class=handler, log=None, backlog=2048)
    else:
        sys.path.insert(0, HERE)
        from bench_app import server as app
        from wse_sync.wsgi import make_wsgi_server
        http = make_wsgi_server(app, ("127.0.0.1", 0))
    http.start()
    url = f"ws://127.0.0.1:{http.server_port}/"
    gen = subprocess.Popen(["node", os.path.join(HERE, "node", "loadgen.js"), "--scenario", "connect",
                            "--url", url, "--sync", "--conns", str(args.conns), "--concurrency", "200",
                            "--warmup", "0.3", "--max-seconds", "300"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def event(name):
        line = json.loads(gen.stdout.readline())
        assert line.get("event") == name, line
        return line

    def go():
        gen.stdin.write(b"go\n")
        gen.stdin.flush()

    event("ready")
    go()
    event("start")  # the warm-up connections came and went
    if args.cprofile:
        import cProfile
        import pstats
        prof = cProfile.Profile()
        prof.enable()
        go()
        n = event("end")["ops"]
        gevent.sleep(1.0)
        prof.disable()
        go()
        st = pstats.Stats(prof)
        total = sum(v[1] for v in st.stats.values())
        print(f"{n} handshakes: {total / n:.0f} Python calls per connection (primitive"
              f" {sum(v[0] for v in st.stats.values()) / n:.0f})\n")
        print("calls/conn  tottime%  function")
        tt = sum(v[2] for v in st.stats.values()) or 1
        for (fn, line, name), v in sorted(st.stats.items(), key=lambda kv: -kv[1][1])[:args.top]:
            print(f"{v[1] / n:9.2f}  {100 * v[2] / tt:7.1f}  {name} ({short(fn)}:{line})")
        if args.callers:
            for pattern in args.callers.split(","):  # (several at once would be AND-ed)
                st.print_callers(pattern)
        by_file = collections.Counter()
        for (fn, _line, _name), v in st.stats.items():
            by_file[short(fn).split(":")[0] if not fn.startswith("~") else "builtins (C)"] += v[1]
        print("\ncalls/conn by file")
        for f, c in by_file.most_common(25):
            print(f"{c / n:9.2f}  {f}")
        gen.wait(60)
        return 0
    if not args.no_trace:
        tracemalloc.start(args.frames)
    gevent.sleep(0.3)
    types_a, lets_a, stack_a = census()
    rss_a, heap_a, pym_a, ar_a, sm_a = rss_kb(), mallinfo(), pymalloc(), arenas(), smaps()
    snap_a = None if args.no_trace else tracemalloc.take_snapshot()
    go()
    end = event("end")
    n = end["ops"]
    gevent.sleep(1.0)  # settle: the joins are confirmed, the auth greenlets gone
    types_b, lets_b, stack_b = census()
    rss_b, heap_b, pym_b, ar_b, sm_b = rss_kb(), mallinfo(), pymalloc(), arenas(), smaps()
    snap_b = None if args.no_trace else tracemalloc.take_snapshot()
    go()
    n = n or 1
    if args.no_trace:
        print(f"{n} idle connections: VmRSS +{(rss_b - rss_a) / n:.1f} KB/conn; greenlets"
              f" +{(lets_b - lets_a) / n:.2f}/conn, their saved C stacks +{(stack_b - stack_a) / n:.0f} B/conn;"
              f" gc-tracked objects +{(sum(types_b.values()) - sum(types_a.values())) / n:.1f}/conn;"
              f" glibc heap in use +{(heap_b[0] - heap_a[0]) / n:.0f} B/conn (pymalloc arenas included),"
              f" free but kept +{(heap_b[1] - heap_a[1]) / n:.0f} B/conn; pymalloc (B/conn): "
              + ", ".join(f"{k} +{(pym_b.get(k, 0) - pym_a.get(k, 0)) / n:.0f}" for k in pym_b))
        print("glibc arenas, B/conn (system, in use):", "; ".join(
            f"#{i} +{(b[0] - (ar_a[i][0] if i < len(ar_a) else 0)) / n:.0f}, +{(b[1] - (ar_a[i][1] if i < len(ar_a) else 0)) / n:.0f}"
            for i, b in enumerate(ar_b)))
        print("Rss by mapping, B/conn:", ", ".join(
            f"{k} +{(sm_b[k] - sm_a.get(k, 0)) * 1024 / n:.0f}" for k in sm_b
            if abs(sm_b[k] - sm_a.get(k, 0)) * 1024 / n >= 50))
        gen.wait(60)
        return 0

    flt = [tracemalloc.Filter(False, tracemalloc.__file__)]
    snap_a, snap_b = snap_a.filter_traces(flt), snap_b.filter_traces(flt)
    total = sum(s.size_diff for s in snap_b.compare_to(snap_a, "filename"))
    out = {"server": "bare gevent" if args.bare else "wse_sync", "conns": n,
           "rss_kb_per_conn": (rss_b - rss_a) / n, "traced_bytes_per_conn": total / n,
           "greenlets_per_conn": (lets_b - lets_a) / n,
           "greenlet_stack_bytes_per_conn": (stack_b - stack_a) / n}
    print(f"{out['server']}: {n} idle connections; VmRSS +{out['rss_kb_per_conn']:.1f} KB/conn"
          f" (tracemalloc's own overhead included); traced +{total / n:.0f} B/conn;"
          f" greenlets +{out['greenlets_per_conn']:.2f}/conn, their saved C stacks"
          f" +{out['greenlet_stack_bytes_per_conn']:.0f} B/conn")
    print("\nbytes/conn  blocks/conn  by file")
    by_file = snap_b.compare_to(snap_a, "filename")
    for s in by_file[:20]:
        print(f"{s.size_diff / n:9.0f}  {s.count_diff / n:8.2f}  {short(s.traceback[0].filename)}")
    print("\nbytes/conn  blocks/conn  by line")
    rows = []
    for s in snap_b.compare_to(snap_a, "lineno")[:args.top]:
        fr = s.traceback[0]
        rows.append([s.size_diff / n, s.count_diff / n, f"{short(fr.filename)}:{fr.lineno}"])
        print(f"{s.size_diff / n:9.0f}  {s.count_diff / n:8.2f}  {short(fr.filename)}:{fr.lineno}")
    if args.frames > 1:
        print("\ntop tracebacks (innermost last)")
        for s in snap_b.compare_to(snap_a, "traceback")[:12]:
            print(f"{s.size_diff / n:9.0f} B/conn {s.count_diff / n:6.2f} blocks/conn")
            for fr in s.traceback:
                print(f"        {short(fr.filename)}:{fr.lineno}")
    print("\nobjects/conn  type (gc-tracked)")
    diff = {t: (types_b[t] - types_a.get(t, 0)) / n for t in types_b}
    for t, d in sorted(diff.items(), key=lambda kv: -kv[1])[:30]:
        if d >= 0.01:
            print(f"{d:8.2f}  {t}")
    out["by_line"] = rows
    out["types"] = {t: d for t, d in diff.items() if d >= 0.01}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    gen.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
