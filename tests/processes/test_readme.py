"""README.md's "Quick start", run as written.

The fenced blocks of that section are the test's input: a ```python or ```js
block whose first line is a comment naming a file (``# app.py``,
``// client.mjs``) is that file; ```console lines starting with ``$ `` are
the commands; the one ```text block is what ``python client.py`` prints.
They are written to a temporary folder and run there: ``wse-sync serve``
exactly as the README's line says, except that its port (4200, in the line
and in the clients' URL) is replaced by a free one; then the client, whose
output must be the README's, line for line.

A command this file does not know how to run fails the test, so the section
cannot grow a step that nothing checks.
"""
from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
import sys
from typing import Dict, List, Optional

import pytest

from deploy_helpers import Proc, child_env, tool
from helpers import ROOT, UNIT, free_port

README = os.path.join(ROOT, "README.md")
README_PORT = "4200"
INSTALL = "python3 -m venv .venv && . .venv/bin/activate && pip install ."
APT = "sudo apt-get install -y python3-venv"
CLIENT = "python client.py"
COPY_JS = """cp "$(python -c 'import wse_sync; print(wse_sync.CLIENT_JS)')" wse.mjs"""
NPM_WS = "npm install ws"
NODE_CLIENT = "node client.mjs"
NODE_DIR = os.path.join(ROOT, "tests", "node")


def section(title: str) -> str:
    with open(README, encoding="utf-8") as f:
        text = f.read()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


class QuickStart:
    """The blocks of the section: files by name, commands, the printed output."""

    def __init__(self) -> None:
        self.text = section("Quick start")
        self.files: Dict[str, str] = {}
        self.commands: List[str] = []
        self.outputs: List[str] = []
        for m in re.finditer(r"^```(\w*)\n(.*?)^```$", self.text, flags=re.M | re.S):
            lang, body = m.group(1), m.group(2)
            if lang in ("python", "js"):
                first = body.split("\n", 1)[0]
                name = re.fullmatch(r"(?:#|//) ([\w.-]+\.(?:py|mjs|js))", first)
                assert name, f"a {lang} block of the Quick start names no file: {first!r}"
                assert name.group(1) not in self.files, f"two blocks are {name.group(1)}"
                self.files[name.group(1)] = body
            elif lang == "console":
                lines = body.splitlines()
                assert all(line.startswith("$ ") for line in lines), body
                self.commands += [line[2:] for line in lines]
            elif lang == "text":
                self.outputs.append(body)
            else:
                raise AssertionError(f"a ```{lang} block in the Quick start: what is it?")

    def serve_command(self) -> str:
        found = [c for c in self.commands if c.startswith("wse-sync serve ")]
        assert len(found) == 1, self.commands
        return found[0]


@pytest.fixture(scope="module")
def qs() -> QuickStart:
    return QuickStart()


def test_every_command_of_the_quick_start_is_one_this_test_runs(qs):
    known = {APT, INSTALL, CLIENT, COPY_JS, NPM_WS, NODE_CLIENT, qs.serve_command()}
    unknown = [c for c in qs.commands if c not in known]
    assert not unknown, f"test_readme.py does not know how to check {unknown}: teach it"
    assert qs.commands.index(INSTALL) < qs.commands.index(qs.serve_command()) \
        < qs.commands.index(CLIENT)
    assert set(qs.files) == {"app.py", "client.py", "client.mjs"}, sorted(qs.files)
    assert len(qs.outputs) == 2, "two ```text blocks: what client.py and client.mjs print"
    assert qs.commands.index(COPY_JS) < qs.commands.index(NODE_CLIENT)


def test_the_extras_the_quick_start_names_exist(qs):
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    declared = set(cfg["options.extras_require"])
    named = re.findall(r"pip install '\.\[(\w+)\]'", qs.text)
    assert named, "the Quick start names no extra"
    assert set(named) <= declared, f"extras named but not in setup.cfg: {set(named) - declared}"


def with_port(text: str, port: int) -> str:
    assert README_PORT in text, f"port {README_PORT} is not in {text[:60]!r}..."
    return text.replace(README_PORT, str(port))


def run_quick_start(qs: QuickStart, folder: str, bin_dir: Optional[str] = None,
                    env: Optional[dict] = None, node: bool = False) -> None:
    """Write app.py and client.py into ``folder``, serve, run the client, compare;
    with ``node``, the JS client's steps too."""
    port = free_port()
    for name in ("app.py", "client.py"):
        body = qs.files[name] if name == "app.py" else with_port(qs.files[name], port)
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(body)
    args = shlex.split(with_port(qs.serve_command(), port))
    args[0] = os.path.join(bin_dir, "wse-sync") if bin_dir else tool("wse-sync")
    workers = int(args[args.index("--workers") + 1])
    python = os.path.join(bin_dir, "python") if bin_dir else sys.executable
    env = env or child_env()
    server = Proc(args, cwd=folder, env=env)
    try:
        # the line the README says each worker logs when it is ready
        server.wait_line(rf"worker \d+ serving app\.py:server on \('127\.0\.0\.1', {port}\)",
                         count=workers)
        out = subprocess.run([python, *shlex.split(CLIENT)[1:]], cwd=folder, env=env,
                             capture_output=True, text=True, timeout=60 * UNIT)
        assert out.returncode == 0, f"client.py failed:\n{out.stdout}{out.stderr}\n{server.output}"
        assert out.stdout == qs.outputs[0], (
            f"client.py printed\n{out.stdout}\nthe README says\n{qs.outputs[0]}")
        if node:
            _run_js(qs, folder, port, env)
    finally:
        rc = server.stop()
    assert rc == 0, server.output


def _node_ready() -> Optional[str]:
    """Why the JS steps cannot run here, or None (``ws`` comes from tests/node)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "node/npm are not on PATH"
    if not os.path.isdir(os.path.join(NODE_DIR, "node_modules", "ws")):
        out = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, "npm ci in tests/node failed:\n" + out.stdout + out.stderr
    return None


def _run_js(qs: QuickStart, folder: str, port: int, env: dict) -> None:
    """COPY_JS as written; NPM_WS as tests/node's installed ws (no network); NODE_CLIENT."""
    with open(os.path.join(folder, "client.mjs"), "w", encoding="utf-8") as f:
        f.write(with_port(qs.files["client.mjs"], port))
    out = subprocess.run(["bash", "-c", COPY_JS], cwd=folder, env=env, capture_output=True,
                         text=True, timeout=60 * UNIT)
    assert out.returncode == 0, out.stdout + out.stderr
    os.symlink(os.path.join(NODE_DIR, "node_modules"), os.path.join(folder, "node_modules"))
    out = subprocess.run(shlex.split(NODE_CLIENT), cwd=folder, env=env, capture_output=True,
                         text=True, timeout=60 * UNIT)
    assert out.returncode == 0, f"client.mjs failed:\n{out.stdout}{out.stderr}"
    assert out.stdout == qs.outputs[1], (
        f"client.mjs printed\n{out.stdout}\nthe README says\n{qs.outputs[1]}")


def test_the_quick_start_runs_as_written(qs, tmp_path):
    why = _node_ready()
    if why:
        print(f"the JS steps of the Quick start are not run: {why}", file=sys.stderr)
    run_quick_start(qs, str(tmp_path), node=why is None)


def _checkout_copy(dest: str) -> None:
    """The checkout as a user has it: the files git tracks or would track (the
    working tree, uncommitted edits included, without ignored build output)."""
    listed = subprocess.run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], capture_output=True)
    if listed.returncode != 0:  # not a git checkout: the tree less the usual output
        shutil.copytree(ROOT, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".git", ".tox", ".venv", ".ci", "node_modules", "__pycache__", "build",
            "*.egg-info"))
        return
    for rel in filter(None, listed.stdout.decode().split("\0")):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(os.environ.get("WSE_TEST_README_VENV") != "1",
                    reason="installs into a fresh venv from PyPI: WSE_TEST_README_VENV=1 runs it")
def test_the_quick_start_from_a_fresh_venv(qs, tmp_path):
    """The install line verbatim (``python3 -m venv .venv && . .venv/bin/activate &&
    pip install .``) in a copy of the checkout, then the same run with that venv's
    ``wse-sync`` and ``python``: the installed package, not this tree."""
    checkout = str(tmp_path / "checkout")
    os.makedirs(checkout)
    _checkout_copy(checkout)
    env = child_env()
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    out = subprocess.run(["bash", "-c", INSTALL], cwd=checkout, env=env, capture_output=True,
                         text=True, timeout=540)
    assert out.returncode == 0, out.stdout + out.stderr
    bin_dir = os.path.join(checkout, ".venv", "bin")
    env["PATH"] = bin_dir + os.pathsep + env["PATH"]
    work = str(tmp_path / "app")
    os.makedirs(work)
    run_quick_start(qs, work, bin_dir=bin_dir, env=env)


def _names(pattern: str, text: str) -> set:
    return set(re.findall(pattern, text))


def test_the_clients_use_what_app_py_defines(qs):
    app = qs.files["app.py"]
    rpcs = _names(r"@server\.register\(\"([\w-]+)\"\)", app)
    channels = _names(r"@server\.channel\.on\(\"([\w-]+)\"\)", app)
    assert rpcs == {"add"} and channels == {"chat"}
    py, js = qs.files["client.py"], qs.files["client.mjs"]
    # the Python client also calls an unknown procedure ("mul") on purpose
    assert _names(r"\.call\(\"([\w-]+)\"", py) == rpcs | {"mul"}
    assert _names(r"\.send\(\"([\w-]+)\"", py) <= channels
    assert _names(r"\.call\('([\w-]+)'", js) <= rpcs
    assert _names(r"\.send\('([\w-]+)'", js) <= channels
    tokens = _names(r"\"(token-\w+)\"", app)
    assert _names(r"'(token-\w+)'", js) <= tokens
    assert f"ws://127.0.0.1:{README_PORT}/" in js
