"""How ``serve`` starts its workers and broker: ``python_cmd(*args)``.

A child runs ``wse_sync <args>`` from this very package. ``python -m
wse_sync`` would import whichever ``wse_sync`` comes first on the child's
``sys.path``, which starts with its working directory: started from a
checkout (or next to a vendored copy), the workers would run that copy, not
the installed build the supervisor runs (its hot path compiled, say). The
child loads the package from the supervisor's directory by path; its
submodules follow the package's ``__path__``, and the app's own imports see
the usual ``sys.path``.
"""
from __future__ import annotations

import os
import sys
from typing import List

__all__ = ["python_cmd", "python_code"]

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# loads the package from the directory given as argv[1] (then argv is as usual)
_LOAD = (
    "import importlib.util, sys\n"
    "pkg = sys.argv.pop(1)\n"
    "spec = importlib.util.spec_from_file_location(\n"
    "    'wse_sync', pkg + '/__init__.py', submodule_search_locations=[pkg])\n"
    "sys.modules['wse_sync'] = module = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(module)\n"
)
_MAIN = "from wse_sync.serve.cli import main\nraise SystemExit(main())\n"


def python_cmd(*args: str) -> List[str]:
    """argv of a new Python process running ``wse_sync <args>`` from this package."""
    return python_code(_MAIN, *args)


def python_code(code: str, *args: str) -> List[str]:
    """argv of a new Python process running ``code`` (``sys.argv[1:]`` =
    ``args``) with this package as ``wse_sync``."""
    return [sys.executable, "-c", _LOAD + code, _PACKAGE_DIR, *args]
