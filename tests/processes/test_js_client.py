"""The JavaScript client shipped in the package (wse_sync/static/wse.js): in the
wheel, dependency-free, an ES module that plain ``node`` (18/20, no flags)
loads, on the ``ws`` package given as its WebSocket option, and that says
clearly what to do when there is no WebSocket at all.

Its protocol behaviour is tests/processes/test_node_protocol.py's (flows.mjs drives this
same file against real servers); the chat page runs it in Chromium
(tests/processes/test_examples.py).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import ROOT, UNIT, free_port, serve_process
from test_node_protocol import CLIENT_JS, NODE_DIR, _why_skip

CLIENT_URL = Path(CLIENT_JS).as_uri()
EXPORTS = ["Emitter", "NO_WEBSOCKET_MESSAGE", "RpcManager", "Signal", "WSE_ERROR", "WSE_REASON",
           "WSE_STATUS", "WseClient", "WseError", "WseJSON", "makeStamp"]


def node_module(script, cwd, timeout=30 * UNIT, flags=(), **env_extra):
    """Run ``script`` as an ES module with plain ``node``; its last stdout line as JSON."""
    env = dict(os.environ, CLIENT_URL=CLIENT_URL, **env_extra)
    env.pop("NODE_OPTIONS", None)  # plain node: no --experimental-* slipped in
    out = subprocess.run(["node", *flags, "--input-type=module", "-e", script], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def node():
    if shutil.which("node") is None:
        pytest.skip("node is not on PATH")


@pytest.fixture
def node_ws():
    reason = _why_skip()  # installs tests/node's `ws` when missing
    if reason:
        pytest.skip(reason)


# -- the wheel ---------------------------------------------------------------------

def _build_backend_is_here():
    """setuptools >= 61 that can write wheels (>= 70.1 itself, or with `wheel`)."""
    try:
        import setuptools
    except ImportError:
        return False
    version = tuple(int(p) for p in re.findall(r"\d+", setuptools.__version__)[:2])
    if version < (61, 0):
        return False
    if version >= (70, 1):
        return True
    try:
        import wheel  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.timeout(int(600 * UNIT))
def test_the_wheel_ships_the_js_client(tmp_path):
    # build from a copy: setuptools writes build/ and *.egg-info beside its sources
    src = tmp_path / "src"
    os.makedirs(src)
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "wse_sync"), src / "wse_sync",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-q",
           "-w", str(tmp_path / "dist"), str(src)]
    if _build_backend_is_here():
        cmd.insert(4, "--no-build-isolation")  # offline and quick; else pip fetches setuptools
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=540 * UNIT)
    assert out.returncode == 0, out.stdout + out.stderr
    wheels = list((tmp_path / "dist").glob("wse_sync-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as whl:
        names = set(whl.namelist())
        assert "wse_sync/static/wse.js" in names
        assert "wse_sync/static/package.json" in names
        assert "wse_sync/py.typed" in names
        shipped = whl.read("wse_sync/static/wse.js")
        package = json.loads(whl.read("wse_sync/static/package.json"))
    assert shipped == open(os.path.join(ROOT, "wse_sync", "static", "wse.js"), "rb").read()
    assert package["type"] == "module"  # what makes Node 18/20 load wse.js as an ES module


# -- the file ------------------------------------------------------------------------

@pytest.mark.timeout(int(10 * UNIT))
def test_the_client_has_no_dependency():
    source = open(CLIENT_JS, encoding="utf-8").read()
    code = re.sub(r"/\*.*?\*/", "", source, flags=re.S)  # the doc comment shows an import
    assert not re.search(r"^\s*import\b|\brequire\s*\(|\bimport\s*\(", code, re.M)
    assert "export class WseClient" in source
    assert "globalThis.WebSocket" in source


# -- plain node ------------------------------------------------------------------------

LOAD_WITH_WS = """
import WebSocket from 'ws'
const m = await import(process.env.CLIENT_URL)
const out = {
  node: process.versions.node,
  global_websocket: typeof globalThis.WebSocket,
  exports: Object.keys(m).sort(),
  frame: new m.WseJSON().pack({ type: 'x' }),
  reasons: m.WSE_REASON, status_names: m.WSE_STATUS, rp_timeout: m.WSE_ERROR.RP_TIMEOUT,
}
const c = new m.WseClient({ url: process.env.DEAD_URL, WebSocket })
out.uses = c.WebSocket === WebSocket
out.status = c.status
const statuses = []
c.when.updated(s => statuses.push([s, c.status]))
try {
  await c.connect('smoke')
  out.connected = true
} catch (err) {
  out.rejected = { wse_error: err instanceof m.WseError, code: err.code }
}
out.statuses = statuses
console.log(JSON.stringify(out))
"""


@pytest.mark.node
@pytest.mark.timeout(int(60 * UNIT))
def test_plain_node_loads_the_client_on_the_ws_package(node_ws):
    dead = f"ws://127.0.0.1:{free_port()}/"  # nobody listens there
    out = node_module(LOAD_WITH_WS, NODE_DIR, DEAD_URL=dead)
    major = int(out["node"].split(".")[0])
    assert major >= 18, out["node"]
    if major < 22:
        assert out["global_websocket"] == "undefined"  # the option is what made it work
    assert out["exports"] == EXPORTS
    assert out["frame"] == '["x",null,null]'
    assert out["reasons"]["BY_CLIENT"] == "wse.by-client"
    assert out["status_names"] == {"IDLE": "IDLE", "OFFLINE": "OFFLINE", "READY": "READY",
                               "CONNECTING": "CONNECTING", "RE_CONNECTING": "RE_CONNECTING"}
    assert out["rp_timeout"] == "wse.client.rp.timeout"
    assert out["uses"] is True and out["status"] == "IDLE"
    # the ws socket was really used: a refused TCP connect rejects connect()
    assert out.get("connected") is None
    assert out["rejected"] == {"wse_error": True, "code": "wse.client.ws-error"}
    assert out["statuses"] == [["CONNECTING", "CONNECTING"], ["OFFLINE", "OFFLINE"]]


NO_WEBSOCKET = """
// as on Node 18/20 (and a browser without WebSocket): no global constructor
delete globalThis.WebSocket
if (typeof globalThis.WebSocket !== 'undefined') {
  Object.defineProperty(globalThis, 'WebSocket', { value: undefined, configurable: true })
}
const m = await import(process.env.CLIENT_URL)
const out = { loaded: true }
try {
  new m.WseClient({ url: 'ws://127.0.0.1:1/' })
  out.constructed = true
} catch (err) {
  out.error = { name: err.name, message: err.message }
}
out.expected = m.NO_WEBSOCKET_MESSAGE
console.log(JSON.stringify(out))
"""


@pytest.mark.node
@pytest.mark.timeout(int(30 * UNIT))
def test_without_a_websocket_the_client_says_what_to_do(node, tmp_path):
    # from an empty folder: nothing to resolve, the module imports nothing
    out = node_module(NO_WEBSOCKET, str(tmp_path))
    assert out["loaded"] is True and "constructed" not in out
    assert out["error"]["name"] == "TypeError"
    message = out["error"]["message"]
    assert message == out["expected"]
    assert "no WebSocket constructor" in message
    assert "import WebSocket from 'ws'" in message
    assert "new WseClient({ url, WebSocket })" in message


GLOBAL_WEBSOCKET = """
const m = await import(process.env.CLIENT_URL)
const frames = []
const c = new m.WseClient({ url: process.env.URL, trace: (dir, data) => frames.push([dir, data]) })
const out = { uses_global: c.WebSocket === globalThis.WebSocket }
out.welcome = await c.connect('global-ws', { n: 1 })
out.echo = await c.call('echo', { a: 'é' })
const closed = new Promise(resolve => c.when.closed((code, reason) => resolve([code, reason])))
c.close()
out.closed = await closed
out.status = c.status
out.frames = frames
console.log(JSON.stringify(out))
"""


def _global_websocket_flags():
    """The node flags that give a global WebSocket (none on 22+); None: not to be had."""
    major = int(subprocess.run(["node", "-p", "process.versions.node.split('.')[0]"],
                               capture_output=True, text=True, timeout=30 * UNIT).stdout)
    if major >= 22:
        return []
    probe = subprocess.run(["node", "--experimental-websocket", "-p", "typeof WebSocket"],
                           capture_output=True, text=True, timeout=30 * UNIT)
    return ["--experimental-websocket"] if probe.stdout.strip() == "function" else None


@pytest.mark.node
@pytest.mark.timeout(int(90 * UNIT))
def test_node_global_websocket_is_the_default(node, tmp_path):
    # no WebSocket option: globalThis.WebSocket (Node's own, undici's) against a real server
    flags = _global_websocket_flags()
    if flags is None:
        pytest.skip("this node has no global WebSocket, even with --experimental-websocket (< 20.10)")
    with serve_process("tests/apps/node_app.py:server") as sp:
        out = node_module(GLOBAL_WEBSOCKET, str(tmp_path), flags=flags, URL=sp.url)
    assert out["uses_global"] is True
    conn_id = out["welcome"]["conn_id"]
    assert out["welcome"] == {"hello": "global-ws", "conn_id": conn_id}
    assert out["echo"] == {"a": "é"}
    assert out["closed"] == [1000, "wse.by-client"] and out["status"] == "OFFLINE"
    stamp = json.loads(out["frames"][2][1])[2]
    assert out["frames"] == [
        ["out", '["~wse:hi",{"identity":"global-ws","meta":{"n":1}},null]'],
        ["in", '["~wse:welcome",{"hello":"global-ws","conn_id":"%s"},null]' % conn_id],
        ["out", '["echo",{"a":"é"},"%s"]' % stamp],
        ["in", '["~wse:response",{"a":"é"},"%s"]' % stamp],
    ]
