"""Where a local ``wse-sync serve`` says what it runs, so ``wse-sync stats``
finds its broker without flags.

One JSON file per supervisor, ``serve-<pid>.json``, in ``$XDG_RUNTIME_DIR/wse-sync``
(else ``<tmp>/wse-sync-<uid>``, mode 0700): pid, host, port, app, broker
endpoint and the key file paths it was given. Removed on exit; files of
processes that are gone are ignored and removed.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict, List, Optional

__all__ = ["directory", "write", "remove", "live"]


def directory() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        return os.path.join(base, "wse-sync")
    return os.path.join(tempfile.gettempdir(), f"wse-sync-{os.getuid()}")


def write(info: Dict[str, Any]) -> Optional[str]:
    """Record this process's ``info``; the file's path, or None when it cannot be written."""
    folder = directory()
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        path = os.path.join(folder, f"serve-{os.getpid()}.json")
        tmp = path + ".tmp"
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(dict(info, pid=os.getpid()), f)
        os.replace(tmp, path)
        return path
    except OSError:
        return None


def remove(path: Optional[str]) -> None:
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def live() -> List[Dict[str, Any]]:
    """What the running local ``serve`` processes recorded, oldest first."""
    folder = directory()
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    out = []
    for name in names:
        if not (name.startswith("serve-") and name.endswith(".json")):
            continue
        path = os.path.join(folder, name)
        try:
            with open(path) as f:
                info = json.load(f)
            pid = int(info["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if _alive(pid):
            out.append(info)
        else:
            remove(path)
    return out
