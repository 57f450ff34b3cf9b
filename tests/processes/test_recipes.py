"""The container recipes, checked without Docker (no daemon here): Dockerfile
and compose.yaml parse, every `wse-sync` command line in them is accepted by
the real CLI parser, the files they name exist, and what they run, runs:
the image's CMD, and compose's keys, broker and two workers replicas, as
processes on this host (each volume a temporary folder, the ports free
ones), down to a message crossing the CURVE broker."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

import pytest

from deploy_helpers import Proc, child_env
from helpers import ROOT, UNIT, free_port, wait_for
from wse_sync import WseClient
from wse_sync.serve.cli import build_parser as _parser

pytestmark = pytest.mark.timeout(int(90 * UNIT))

DOCKERFILE = os.path.join(ROOT, "Dockerfile")
COMPOSE = os.path.join(ROOT, "compose.yaml")
KEYS_SCRIPT = os.path.join(ROOT, "workers", "compose-keys.sh")


# -- reading the files -------------------------------------------------------------
def dockerfile() -> list:
    """[(INSTRUCTION, arguments)] with continuation lines joined."""
    out, pending = [], ""
    with open(DOCKERFILE) as f:
        for line in f:
            line = line.rstrip("\n")
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            line, pending = pending + line, ""
            instr, _, args = line.strip().partition(" ")
            out.append((instr.upper(), args.strip()))
    return out


def stages() -> list:
    """The Dockerfile's stages: [[(INSTRUCTION, arguments), ...], ...]."""
    result: list = []
    for instr, args in dockerfile():
        if instr == "FROM":
            result.append([])
        result[-1].append((instr, args))
    return result


def load_compose(path: str = COMPOSE) -> dict:
    """compose.yaml as the subset of YAML it is written in: block mappings
    whose values are flow (JSON) values, one per line, and comment lines.
    Anything else fails, saying which line (so the file stays readable
    without a YAML library; when PyYAML is there it must read the same)."""
    root: dict = {}
    stack = [(-1, root)]
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            indent = len(line) - len(line.lstrip(" "))
            key, sep, rest = line.strip().partition(":")
            assert sep and re.fullmatch(r"[A-Za-z0-9_.-]+", key), f"compose.yaml:{n}: {line!r}"
            while stack[-1][0] >= indent:
                stack.pop()
            parent = stack[-1][1]
            assert key not in parent, f"compose.yaml:{n}: {key} twice"
            if not rest.strip():
                parent[key] = {}
                stack.append((indent, parent[key]))
                continue
            try:
                parent[key] = json.loads(rest)
            except ValueError:
                raise AssertionError(f"compose.yaml:{n}: not a flow (JSON) value: {rest.strip()!r}"
                                     " (tests/processes/test_recipes.py reads it without YAML)") from None
    return root


def cmd_of(stage: list) -> list:
    (args,) = [a for i, a in stage if i == "CMD"]
    return json.loads(args)  # the exec form: no shell between docker and serve


def keys_script_commands() -> list:
    """The `wse-sync ...` lines of workers/compose-keys.sh, split as sh would."""
    with open(KEYS_SCRIPT) as f:
        return [shlex.split(line) for line in f if line.strip().startswith("wse-sync ")]


def all_command_lines() -> list:
    lines = [("Dockerfile CMD", cmd_of(stages()[-1]))]
    for name, service in load_compose()["services"].items():
        if service["command"][0] == "wse-sync":
            lines.append((f"compose {name}", service["command"]))
    lines += [("compose-keys.sh", argv) for argv in keys_script_commands()]
    return lines


# -- the files ---------------------------------------------------------------------
def test_compose_reads_the_same_as_yaml():
    compose = load_compose()
    try:
        import yaml
    except ImportError:
        pytest.skip("PyYAML is not installed: compose.yaml was read as flow values only")
    with open(COMPOSE) as f:
        assert yaml.safe_load(f) == compose


def _compose_cli():
    """`docker compose` (v2) or `docker-compose`: both check a file with no daemon."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True,
                                 timeout=30 * UNIT).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_is_valid_for_docker_compose():
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor docker-compose is installed"
                    " (apt-get install docker-compose: `config` needs no daemon)")
    out = subprocess.run([*cli, "-f", COMPOSE, "config", "-q"], capture_output=True,
                         text=True, cwd=ROOT, timeout=60 * UNIT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_services_volumes_and_order():
    compose = load_compose()
    services = compose["services"]
    assert set(services) == {"keys", "broker", "workers"}
    declared = set(compose["volumes"])
    for name, service in services.items():
        assert service["build"] == "." and os.path.exists(os.path.join(ROOT, "Dockerfile"))
        assert service["image"] == services["workers"]["image"], name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert os.path.exists(os.path.join(ROOT, source)), f"{name}: {volume}"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on {dep}"
    keys_done = {"condition": "service_completed_successfully"}
    assert services["broker"]["depends_on"]["keys"] == keys_done
    assert services["workers"]["depends_on"]["keys"] == keys_done
    # the workers scale: no fixed name, a host port range, not one port
    workers = services["workers"]
    assert "container_name" not in workers
    (ports,) = workers["ports"]
    assert re.fullmatch(r"\d+-\d+:4200", ports), ports
    # CURVE, not --insecure, on the tcp:// link
    assert "--insecure" not in services["broker"]["command"]
    assert "--curve-secret" in services["broker"]["command"]
    assert "--broker-key" in workers["command"]


def test_the_dockerfile():
    build, run = stages()
    assert build[0] == ("FROM", "python:3.12-slim AS build")
    assert run[0] == ("FROM", "python:3.12-slim")
    assert ("RUN", "python -m venv /opt/venv") in build
    assert ("RUN", "/opt/venv/bin/pip install .") in build
    assert ("COPY", "--from=build /opt/venv /opt/venv") in run
    env = " ".join(a for i, a in run if i == "ENV")
    assert "PATH=/opt/venv/bin:$PATH" in env
    (user,) = [a for i, a in run if i == "USER"]
    assert user.split(":")[0] not in ("root", "0"), user
    useradd = " ".join(a for i, a in run if i == "RUN" and "useradd" in a)
    uid, gid = user.split(":")
    assert f"--uid {uid}" in useradd and f"--gid {gid}" in useradd, useradd
    with open(KEYS_SCRIPT) as f:  # the keys service gives the key files to that user
        assert "${KEYS_OWNER:-%s:%s}" % (uid, gid) in f.read()
    assert ("EXPOSE", "4200") in run
    cmd = cmd_of(run)
    assert cmd[:3] == ["wse-sync", "serve", "examples/echo/app.py:server"]
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and cmd[cmd.index("--port") + 1] == "4200"


def test_what_the_dockerfile_copies_exists_and_is_not_ignored():
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        ignored = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    for stage in stages():
        for instr, args in stage:
            if instr != "COPY" or args.startswith("--from"):
                continue
            for source in args.split()[:-1]:
                assert os.path.exists(os.path.join(ROOT, source)), f"COPY {source}"
                assert source.rstrip("/") not in ignored, f"COPY {source}: in .dockerignore"
    # the packaging metadata names README.md: it must be in the build stage
    assert "README.md" in " ".join(a for i, a in stages()[0] if i == "COPY")


@pytest.mark.parametrize("where,argv", [pytest.param(w, a, id=f"{w}: {a[1]} {a[2]}")
                                        for w, a in all_command_lines()])
def test_every_command_line_is_accepted_by_the_cli(where, argv):
    assert argv[0] == "wse-sync", where
    try:
        args = _parser().parse_args(argv[1:])
    except SystemExit:
        raise AssertionError(f"{where}: wse-sync rejects {shlex.join(argv)}") from None
    if args.command == "serve":
        # the image's WORKDIR /app holds examples/ as this checkout does
        path = args.app.rsplit(":", 1)[0]
        assert os.path.exists(os.path.join(ROOT, path)), f"{where}: {path}"


def test_the_app_the_recipes_serve_loads():
    specs = {argv[2] for _, argv in all_command_lines() if argv[1] == "serve"}
    assert specs == {"examples/echo/app.py:server"}
    code = ("import sys; from wse_sync import WseServer; from wse_sync.serve.worker import"
            " load_app; assert isinstance(load_app(sys.argv[1]), WseServer)")
    for spec in specs:
        out = subprocess.run([sys.executable, "-c", code, spec], cwd=ROOT, capture_output=True,
                             text=True, timeout=30 * UNIT)
        assert out.returncode == 0, out.stderr


# -- running them on this host ---------------------------------------------------
def _on_host(argv: list, volumes: list, where: dict, subst: dict) -> list:
    """A container's command line for this host: each volume's mount point
    is its folder here (``where``: named volume -> folder; binds from ROOT),
    then the values in ``subst`` replaced."""
    mounts = []
    for volume in volumes:
        source, target = volume.split(":")[:2]
        host = os.path.join(ROOT, source) if source.startswith((".", "/")) else where[source]
        mounts.append((target, host))
    mounts.sort(key=lambda m: -len(m[0]))
    out = []
    for arg in argv:
        for target, host in mounts:
            if arg == target or arg.startswith(target + "/"):
                arg = host + arg[len(target):]
                break
        out.append(subst.get(arg, arg))
    return out


def test_the_image_command_serves():
    argv = cmd_of(stages()[-1])
    port = free_port()
    argv = _on_host(argv, [], {}, {"0.0.0.0": "127.0.0.1", "4200": str(port)})
    p = Proc(argv, env=child_env())
    try:
        p.wait_line(r"worker \d+ serving")
        c = WseClient(f"ws://127.0.0.1:{port}/", rpc_timeout=10 * UNIT)
        try:
            assert c.connect("docker")["hello"] == "docker"
            assert c.call("echo", "from the image's CMD") == "from the image's CMD"
        finally:
            c.close()
    finally:
        p.stop()


def test_the_compose_cluster_runs_on_this_host():
    services = load_compose()["services"]
    tmp = tempfile.mkdtemp(prefix="wse-compose-")
    where = {name: os.path.join(tmp, name) for name in load_compose()["volumes"]}
    for folder in where.values():
        os.mkdir(folder)
    broker_port = free_port()
    link = f"tcp://127.0.0.1:{broker_port}"
    subst = {"tcp://0.0.0.0:5555": link, "tcp://broker:5555": link, "0.0.0.0": "127.0.0.1"}
    procs = []
    try:
        # keys: once, then kept
        keys = services["keys"]
        argv = _on_host(keys["command"], keys["volumes"], where, subst)
        made = subprocess.run(argv, env=child_env(), capture_output=True, text=True,
                              timeout=30 * UNIT)
        assert made.returncode == 0 and "made" in made.stdout, made.stdout + made.stderr
        secret = os.path.join(where["broker-keys"], "broker.key_secret")
        with open(secret) as f:
            first = f.read()
        again = subprocess.run(argv, env=child_env(), capture_output=True, text=True,
                               timeout=30 * UNIT)
        assert again.returncode == 0 and "kept" in again.stdout, again.stdout + again.stderr
        with open(secret) as f:
            assert f.read() == first
        assert oct(os.stat(secret).st_mode & 0o777) == "0o600"

        broker = services["broker"]
        b = Proc(_on_host(broker["command"], broker["volumes"], where, subst), env=child_env())
        procs.append(b)
        b.wait_line(r"broker listening on tcp://")
        assert "WITHOUT CURVE" not in b.output

        # two replicas of the workers service (--scale workers=2)
        workers = services["workers"]
        urls = []
        for _ in range(2):
            port = free_port()
            argv = _on_host(workers["command"], workers["volumes"], where,
                            dict(subst, **{"4200": str(port)}))
            w = Proc(argv, env=child_env())
            procs.insert(0, w)
            n = int(argv[argv.index("--workers") + 1])
            w.wait_line(r"joined broker tcp://\S+ with CURVE", count=n)
            w.wait_line(r"worker \d+ serving", count=n)
            urls.append(f"ws://127.0.0.1:{port}/")

        # a user on one replica hears of a user who joined on the other
        online = []
        a = WseClient(urls[0], rpc_timeout=10 * UNIT)
        a.channel.on("online", online.append)
        b_client = WseClient(urls[1], rpc_timeout=10 * UNIT)
        try:
            a.connect("alice")
            b_client.connect("bob")
            try:
                wait_for(lambda: "bob" in online, timeout=15 * UNIT)
            except AssertionError:
                raise AssertionError("alice never heard of bob:\n"
                                     + "\n---\n".join(p.output for p in procs)) from None
            assert b_client.call("echo", [1, "two"]) == [1, "two"]
        finally:
            a.close()
            b_client.close()
    finally:
        for p in procs:  # the workers first, the broker last
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)
