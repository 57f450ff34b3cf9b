"""The pure modules import nothing of gevent or ZeroMQ; the public names still
work. Each check runs in a fresh interpreter (a subprocess): this one has
imported everything already."""
import subprocess
import sys
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "wse_sync" / "core"
PURE = sorted("wse_sync.core." + p.stem for p in CORE.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("module", PURE)
def test_a_pure_module_pulls_in_no_io_library(module):
    code = (f"import sys, {module}; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('gevent', 'zmq', 'geventwebsocket'));"
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_public_names_are_there():
    code = ("import wse_sync; "
            "missing = [n for n in wse_sync.__all__ if getattr(wse_sync, n, None) is None]; "
            "print(missing); from wse_sync import WseServer, WSE_REASON; "
            "assert WSE_REASON.BY_CLIENT == 'wse.by-client'; "
            "import sys; sys.exit(1 if missing else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_mount_stays_the_function_after_the_runtime_modules_are_imported():
    code = ("import wse_sync.gunicorn, wse_sync.wsgi, wse_sync.gunicorn_conf; "
            "from wse_sync import mount; import wse_sync; "
            "assert callable(mount) and callable(wse_sync.mount), mount")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
