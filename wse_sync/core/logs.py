"""One log format for every wse_sync process (supervisor, broker, workers, gunicorn).

``setup(level, fmt, config)``: ``fmt`` is "text" (``FORMAT``) or "json" (one
object per line: time, level, logger, pid, message, and the traceback as
``exc``); ``config`` is a logging configuration file (``.json``: a
``logging.config.dictConfig`` dictionary; ``.ini``/``.conf``: ``fileConfig``)
that replaces both. ``dict_config(level, fmt)`` is the same setup as a
dictConfig dictionary (gunicorn's ``logconfig_dict``).
"""
from __future__ import annotations

import json
import logging
import logging.config
import time
from typing import Any, Dict, Optional

__all__ = ["FORMAT", "LEVELS", "FORMATS", "JsonFormatter", "LogConfigError", "setup",
           "dict_config", "load_config", "check_level"]

FORMAT = "%(asctime)s %(levelname)s [%(name)s:%(process)d] %(message)s"
LEVELS = ("critical", "error", "warning", "info", "debug")
FORMATS = ("text", "json")


class LogConfigError(ValueError):
    """A log configuration file that cannot be used."""


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        out: Dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def dict_config(level: str = "info", fmt: str = "text") -> Dict[str, Any]:
    """dictConfig for wse_sync's loggers, gunicorn's and the root, on stderr."""
    formatter: Dict[str, Any] = ({"()": "wse_sync.core.logs.JsonFormatter"} if fmt == "json"
                                 else {"format": FORMAT})
    handler = {"class": "logging.StreamHandler", "formatter": "wse", "stream": "ext://sys.stderr"}
    lvl = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"wse": formatter},
        "handlers": {"wse": handler},
        "root": {"level": lvl, "handlers": ["wse"]},
        "loggers": {
            # gunicorn's own loggers, in the same format (they do not propagate);
            # gunicorn sets the error log's level (--log-level); its access log
            # (a line per request) stays quiet: configure logging to have it
            "gunicorn.error": {"handlers": ["wse"], "propagate": False},
            "gunicorn.access": {"level": "WARNING", "handlers": ["wse"], "propagate": False},
        },
    }


def setup(level: str = "info", fmt: str = "text", config: Optional[str] = None) -> None:
    """Configure this process's logging (see the module docstring)."""
    if config:
        load_config(config)
        return
    if fmt not in FORMATS:
        raise LogConfigError(f"unknown log format {fmt!r} (one of {', '.join(FORMATS)})")
    logging.config.dictConfig(dict_config(level, fmt))
    logging.captureWarnings(True)


def load_config(path: str) -> None:
    """Apply a .json (dictConfig) or .ini/.conf (fileConfig) file; LogConfigError says why not."""
    try:
        if path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                logging.config.dictConfig(json.load(f))
        else:
            logging.config.fileConfig(path, disable_existing_loggers=False)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError) as exc:
        raise LogConfigError(f"cannot use --log-config {path}: {exc}") from None


def check_level(level: str) -> str:
    if level.lower() not in LEVELS:
        raise LogConfigError(f"unknown log level {level!r} (one of {', '.join(LEVELS)})")
    return level.lower()
