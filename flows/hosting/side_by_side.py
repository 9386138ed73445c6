"""`mmdiag demo`'s later models diagnosed beside the first, on a machine with a core or so for
each model: once the first run has something to compute, each later run starts in a child
process (`mmdiag diagnose` on its config) with one thread, this process goes on with one, and
this process's Prefect server serves all of them.

Why: small models use two cores poorly. A demo-film forward pass at 128 inputs is only 1.3x
faster on two threads than on one (the time between PyTorch's operations does not shrink with
threads), so two runs of one thread each keep both cores busy. A run that finds everything
cached needs no help (a child's start-up would cost more than it saves), so the later runs
then go on one after the other in this process, as with `--one-by-one`.

Only one thread a run, and no thread count is ever raised: in this PyTorch build (2.13, MKL),
after `torch.set_num_threads(k)` with k >= 2 MKL's batched LU factorisation returns invalid
pivots (`torch.linalg.solve` of 7 x 257 x 257 fails; stage 3's probes use it), while one thread,
or threads set by OMP_NUM_THREADS at the start of a process, are sound (tested). With more
cores than that, a run already gets several threads of its own and the models go one by one.
Missing weights are trained here, before this process gives up its threads, so they are the
ones a one-by-one run trains.

A child's log lines come back tagged with its run's name (on a terminal its progress lines move
bars beside this process's own). Each run writes its folder atomically; a child that fails is
reported by its own error line, and its exit code becomes this process's.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from mmdiag.flows.hosting.server import PARENT_API_URL

log = logging.getLogger("mmdiag")

PROGRESS = re.compile(r"^(?P<stage>[\w-]+): +(?P<percent>\d+)% \((?P<what>.*?)\)(?:, ~\d+ s left)?$")
STOP_WAIT_S = 30


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worth_it(runs: int) -> bool:
    """Side by side when each of `runs` runs gets a core, and one by one would give none of them
    more than one thread and a half."""
    return runs > 1 and runs <= cores() < 2 * runs


class Failed(Exception):
    """A child run failed (its own error line was relayed): the exit code it gave."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


@dataclass
class Child:
    run: str
    process: subprocess.Popen
    output: list[str] = field(default_factory=list)
    readers: list[threading.Thread] = field(default_factory=list)


class Overflow:
    """Within `with Overflow(later, server, first=run):` this process runs the first config; the
    later configs start as children at its first computation (`started`, then `finish()`), or
    not at all. `server`: this process's temporary server (None: the user's PREFECT_API_URL),
    whose URL is read when the children start (a port taken meanwhile moves it)."""

    def __init__(self, configs, server, verbose: bool = False, first: str = ""):
        self.configs, self.server, self.verbose, self.first = list(configs), server, verbose, first
        self.children: list[Child] = []
        self.tmp: tempfile.TemporaryDirectory | None = None
        self.lock = threading.Lock()

    @property
    def started(self) -> bool:
        return bool(self.children)

    def __enter__(self) -> Overflow:
        from mmdiag.flows import cache

        if self.configs and worth_it(1 + len(self.configs)):
            cache.before_computing.append(self._start)
        return self

    def __exit__(self, kind, error, tb) -> None:
        from mmdiag.flows import cache

        if self._start in cache.before_computing:
            cache.before_computing.remove(self._start)
        if kind is not None:
            _stop(self.children, signal.SIGINT if issubclass(kind, KeyboardInterrupt) else signal.SIGTERM)
            self._cleanup()

    def _start(self, _task: str) -> None:
        """At the first computation of this process's run: the later runs, one child each."""
        import torch

        from mmdiag.flows import cache, progress
        from mmdiag.pipeline.device import resolve_device
        from mmdiag.pipeline.resolve import load_model

        with self.lock:  # sharded runs compute in several threads at once
            if self._start not in cache.before_computing:
                return
            cache.before_computing.remove(self._start)
        if threading.current_thread() is not threading.main_thread():  # sharded: the runner's threads
            return
        for config in self.configs:  # missing weights trained here, with this process's threads: as one by one
            load_model(config.model, config.cache, resolve_device(config.device).type)
        self.tmp = tempfile.TemporaryDirectory(prefix="mmdiag-side-by-side-")
        for i, config in enumerate(self.configs):
            self.children.append(self._spawn(i, config))  # one by one: a failed start still stops those started
        torch.set_num_threads(1)  # lowered to one only (see the module's note)
        log.info("%s: diagnosing beside %s, one thread each", ", ".join(c.run for c in self.configs), self.first)
        progress.run_tag = self.first  # this process's lines now need its run's name too

    def _spawn(self, i: int, config) -> Child:
        path = Path(self.tmp.name) / f"{i}.json"  # JSON is YAML: what `mmdiag diagnose` reads
        absolute = {"out": Path(config.out).resolve(), "cache": config.cache and Path(config.cache).resolve()}  # not the file's folder
        path.write_text(json.dumps(config.model_copy(update=absolute).model_dump(mode="json")))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **({PARENT_API_URL: self.server.api_url} if self.server else {})}
        # a process group of its own: a Ctrl-C reaches it once, from this process (`_stop`)
        process = subprocess.Popen(self.command(path), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1, process_group=0)
        child = Child(config.run, process)
        child.readers = [
            threading.Thread(target=_relay, args=(child.run, process.stderr), daemon=True),
            threading.Thread(target=lambda: child.output.extend(line.rstrip("\n") for line in process.stdout), daemon=True),
        ]
        for reader in child.readers:
            reader.start()
        return child

    def command(self, config: Path) -> list[str]:
        return [sys.executable, "-m", "mmdiag.flows.cli", *(["-v"] if self.verbose else []), "diagnose", "--config", str(config)]

    def finish(self) -> list[list[str]]:
        """After this process's run: the children's standard output lines, in the configs'
        order, once all have ended (Failed at the first that failed)."""
        try:
            for child in self.children:
                child.process.wait()
                for reader in child.readers:
                    reader.join()
            failed = next((c for c in self.children if c.process.returncode != 0), None)
        finally:
            self._cleanup()
        if failed is not None:
            code = failed.process.returncode
            if code < 0:  # killed (out of memory, say): it said nothing itself
                log.error("error: %s: its process was ended by signal %d (%s); rerun with --one-by-one to see its own error", failed.run, -code, signal.Signals(-code).name)
                code = 128 - code
            raise Failed(code)
        return [c.output for c in self.children]

    def _cleanup(self) -> None:
        from mmdiag.flows import progress

        progress.run_tag = ""
        if self.tmp is not None:
            self.tmp.cleanup()
            self.tmp = None


def _stop(children: list[Child], sig: int) -> None:
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(sig)
    for child in children:
        try:
            child.process.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()
        for reader in child.readers:
            reader.join(timeout=5)  # its last lines


def _relay(run: str, stream) -> None:
    """A child's log lines as this process's, tagged with its run (an error line stays one:
    `mmdiag: error: RUN: ...`); on a terminal its progress lines move a bar (the finished
    stage's line stays in the log). Reads to the end whatever happens, so the child never
    blocks on a full pipe."""
    from mmdiag.flows import progress

    bars, tasks = (progress.BARS if progress.terminal() else None), {}
    for line in stream:
        try:
            text = line.rstrip("\n")
            text = text[len("mmdiag: ") :] if text.startswith("mmdiag: ") else text
            if text.startswith("error: "):
                log.error("error: %s: %s", run, text[len("error: ") :], extra={"relayed": True})
                continue
            text = text[len(run) + 2 :] if text.startswith(f"{run}: ") else text
            step = PROGRESS.match(text)
            if bars is not None and step:
                stage, fraction = step["stage"], int(step["percent"]) / 100
                if stage not in tasks:
                    tasks[stage] = bars.add(f"{run}: {stage}")
                bars.update(tasks[stage], f"{run}: {stage}: {step['what']}", fraction)
                if fraction < 1:
                    continue
                bars.finish(tasks.pop(stage))
            log.info("%s: %s", run, text, extra={"relayed": True})
        except Exception as e:  # a line we could not show must not stop the reading
            log.debug("%s: a line was not relayed: %s", run, e)
    for task in tasks.values():  # stages the child never finished
        bars.finish(task)
