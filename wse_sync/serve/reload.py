"""``--reload``: notice when the app's source files change (polling, no dependency).

``Watcher(dirs).changed()`` returns the ``*.py`` files added, removed or
modified under ``dirs`` since the last call; virtualenvs, caches and VCS
directories are skipped, and at most ``MAX_FILES`` files are watched.
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, List, Tuple

__all__ = ["Watcher", "MAX_FILES"]

MAX_FILES = 20000
SKIP = frozenset({".git", ".hg", "__pycache__", "node_modules", ".tox", ".venv", "venv",
                  "site-packages", ".mypy_cache", ".pytest_cache", ".ruff_cache"})


class Watcher:
    def __init__(self, dirs: Iterable[str], suffixes: Tuple[str, ...] = (".py",)) -> None:
        self.dirs = [os.path.abspath(d) for d in dirs]
        self.suffixes = suffixes
        self._seen = self._scan()

    def _scan(self) -> Dict[str, float]:
        seen: Dict[str, float] = {}
        for top in self.dirs:
            for root, subdirs, files in os.walk(top):
                subdirs[:] = [d for d in subdirs if d not in SKIP and not d.endswith(".egg-info")]
                for name in files:
                    if name.endswith(self.suffixes):
                        path = os.path.join(root, name)
                        try:
                            seen[path] = os.stat(path).st_mtime_ns
                        except OSError:
                            continue
                        if len(seen) >= MAX_FILES:
                            return seen
        return seen

    def changed(self) -> List[str]:
        now = self._scan()
        before = self._seen
        self._seen = now
        return sorted(p for p in set(now) | set(before) if now.get(p) != before.get(p))
