"""The demo's later runs beside the first: started at its first computation, never when all is
cached; their lines relayed with the run's name; cores shared out as runs end; a failure's
exit code kept. Children here are small scripts that behave like `mmdiag diagnose`."""

import logging
import os
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest
import torch

from flows import cache, progress, side_by_side

CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    config = Path(sys.argv[1]).read_text()
    sys.stderr.write("mmdiag: unimodal:  50% (shapley, batch 1/2), ~1 s left\\n")
    sys.stderr.write("mmdiag: threads " + os.environ["OMP_NUM_THREADS"] + " api " + os.environ.get("MMDIAG_PARENT_API_URL", "-") + "\\n")
    sys.stderr.flush()
    if "fail" in config:
        sys.stderr.write("mmdiag: error: data.split: unknown split 'x'\\n")
        sys.exit(2)
    if "listen" in config:
        from flows.side_by_side import follow_parent
        follow_parent()
        import torch
        deadline = time.time() + 20
        while torch.get_num_threads() == int(os.environ["OMP_NUM_THREADS"]) and time.time() < deadline:
            time.sleep(0.05)
        sys.stderr.write(f"mmdiag: now {torch.get_num_threads()} threads\\n")
    elif "slow" in config:
        time.sleep(1.0)
    sys.stderr.write("mmdiag: unimodal: 100% (done)\\n")
    print("/runs/" + config.split('"run": "')[1].split('"')[0] + "/summary.json")
""")


class Config(SimpleNamespace):
    def model_copy(self, update):
        return Config(**{**vars(self), **update})

    def model_dump(self, mode):
        return {"run": self.run, "out": str(self.out), "cache": None}


@pytest.fixture
def children(monkeypatch, tmp_path):
    """Overflow, with children that run CHILD on the run's config."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    monkeypatch.setattr(side_by_side.Overflow, "command", lambda self, config: [sys.executable, str(script), str(config)])
    monkeypatch.setattr(side_by_side, "cores", lambda: 2)
    monkeypatch.setenv("PYTHONPATH", os.getcwd())
    yield lambda *runs: [Config(run=r, out=tmp_path / "out", cache=None) for r in runs]
    torch.set_num_threads(2)


def compute():
    for hook in list(cache.before_computing):
        hook("evaluate")


def test_nothing_starts_beside_a_run_that_finds_everything_cached(children):
    with side_by_side.Overflow(children("demo-late"), "http://x/api", first="demo-film") as overflow:
        pass
    assert not overflow.started and cache.before_computing == []


def test_the_later_runs_start_at_the_first_computation_and_come_back_tagged_in_order(children, caplog):
    with caplog.at_level(logging.INFO, logger="mmdiag"):
        with side_by_side.Overflow(children("late-slow"), "http://127.0.0.1:9/api", first="demo-film") as overflow:
            compute()
            compute()  # a second computation starts nothing more
            assert overflow.started and len(overflow.children) == 1
            assert progress.run_tag == "demo-film" and torch.get_num_threads() == 1  # one core of two for this run
            outputs = overflow.finish()
    assert outputs == [["/runs/late-slow/summary.json"]]
    lines = [r.getMessage() for r in caplog.records]
    assert "late-slow: unimodal:  50% (shapley, batch 1/2), ~1 s left" in lines
    assert "late-slow: threads 1 api http://127.0.0.1:9/api" in lines  # its share, and this process's server
    assert "late-slow: unimodal: 100% (done)" in lines
    assert progress.run_tag == "" and cache.before_computing == []


def test_a_run_that_ends_gives_its_cores_to_the_others(children, caplog):
    with caplog.at_level(logging.INFO, logger="mmdiag"):
        with side_by_side.Overflow(children("late-listen"), None, first="demo-film") as overflow:
            compute()
            assert torch.get_num_threads() == 1
            outputs = overflow.finish()  # this run ends: the child is told to take both cores
    assert outputs == [["/runs/late-listen/summary.json"]]
    assert "late-listen: now 2 threads" in [r.getMessage() for r in caplog.records]


def test_this_run_takes_the_cores_of_a_child_that_ended(children):
    with side_by_side.Overflow(children("quick"), None, first="demo-film") as overflow:
        compute()
        assert torch.get_num_threads() == 1
        deadline = time.time() + 20
        while torch.get_num_threads() == 1 and time.time() < deadline:
            time.sleep(0.05)  # the watcher's SIGUSR1 is handled on this, the main, thread
        assert torch.get_num_threads() == 2
        overflow.finish()


def test_a_failed_run_beside_gives_its_exit_code_and_its_own_line(children, caplog, monkeypatch):
    monkeypatch.setattr(side_by_side, "cores", lambda: 3)  # a core for each of three runs
    with caplog.at_level(logging.INFO, logger="mmdiag"):
        with pytest.raises(side_by_side.Failed) as failed:
            with side_by_side.Overflow(children("fail", "late-slow"), None, first="demo-film") as overflow:
                compute()
                overflow.finish()
    assert failed.value.code == 2
    assert "fail: error: data.split: unknown split 'x'" in [r.getMessage() for r in caplog.records]


def test_an_interrupted_run_stops_the_runs_beside_it(children):
    with pytest.raises(KeyboardInterrupt):
        with side_by_side.Overflow(children("late-listen"), None, first="demo-film") as overflow:
            compute()
            raise KeyboardInterrupt
    assert all(c.process.poll() is not None for c in overflow.children)
