"""`mmdiag demo`'s later models diagnosed beside the first: once the first run has something to
compute, each later run starts in a child process of its own (`mmdiag diagnose` on its config),
the CPU cores are shared out between all of them, and this process's Prefect server serves all.

Why: small models use two cores poorly. A demo-film forward pass at 128 inputs is only 1.3x
faster on two threads than on one (the time between PyTorch's operations does not shrink with
threads), so two runs of one thread each keep both cores busy. A run that finds everything
cached needs no help: a child's start-up (imports, data, model) would cost more than it saves,
so the later runs then go on one after the other in this process, as with `--one-by-one`.

A child's log lines come back here tagged with its run's name (on a terminal, its progress
lines move bars beside this process's own). When a run ends, the others take its cores (a
child through its threads file and SIGUSR1). Each run writes its folder atomically; a child
that fails is reported by its own error line, and its exit code becomes this process's.
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

from flows import cache, progress
from flows.server import PARENT_API_URL
from pipeline.store import write_text

log = logging.getLogger("mmdiag")

THREADS_FILE = "MMDIAG_THREADS_FILE"  # a child's share of the cores, rewritten as other runs end
PROGRESS = re.compile(r"^(?P<stage>[\w-]+): +(?P<percent>\d+)% \((?P<what>.*?)\)(?:, ~\d+ s left)?$")
STOP_WAIT_S = 30


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Failed(Exception):
    """A child run failed (its own error line was relayed): the exit code it gave."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


@dataclass
class Child:
    run: str
    threads: Path
    process: subprocess.Popen
    output: list[str] = field(default_factory=list)
    readers: list[threading.Thread] = field(default_factory=list)


class Overflow:
    """Within `with Overflow(later, api_url, first=run):` this process runs the first config; the
    later configs start as children at its first computation (`started`, then `finish()`), or
    not at all. `api_url`: this process's temporary server (None: the user's PREFECT_API_URL)."""

    def __init__(self, configs, api_url: str | None, verbose: bool = False, first: str = ""):
        self.configs, self.api_url, self.verbose, self.first = list(configs), api_url, verbose, first
        self.children: list[Child] = []
        self.lock = threading.Lock()
        self.mine = 0  # this process's share of the cores, while its run goes on
        self.tmp: tempfile.TemporaryDirectory | None = None

    @property
    def started(self) -> bool:
        return bool(self.children)

    def __enter__(self) -> "Overflow":
        if self.configs and cores() > len(self.configs):  # a core for each run
            cache.before_computing.append(self._start)
        return self

    def __exit__(self, kind, error, tb) -> None:
        if self._start in cache.before_computing:
            cache.before_computing.remove(self._start)
        if kind is not None:
            _stop(self.children, signal.SIGINT if issubclass(kind, KeyboardInterrupt) else signal.SIGTERM)
            self._cleanup()

    def _start(self, _task: str) -> None:
        """At the first computation of this process's run: the later runs, one child each."""
        cache.before_computing.remove(self._start)
        if threading.current_thread() is not threading.main_thread():  # sharded: threads are the runner's
            return
        self.tmp = tempfile.TemporaryDirectory(prefix="mmdiag-side-by-side-")
        share = max(1, cores() // (1 + len(self.configs)))
        self.mine = cores() - share * len(self.configs)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # inherited: a child ignores it until it listens (`follow_parent`)
        for i, config in enumerate(self.configs):
            self.children.append(self._spawn(i, config, share))
        # torch's thread count holds for the thread that sets it: this process's work is on the main
        # thread, where a signal's handler runs
        signal.signal(signal.SIGUSR1, lambda *_: _set_threads(self.mine))
        progress.run_tag = self.first  # this process's lines now need its run's name too
        log.info("%s: diagnosing beside %s, %d of %d cores each", ", ".join(c.run for c in self.configs), self.first, share, cores())
        _set_threads(self.mine)
        watcher = threading.Thread(target=self._watch, daemon=True)
        watcher.start()

    def _spawn(self, i: int, config, threads: int) -> Child:
        path = Path(self.tmp.name) / f"{i}.json"  # JSON is YAML: what `mmdiag diagnose` reads
        absolute = {"out": Path(config.out).resolve(), "cache": config.cache and Path(config.cache).resolve()}  # not the file's folder
        path.write_text(json.dumps(config.model_copy(update=absolute).model_dump(mode="json")))
        argv = self.command(path)
        share = Path(self.tmp.name) / f"{i}.threads"
        env = {**os.environ, THREADS_FILE: str(share), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               **({PARENT_API_URL: self.api_url} if self.api_url else {})}  # else the user's server, PREFECT_API_URL
        process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        child = Child(config.run, share, process)
        child.readers = [threading.Thread(target=_relay, args=(child.run, process.stderr), daemon=True),
                         threading.Thread(target=lambda: child.output.extend(line.rstrip("\n") for line in process.stdout), daemon=True)]
        for reader in child.readers:
            reader.start()
        return child

    def command(self, config: Path) -> list[str]:
        return [sys.executable, "-m", "flows.cli", *(["-v"] if self.verbose else []), "diagnose", "--config", str(config)]

    def _watch(self) -> None:
        """As each child ends, share its cores out among the runs still going."""
        for child in self.children:
            child.process.wait()
            self._share_out()

    def _share_out(self) -> None:
        with self.lock:
            running = [c for c in self.children if c.process.poll() is None]
            n = len(running) + bool(self.mine)
            if n == 0:
                return
            share = max(1, cores() // n)
            for child in running:
                write_text(child.threads, str(share))
                child.process.send_signal(signal.SIGUSR1)
            if self.mine:
                self.mine = cores() - share * len(running)
                os.kill(os.getpid(), signal.SIGUSR1)

    def finish(self) -> list[list[str]]:
        """After this process's run: its cores to the children; their standard output lines, in
        the configs' order, once all have ended (Failed at the first that failed)."""
        with self.lock:
            self.mine = 0  # from here no thread signals this process
        progress.run_tag = ""
        self._share_out()
        try:
            for child in self.children:
                child.process.wait()
                for reader in child.readers:
                    reader.join()
            failed = next((c.process.returncode for c in self.children if c.process.returncode != 0), None)
        finally:
            self._cleanup()
        if failed is not None:
            raise Failed(failed)
        return [c.output for c in self.children]

    def _cleanup(self) -> None:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # not the default, which ends a process
        progress.run_tag = ""
        if self.tmp is not None:
            self.tmp.cleanup()
            self.tmp = None


def _set_threads(n: int) -> None:
    if n > 0:
        import torch

        torch.set_num_threads(n)


def follow_parent() -> None:
    """In a child run: take the threads the parent gives as other runs end (SIGUSR1), and any
    share given before this process listened (the signal was ignored then)."""
    share = Path(os.environ[THREADS_FILE])

    def take(*_):
        if share.exists():
            _set_threads(int(share.read_text()))

    signal.signal(signal.SIGUSR1, take)
    take()


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


def _relay(run: str, stream) -> None:
    """A child's log lines as this process's, tagged with its run; on a terminal its progress
    lines move a bar (the finished stage's line stays in the log)."""
    bars, tasks = (progress.BARS if progress.terminal() else None), {}
    for line in stream:
        text = line.rstrip("\n")
        text = text[len("mmdiag: "):] if text.startswith("mmdiag: ") else text
        if not text.startswith(f"{run}: "):
            text = f"{run}: {text}"
        step = PROGRESS.match(text[len(run) + 2:])
        if bars is not None and step:
            stage, fraction = step["stage"], int(step["percent"]) / 100
            if stage not in tasks:
                tasks[stage] = bars.add(f"{run}: {stage}")
            bars.update(tasks[stage], f"{run}: {stage}: {step['what']}", fraction)
            if fraction < 1:
                continue
            bars.finish(tasks.pop(stage))
        log.info("%s", text)
