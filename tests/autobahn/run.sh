#!/usr/bin/env bash
# Autobahn|Testsuite fuzzingclient against wse_sync's real server stack
# (tests/autobahn/echo_app.py: gevent pywsgi + WseHandler + wse_sync Transport).
#
#   bash tests/autobahn/run.sh                 # cases 1-8, 10, 11 (not 9, not 12/13)
#   bash tests/autobahn/run.sh '1.*,5.*'       # chosen cases (comma list or JSON array)
#   bash tests/autobahn/run.sh --perf          # group 9 (performance): durations
#   bash tests/autobahn/run.sh --perf '9.1.*'  # part of group 9
#
# Environment:
#   PYTHON         the project's python, with gevent + gevent-websocket (default python3)
#   AUTOBAHN_VENV  Python 2.7 virtualenv with wstest (default: autobahn-venv beside the
#                  repository, i.e. outside it); created when missing
#   PYTHON2        the Python 2.7 to build it with (default: pyenv's newest 2.7.x)
#   PORT           the echo server's port on 127.0.0.1 (default 9001)
#   ECHO_APP       the echo server script to start (default tests/autobahn/echo_app.py;
#                  tests/autobahn/echo_geventwebsocket.py is stock gevent-websocket)
#   OUTDIR         where wstest writes its reports (default tests/autobahn/reports/<mode>)
#   FAIL_BY_DROP   Autobahn's failByDrop option (default true, Autobahn's own default)
#
# Prints a count per behavior and per behaviorClose, then every case whose behavior or
# behaviorClose is not OK / INFORMATIONAL / UNIMPLEMENTED (NON-STRICT counts as bad),
# with the report's result / resultClose; exits 1 when there is any such case.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"

MODE=fuzz
if [[ "${1:-}" == "--perf" || "${1:-}" == "perf" ]]; then
    MODE=perf
    shift
fi
if [[ "$MODE" == perf ]]; then
    CASES="${1:-9.*}"
else
    CASES="${1:-1.*,2.*,3.*,4.*,5.*,6.*,7.*,8.*,10.*,11.*}"
fi

PY="${PYTHON:-python3}"
VENV="${AUTOBAHN_VENV:-$(dirname "$ROOT")/autobahn-venv}"
PORT="${PORT:-9001}"
ECHO_APP="${ECHO_APP:-$HERE/echo_app.py}"
[[ "$ECHO_APP" == /* || -f "$ECHO_APP" ]] || ECHO_APP="$ROOT/$ECHO_APP"
ECHO_NAME="$(basename "$ECHO_APP")"
OUTDIR="${OUTDIR:-$HERE/reports/$MODE}"
FAIL_BY_DROP="${FAIL_BY_DROP:-true}"

# -- the Python 2.7 virtualenv with autobahntestsuite (idempotent) -----------------
# autobahntestsuite 0.8.2 is Python 2 only; these pins are the last releases that
# still install and run on 2.7 (cryptography 3.3.2 ships a cp27mu manylinux wheel).
AUTOBAHN_PINS=(
    'autobahntestsuite==0.8.2' 'autobahn==0.10.9' 'txaio<=2.1.0'
    'Twisted<21' 'cryptography<3.4' 'pyOpenSSL<20' 'idna<3'
    'service_identity==18.1.0' 'pyasn1<0.6' 'pyasn1-modules<0.4' 'attrs<21'
    'zope.interface<5' 'six' 'hyperlink<21' 'PyHamcrest<2' 'Automat<21' 'constantly<16'
    'incremental<22' 'cffi<1.15' 'pycparser<2.22' 'setuptools<45' 'characteristic'
    'klein<21' 'Werkzeug<2' 'Jinja2<3' 'MarkupSafe<2'
)

find_python2() {
    if [[ -n "${PYTHON2:-}" ]]; then echo "$PYTHON2"; return; fi
    if command -v pyenv >/dev/null 2>&1; then
        local root best
        root="$(pyenv root)"
        best="$(pyenv versions --bare 2>/dev/null | grep -E '^2\.7\.[0-9]+$' | sort -V | tail -n 1 || true)"
        if [[ -n "$best" && -x "$root/versions/$best/bin/python" ]]; then
            echo "$root/versions/$best/bin/python"; return
        fi
    fi
    command -v python2.7 || command -v python2 || true
}

ensure_venv() {
    if [[ -x "$VENV/bin/wstest" ]] && "$VENV/bin/wstest" -a >/dev/null 2>&1; then
        return
    fi
    local py2
    py2="$(find_python2)"
    if [[ -z "$py2" ]]; then
        echo "run.sh: no Python 2.7 found (set PYTHON2)" >&2
        exit 2
    fi
    echo "run.sh: building $VENV with $py2" >&2
    export PIP_NO_PYTHON_VERSION_WARNING=1 PIP_DISABLE_PIP_VERSION_CHECK=1
    local t0=$SECONDS
    "$py2" -m pip install -q 'virtualenv<20.22'
    [[ -x "$VENV/bin/python" ]] || "$py2" -m virtualenv -q "$VENV"
    "$VENV/bin/python" -m pip install -q "${AUTOBAHN_PINS[@]}"
    "$VENV/bin/wstest" -a >/dev/null 2>&1 || { echo "run.sh: wstest does not run" >&2; exit 2; }
    echo "run.sh: venv ready in $((SECONDS - t0))s" >&2
}

ensure_venv

if ! "$PY" -c 'import gevent, geventwebsocket' >/dev/null 2>&1; then
    echo "run.sh: $PY lacks gevent / gevent-websocket: set PYTHON to the project's python" >&2
    exit 2
fi

# -- the echo server ---------------------------------------------------------------
TMP="$(mktemp -d)"
SERVER_PID=""
WSTEST_PID=""
cleanup() {
    if [[ -n "$WSTEST_PID" ]] && kill -0 "$WSTEST_PID" 2>/dev/null; then
        kill "$WSTEST_PID" 2>/dev/null || true
        wait "$WSTEST_PID" 2>/dev/null || true
    fi
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_open() {
    "$PY" - "$PORT" <<'EOF'
import socket, sys
s = socket.socket()
s.settimeout(0.5)
try:
    s.connect(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
s.close()
EOF
}

if port_open; then
    echo "run.sh: 127.0.0.1:$PORT is already in use (set PORT)" >&2
    exit 2
fi
mkdir -p "$OUTDIR"
SERVER_LOG="$(dirname "$OUTDIR")/${ECHO_NAME%.py}-$MODE.log"
"$PY" "$ECHO_APP" "$PORT" >"$SERVER_LOG" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 100); do
    port_open && break
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "run.sh: $ECHO_NAME died:" >&2; cat "$SERVER_LOG" >&2; exit 2; }
    sleep 0.1
done
port_open || { echo "run.sh: $ECHO_NAME did not listen on $PORT" >&2; exit 2; }
echo "run.sh: $(head -n 1 "$SERVER_LOG")"

# -- the spec and the run ----------------------------------------------------------
# a previous run's reports only: never wipe a folder that holds anything else
if [[ -n "$(ls -A "$OUTDIR")" && ! -f "$OUTDIR/index.json" ]]; then
    echo "run.sh: $OUTDIR is not empty and holds no index.json: not wiping it" >&2
    exit 2
fi
rm -rf "$OUTDIR"
mkdir -p "$OUTDIR"
SPEC="$TMP/spec.json"
"$PY" - "$SPEC" "$OUTDIR" "$PORT" "$CASES" "$FAIL_BY_DROP" <<'EOF'
import json, sys
spec_path, outdir, port, cases, fail_by_drop = sys.argv[1:]
cases = cases.strip()
cases = json.loads(cases) if cases.startswith("[") else [c.strip() for c in cases.split(",") if c.strip()]
spec = {
    "options": {"failByDrop": fail_by_drop.lower() in ("1", "true", "yes")},
    "outdir": outdir,
    "servers": [{"agent": "wse_sync", "url": "ws://127.0.0.1:%s" % port}],
    "cases": cases,
    "exclude-cases": [],
    "exclude-agent-cases": {},
}
with open(spec_path, "w") as f:
    json.dump(spec, f, indent=2)
print("run.sh: cases %s -> %s" % (", ".join(cases), outdir))
EOF

WSTEST_LOG="$(dirname "$OUTDIR")/wstest-$MODE.log"
t0=$SECONDS
# in the background, so that a TERM reaches the trap (and ends wstest) at once
(cd "$TMP" && exec "$VENV/bin/wstest" -m fuzzingclient -s "$SPEC") >"$WSTEST_LOG" 2>&1 &
WSTEST_PID=$!
wstest_rc=0
wait "$WSTEST_PID" || wstest_rc=$?
WSTEST_PID=""
if (( wstest_rc != 0 )); then
    echo "run.sh: wstest failed with $wstest_rc (log: $WSTEST_LOG):" >&2
    tail -n 30 "$WSTEST_LOG" >&2
    exit 2
fi
echo "run.sh: wstest took $((SECONDS - t0))s (log: $WSTEST_LOG, server log: $SERVER_LOG)"
if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "run.sh: WARNING: $ECHO_NAME exited during the run:" >&2
    tail -n 30 "$SERVER_LOG" >&2
fi

# -- the summary -------------------------------------------------------------------
"$PY" - "$OUTDIR" "$MODE" <<'EOF'
import json, os, sys
from collections import Counter

outdir, mode = sys.argv[1:]
index_path = os.path.join(outdir, "index.json")
if not os.path.exists(index_path):
    print("run.sh: no %s" % index_path)
    sys.exit(2)
with open(index_path) as f:
    index = json.load(f)

GOOD = {"OK", "INFORMATIONAL", "UNIMPLEMENTED"}


def key(case_id):
    return tuple(int(p) for p in case_id.split("."))


def one_line(text, limit=200):
    text = " ".join(str(text or "").split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


bad_total = 0
for agent, cases in sorted(index.items()):
    ids = sorted(cases, key=key)
    behavior = Counter(cases[c]["behavior"] for c in ids)
    behavior_close = Counter(cases[c]["behaviorClose"] for c in ids)
    print()
    print("agent %s: %d cases" % (agent, len(ids)))
    order = ["OK", "NON-STRICT", "FAILED", "INFORMATIONAL", "UNIMPLEMENTED"]
    print("  behavior:      " + ", ".join("%s %d" % (b, behavior[b]) for b in order + sorted(set(behavior) - set(order))))
    print("  behaviorClose: " + ", ".join("%s %d" % (b, n) for b, n in sorted(behavior_close.items())))
    if mode == "perf":
        print()
        print("  %-9s %9s  %-10s %-10s %s" % ("case", "ms", "behavior", "close", "description"))
    bad = []
    for c in ids:
        entry = cases[c]
        detail = {}
        report = os.path.join(outdir, entry.get("reportfile") or "")
        if entry.get("reportfile") and os.path.exists(report):
            with open(report) as f:
                detail = json.load(f)
        if mode == "perf":
            print("  %-9s %9s  %-10s %-10s %s" % (c, entry.get("duration"), entry["behavior"],
                                                 entry["behaviorClose"],
                                                 one_line(detail.get("description"), 70)))
        if entry["behavior"] not in GOOD or entry["behaviorClose"] not in GOOD:
            bad.append((c, entry, detail))
    bad_total += len(bad)
    print()
    if not bad:
        print("  every case OK / INFORMATIONAL / UNIMPLEMENTED")
        continue
    print("  %d case(s) not OK:" % len(bad))
    for c, entry, detail in bad:
        print("  %-9s behavior=%s behaviorClose=%s remoteCloseCode=%s" % (
            c, entry["behavior"], entry["behaviorClose"], entry.get("remoteCloseCode")))
        if entry["behavior"] not in GOOD:
            print("            result:      %s" % one_line(detail.get("result")))
            if detail.get("expected") is not None:  # "result" alone rarely says why
                print("            expected:    %s" % one_line(json.dumps(detail.get("expected"))))
                print("            received:    %s" % one_line(json.dumps(detail.get("received"))))
        if entry["behaviorClose"] not in GOOD:
            print("            resultClose: %s" % one_line(detail.get("resultClose")))
sys.exit(1 if bad_total else 0)
EOF
