"""Log output: plain text for people, or one JSON object per line (`--log-format json`, by
python-json-logger) for log search. Lifecycle events carry `model`, `version` and `identity` as
fields where known (`extra=`). No record ever carries a tensor value (see SECURITY.md)."""
from __future__ import annotations

import logging
import sys


def configure(level: str, fmt: str = "text", worker: str | None = None) -> None:
    """Set up the root logger once, in the `medserve` command or a worker process (never at
    import); `worker` tags every line of a `--workers N` process."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            static_fields={"worker": worker} if worker else {},
        ))
    else:
        tag = f" {worker}" if worker else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s{tag} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level))
