"""Live progress of a stage: `Reporter` is the `progress(what, fraction)` callback of the stage
context. It writes one log line per step at most every `every` seconds (plain lines off a
terminal, rich's on one), with an estimate of the time left, and, when a Prefect server is
set (PREFECT_API_URL), keeps a progress artifact of the task run up to date."""

from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger("mmdiag")


class Reporter:
    def __init__(self, label: str, every: float = 3.0, clock=time.monotonic):
        self.label, self.every, self.clock = label, every, clock
        self.start = clock()
        self.last: float | None = None
        self.finished = False
        self.artifact = None
        self.lock = threading.Lock()  # shards of a stage report from threads of one process

    def __call__(self, what: str, fraction: float) -> None:
        now = self.clock()
        with self.lock:
            if self.finished or (self.last is not None and now - self.last < self.every and fraction < 1):
                return
            self.last, self.finished = now, fraction >= 1
        elapsed = now - self.start
        left = f", ~{elapsed * (1 - fraction) / fraction:.0f} s left" if 0 < fraction < 1 else ""
        log.info("%s: %3.0f%% (%s)%s", self.label, 100 * fraction, what, left)
        if os.environ.get("PREFECT_API_URL"):
            self._artifact(100 * fraction, what)

    def _artifact(self, percent: float, what: str) -> None:
        try:
            from prefect.artifacts import create_progress_artifact, update_progress_artifact

            if self.artifact is None:
                self.artifact = create_progress_artifact(progress=percent, description=f"mmdiag {self.label}")
            else:
                update_progress_artifact(self.artifact, progress=percent, description=f"mmdiag {self.label}: {what}")
        except Exception as e:  # progress is a courtesy: a server hiccup never fails a stage
            log.debug("progress artifact not updated: %s", e)
