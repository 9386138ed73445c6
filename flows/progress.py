"""Live progress of a stage: `Reporter` is the `progress(what, fraction)` callback of the stage
context. On a terminal it drives a rich progress bar (one line per running stage, with the time
left); elsewhere (CI, logs) it writes one log line at most every `every` seconds, with an
estimate of the time left. When a Prefect server is set (PREFECT_API_URL) it also keeps a
progress artifact of the task run up to date."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

log = logging.getLogger("mmdiag")


class Bars:
    """One rich Progress shared by the stages running in this process: started with the first
    stage that reports, stopped when the last one finishes (transient: the log keeps the lines
    of finished stages)."""

    def __init__(self, console=None):
        self.console, self.progress, self.lock = console, None, threading.Lock()

    def add(self, label: str) -> int:
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

        with self.lock:
            if self.progress is None:
                from rich import get_console

                self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn(), console=self.console or get_console(), transient=True)
                self.progress.start()
            return self.progress.add_task(label, total=1.0)

    def update(self, task: int, description: str, fraction: float) -> None:
        with self.lock:
            self.progress.update(task, description=description, completed=fraction)

    def finish(self, task: int) -> None:
        with self.lock:
            self.progress.remove_task(task)
            if not self.progress.tasks:
                self.progress.stop()
                self.progress = None


def terminal() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


BARS = Bars()
run_tag = ""  # the run's name before each stage's label, while other runs report beside this one (mmdiag.flows.hosting.side_by_side)


class Reporter:
    def __init__(self, label: str, every: float = 3.0, clock=time.monotonic, bars: Bars | None = None):
        self.label, self.every, self.clock = f"{run_tag}: {label}" if run_tag else label, every, clock
        self.bars = bars if bars is not None else (BARS if terminal() else None)
        self.task: int | None = None
        self.start = clock()
        self.last: float | None = None
        self.finished = False
        self.artifact = None
        self.lock = threading.Lock()  # shards of a stage report from threads of one process

    def __call__(self, what: str, fraction: float) -> None:
        now = self.clock()
        with self.lock:
            if self.finished:
                return
            if self.bars is not None:
                self._bar(what, fraction)
            elif self.last is not None and now - self.last < self.every and fraction < 1:
                return
            self.last, self.finished = now, fraction >= 1
        elapsed = now - self.start
        left = f", ~{elapsed * (1 - fraction) / fraction:.0f} s left" if 0 < fraction < 1 else ""
        if self.bars is None or self.finished:  # on a terminal the bar shows the steps; the log keeps the end
            log.info("%s: %3.0f%% (%s)%s", self.label, 100 * fraction, what, left)
        if os.environ.get("PREFECT_API_URL"):
            self._artifact(100 * fraction, what)

    def _bar(self, what: str, fraction: float) -> None:
        if self.task is None:
            self.task = self.bars.add(self.label)
        self.bars.update(self.task, f"{self.label}: {what}", min(fraction, 1.0))
        if fraction >= 1:
            self.bars.finish(self.task)

    def _artifact(self, percent: float, what: str) -> None:
        try:
            from prefect.artifacts import create_progress_artifact, update_progress_artifact

            if self.artifact is None:
                self.artifact = create_progress_artifact(progress=percent, description=f"mmdiag {self.label}")
            else:
                update_progress_artifact(self.artifact, progress=percent, description=f"mmdiag {self.label}: {what}")
        except Exception as e:  # progress is a courtesy: a server hiccup never fails a stage
            log.debug("progress artifact not updated: %s", e)
