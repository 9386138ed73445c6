"""Where results live, and the Prefect settings that keep a local run quiet and offline.

Prefect reads its settings when it is imported, so `configure` runs before any import of it.
An explicit PREFECT_API_URL (a Prefect server and its UI) is respected as it is.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mmdiag.pipeline.errors import MmdiagError

QUIET = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # no telemetry attempts from the temporary server
    "DO_NOT_TRACK": "1",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",  # a fresh PREFECT_HOME needs ~20 s
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}


def configure(cache: Path) -> None:
    os.environ.setdefault("PREFECT_HOME", str(cache / "prefect"))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)


class _DropUserErrors(logging.Filter):
    """A user's mistake (MmdiagError) is reported once, as one line, by the CLI; Prefect's own
    report of the failed task (with its traceback) would bury it."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, MmdiagError) and "MmdiagError" not in record.getMessage()


def quiet_user_errors() -> None:
    """Call after importing Prefect: its console handler sits on the root logger."""
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _DropUserErrors) for f in handler.filters):
                handler.addFilter(_DropUserErrors())
    # a failed run's pending UI events are flushed at exit with a warning that says nothing to users
    logging.getLogger("EventsWorker").setLevel(logging.ERROR)
