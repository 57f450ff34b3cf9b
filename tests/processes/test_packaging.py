"""What `pip install .` ships: the wheel built from a copy of this tree (so
the build leaves nothing in the checkout) carries py.typed, the MIT license
in its metadata and the LICENSE file; the sdist too."""
import email
import importlib.machinery
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile

import pytest

from helpers import ROOT, UNIT

pytestmark = pytest.mark.timeout(int(180 * UNIT))

SKIP = shutil.ignore_patterns(".git", ".tox", ".ci", ".venv", "venv", "__pycache__",
                              "node_modules", "build", "dist", "*.egg-info", "results")


@pytest.fixture(scope="module")
def source():
    tmp = tempfile.mkdtemp(prefix="wse-pkg-")
    try:
        shutil.copytree(ROOT, os.path.join(tmp, "src"), ignore=SKIP)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _license(meta: email.message.Message) -> str:
    # setuptools writes License: (or License-Expression: in newer metadata)
    return meta.get("License-Expression") or meta.get("License") or ""


def test_the_wheel_has_py_typed_and_the_mit_license(source):
    out = os.path.join(source, "wheel")
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out,
                          os.path.join(source, "src")], capture_output=True, text=True,
                         timeout=150 * UNIT,
                         env={k: v for k, v in os.environ.items() if k != "WSE_SYNC_PURE"})
    assert run.returncode == 0, run.stdout + run.stderr
    (wheel,) = [f for f in os.listdir(out) if f.endswith(".whl")]
    with zipfile.ZipFile(os.path.join(out, wheel)) as z:
        names = z.namelist()
        assert "wse_sync/py.typed" in names
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = email.message_from_bytes(z.read(metadata))
        licenses = [n for n in names if ".dist-info/" in n and
                    os.path.basename(n) == "LICENSE"]
        assert licenses, names
        assert z.read(licenses[0]).decode().startswith("MIT License")
    assert _license(meta) == "MIT", meta.items()
    assert "LICENSE" in " ".join(meta.get_all("License-File") or []), meta.items()
    # where a C compiler and this Python's headers are, the hot path is compiled (setup.py)
    if _can_compile():
        compiled = sorted(n for n in names if n.startswith("wse_sync/core/")
                          and n.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)))
        assert [n.split("/")[-1].split(".")[0] for n in compiled] == ["frames", "websocket"], (
            names, run.stderr[-3000:])


def _can_compile() -> bool:
    include = sysconfig.get_paths()["include"]
    return bool(shutil.which("cc") or shutil.which("gcc")) and os.path.exists(
        os.path.join(include, "Python.h"))


def test_the_sdist_has_py_typed_and_the_mit_license(source):
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 61:  # pyproject.toml's floor
        pytest.skip(f"setuptools {setuptools.__version__} here; the build needs >= 61")
    out = os.path.join(source, "sdist")
    code = ("import sys; from setuptools import build_meta;"
            "print(build_meta.build_sdist(sys.argv[1]))")
    run = subprocess.run([sys.executable, "-c", code, out], capture_output=True, text=True,
                         cwd=os.path.join(source, "src"), timeout=60 * UNIT)
    assert run.returncode == 0, run.stdout + run.stderr
    name = run.stdout.strip().splitlines()[-1]
    with tarfile.open(os.path.join(out, name)) as t:
        names = t.getnames()
        top = name[:-len(".tar.gz")]
        assert f"{top}/wse_sync/py.typed" in names
        assert f"{top}/LICENSE" in names
        meta = email.message_from_bytes(t.extractfile(f"{top}/PKG-INFO").read())
    assert _license(meta) == "MIT", meta.items()
