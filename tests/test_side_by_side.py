"""The demo's later runs beside the first: started at its first computation, never when all is
cached; their lines relayed with the run's name; one thread a run; a failure's exit code kept.
Children here are small scripts that behave like `mmdiag diagnose`."""

import logging
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from mmdiag.flows import cache, progress
from mmdiag.flows.hosting import side_by_side

CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    config = Path(sys.argv[1]).read_text()
    sys.stderr.write("mmdiag: unimodal:  50% (shapley, batch 1/2), ~1 s left\\n")
    sys.stderr.write("mmdiag: threads " + os.environ["OMP_NUM_THREADS"] + " api " + os.environ.get("MMDIAG_PARENT_API_URL", "-") + "\\n")
    sys.stderr.flush()
    if "fail" in config:
        sys.stderr.write("mmdiag: error: data.split: unknown split 'x'\\n")
        sys.exit(2)
    if "killed" in config:
        import signal
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(20 if "hang" in config else 0.5)
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
    """Overflow on a 2-core machine, with children that run CHILD on the run's config."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    monkeypatch.setattr(side_by_side.Overflow, "command", lambda self, config: [sys.executable, str(script), str(config)])
    monkeypatch.setattr(side_by_side, "cores", lambda: 2)
    prepared = []  # the later runs' models, loaded (or trained) by this process before they start
    monkeypatch.setattr("mmdiag.pipeline.resolve.load_model", lambda spec, cache, device: prepared.append(spec))
    # this process's threads are only recorded: raising them again afterwards would break MKL's LU
    # for the tests that follow (see flows/hosting/side_by_side.py)
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    make = lambda *runs: [Config(run=r, out=tmp_path / "out", cache=None, model=f"model of {r}", device="cpu") for r in runs]  # noqa: E731
    make.prepared, make.threads = prepared, threads
    return make


def compute():
    for hook in list(cache.before_computing):
        hook("evaluate")


@pytest.mark.parametrize("n_cores, runs, beside", [(1, 2, False), (2, 2, True), (3, 2, True), (4, 2, False), (3, 3, True), (2, 1, False)])
def test_side_by_side_only_where_one_by_one_leaves_each_run_a_thread_or_so(monkeypatch, n_cores, runs, beside):
    monkeypatch.setattr(side_by_side, "cores", lambda: n_cores)
    assert side_by_side.worth_it(runs) is beside


def test_nothing_starts_beside_a_run_that_finds_everything_cached(children):
    with side_by_side.Overflow(children("demo-late"), SimpleNamespace(api_url="http://x/api"), first="demo-film") as overflow:
        pass
    assert not overflow.started and cache.before_computing == [] and children.prepared == [] and children.threads == []


def test_the_later_runs_start_at_the_first_computation_and_come_back_tagged_in_order(children, caplog):
    with caplog.at_level(logging.INFO, logger="mmdiag"):
        with side_by_side.Overflow(children("demo-late"), SimpleNamespace(api_url="http://127.0.0.1:9/api"), first="demo-film") as overflow:
            compute()
            compute()  # a second computation starts nothing more
            assert overflow.started and len(overflow.children) == 1
            assert children.prepared == ["model of demo-late"]  # its weights made here first, as one by one would
            assert progress.run_tag == "demo-film" and children.threads == [1]  # this run keeps one thread
            outputs = overflow.finish()
    assert outputs == [["/runs/demo-late/summary.json"]]
    lines = [r.getMessage() for r in caplog.records]
    assert "demo-late: diagnosing beside demo-film, one thread each" in lines
    assert "demo-late: unimodal:  50% (shapley, batch 1/2), ~1 s left" in lines
    assert "demo-late: threads 1 api http://127.0.0.1:9/api" in lines  # one thread, and this process's server
    assert "demo-late: unimodal: 100% (done)" in lines
    assert progress.run_tag == "" and cache.before_computing == []


def test_a_failed_run_beside_gives_its_exit_code_and_its_own_line(children, caplog, monkeypatch):
    monkeypatch.setattr(side_by_side, "cores", lambda: 3)  # a core for each of three runs
    with caplog.at_level(logging.INFO, logger="mmdiag"):
        with pytest.raises(side_by_side.Failed) as failed:
            with side_by_side.Overflow(children("fail", "demo-late"), None, first="demo-film") as overflow:
                compute()
                overflow.finish()
    assert failed.value.code == 2
    assert "error: fail: data.split: unknown split 'x'" in [r.getMessage() for r in caplog.records]  # still `mmdiag: error: ...`


def test_a_run_beside_ended_by_a_signal_says_so(children, caplog):
    with caplog.at_level(logging.INFO, logger="mmdiag"):
        with pytest.raises(side_by_side.Failed) as failed:
            with side_by_side.Overflow(children("killed"), None, first="demo-film") as overflow:
                compute()
                overflow.finish()
    assert failed.value.code == 128 + 9
    assert any(r.getMessage().startswith("error: killed: its process was ended by signal 9 (SIGKILL)") for r in caplog.records)


def test_this_runs_own_lines_carry_its_name_while_others_report_beside_it(monkeypatch):
    import io

    from mmdiag.flows import logs

    screen = io.StringIO()
    monkeypatch.setattr(sys, "stderr", screen)
    logs.setup()
    log = logging.getLogger("mmdiag")
    monkeypatch.setattr(progress, "run_tag", "demo-film")
    log.info("evaluate: the model on ood")
    log.info("demo-film: unimodal: 100% (done)")
    log.info("%s: %s", "demo-late", "unimodal:  50% (x)", extra={"relayed": True})
    monkeypatch.setattr(progress, "run_tag", "")
    log.info("evaluate: alone")
    assert screen.getvalue().splitlines() == [
        "mmdiag: demo-film: evaluate: the model on ood",
        "mmdiag: demo-film: unimodal: 100% (done)",
        "mmdiag: demo-late: unimodal:  50% (x)",
        "mmdiag: evaluate: alone",
    ]


def test_an_interrupted_run_stops_the_runs_beside_it(children):
    with pytest.raises(KeyboardInterrupt):
        with side_by_side.Overflow(children("hang"), None, first="demo-film") as overflow:
            compute()
            raise KeyboardInterrupt
    assert all(c.process.poll() is not None for c in overflow.children)


LU = "import torch; a = torch.randn(7, 257, 257); torch.linalg.solve(a @ a.mT + torch.eye(257), torch.randn(7, 257, 4)); print('ok')"


@pytest.mark.parametrize("how", ["OMP_NUM_THREADS=1 at the start (a child)", "lowered to one after work on all (this process)"])
def test_one_thread_keeps_mkls_lu_sound(how):
    """What side by side relies on; raising threads with torch.set_num_threads(k >= 2) breaks it."""
    code = LU if how.startswith("OMP") else LU.replace("print('ok')", "torch.set_num_threads(1); ") + LU.removeprefix("import torch; ")
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if how.startswith("OMP") else dict(os.environ)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr[-300:]
