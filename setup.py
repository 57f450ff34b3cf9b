"""Build hook: the hot path compiled with mypyc where it can be (metadata: setup.cfg).

The receive and send steps of every message (``core/frames.py``: frame
parse, unmask, UTF-8 check, framing; ``core/websocket.py``: the connection's
rules) are compiled to C extensions when mypyc (a build requirement in
pyproject.toml) and a C compiler are there. Each extension is optional: with
no compiler the build warns and goes on, and the same modules run as
Python. ``WSE_SYNC_PURE=1`` builds the pure-Python package on purpose (for
an editable install in which those modules are edited: a compiled module
shadows its .py).
"""
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

COMPILED = ["wse_sync/core/frames.py", "wse_sync/core/websocket.py"]


def ext_modules():
    if os.environ.get("WSE_SYNC_PURE", "") not in ("", "0"):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:  # built without the build requirements: the pure package
        return []
    try:
        # (the modules import only the core; what lies beyond is not analysed)
        extensions = mypycify(["--follow-imports=silent", "--ignore-missing-imports", *COMPILED],
                              opt_level="3")
    except (Exception, SystemExit) as exc:  # mypy refused the modules: stay pure, loudly
        print(f"wse_sync: not compiled ({exc!r}): the pure-Python modules", file=sys.stderr)
        return []
    for ext in extensions:
        ext.optional = True  # no compiler: a warning, and the .py modules run
    return extensions


class AllOrNothing(build_ext):
    """mypyc's modules are shims over one shared library: when any of them
    failed to build, none is kept (a shim without its library cannot import)."""

    def run(self):
        super().run()
        paths = [self.get_ext_fullpath(ext.name) for ext in self.extensions]
        if not all(os.path.exists(path) for path in paths):
            for path in paths:
                if os.path.exists(path):
                    os.remove(path)
            print("wse_sync: the compiled hot path did not build whole: the pure-Python"
                  " modules", file=sys.stderr)


setup(ext_modules=ext_modules(), cmdclass={"build_ext": AllOrNothing})
