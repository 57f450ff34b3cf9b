"""Which build of the hot path runs (setup.py): tox says what it built
(``WSE_SYNC_EXPECT_BUILD``: ``compiled`` in the py3x envs, ``pure`` in the pure
env), so a compile that silently fell back to Python, or a pure env that got
a compiled wheel, fails here instead of passing the same tests unnoticed."""
import importlib.machinery
import os

import pytest

from wse_sync.core import frames, websocket

HOT_PATH = (frames, websocket)


def _compiled(module) -> bool:
    return module.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def test_the_hot_path_is_one_build():
    assert len({_compiled(m) for m in HOT_PATH}) == 1, [m.__file__ for m in HOT_PATH]


@pytest.mark.skipif(not os.environ.get("WSE_SYNC_EXPECT_BUILD"),
                    reason="tox names the build it made (WSE_SYNC_EXPECT_BUILD)")
def test_the_build_tox_made_is_the_one_that_runs():
    expected = os.environ["WSE_SYNC_EXPECT_BUILD"]
    assert expected in ("compiled", "pure")
    running = ["compiled" if _compiled(m) else "pure" for m in HOT_PATH]
    assert running == [expected] * len(HOT_PATH), [m.__file__ for m in HOT_PATH]
