"""The Prefect flow: caching, rerunning one stage, interruption, and bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmdiag.flows.cli import main
from mmdiag.stages import registry

TESTS = Path(__file__).parent


def _summary(run):
    return json.loads((run / "summary.json").read_text())


def test_only_tasks_on_a_gpu_carry_the_gpu_tag():
    from mmdiag.flows import tasks
    from mmdiag.flows.flow import gpu_tags

    assert tasks.run_stage.with_options(tags=gpu_tags("cuda")).tags == {"gpu"}
    assert tasks.run_stage.with_options(tags=gpu_tags("cpu")).tags == set()
    assert tasks.evaluate.with_options(tags=gpu_tags("cpu")).tags == set()


@pytest.mark.slow
def test_second_run_takes_every_stage_from_cache_and_rerun_recomputes_dependents(toy, tmp_path, capsys, monkeypatch):
    import prefect.concurrency._sync as slots

    # on a CPU no task is tagged `gpu`, so none asks the server for a concurrency slot
    monkeypatch.setattr(slots, "acquire_concurrency_slots_with_lease", lambda *a, **k: pytest.fail("a CPU task asked for a concurrency slot"))
    cfg, run, computed = toy
    assert main(["diagnose", "--config", str(cfg)]) == 0
    assert computed() == ["first", "second", "third"]
    first = _summary(run)
    assert not any(s["cached"] for s in first["stages"].values())

    assert main(["diagnose", "--config", str(cfg)]) == 0
    assert computed() == []
    again = _summary(run)
    assert all(s["cached"] for s in again["stages"].values())
    assert {k: again[k] for k in ("first", "second", "third")} == {k: first[k] for k in ("first", "second", "third")}

    # a changed setting: that stage and the ones reading it
    import shutil

    before = tmp_path / "before"
    shutil.copytree(run, before)
    assert main(["rerun", str(run), "--stage", "second", "--set", "offset=1.5"]) == 0
    assert computed() == ["second", "third"]
    moved = _summary(run)
    assert moved["second"]["shifted"] == pytest.approx(first["second"]["shifted"] + 1.5)
    assert moved["stages"]["first"]["cached"] and not moved["stages"]["third"]["cached"]

    # forced recompute with the same settings: only that stage; its result is unchanged,
    # so the stage reading it stays cached
    assert main(["rerun", str(run), "--stage", "second"]) == 0
    assert computed() == ["second"]

    # compare: what moved between the two runs, and nothing when a run meets itself
    capsys.readouterr()
    assert main(["compare", str(before), str(run), "--json", str(tmp_path / "diff.json")]) == 0
    diff = json.loads((tmp_path / "diff.json").read_text())
    assert {m["figure"] for m in diff["moved"]} == {"second.shifted", "third.doubled"}
    assert diff["model"]["same"] and diff["accuracy"]["change"] == 0
    assert "second.shifted" in capsys.readouterr().out
    assert main(["compare", str(run), str(run), "--json", str(tmp_path / "diff.json")]) == 0
    assert json.loads((tmp_path / "diff.json").read_text())["moved"] == []


@pytest.mark.slow
def test_rerun_with_a_new_model_marks_the_stages_it_did_not_recompute(toy, tmp_path):
    from safetensors.torch import save_file

    from toy_stages import build_model

    cfg, run, computed = toy
    assert main(["diagnose", "--config", str(cfg)]) == 0
    computed()
    fixed = build_model(seed=1).module
    weights = tmp_path / "fixed.safetensors"
    save_file({k: v.contiguous() for k, v in fixed.state_dict().items()}, str(weights))
    assert main(["rerun", str(run), "--stage", "first", "--model", str(weights)]) == 0
    assert computed() == ["first"]
    summary = _summary(run)
    models = {name: s["model"] for name, s in summary["stages"].items()}
    assert models["first"] != models["model"] == models["second"] == models["third"]
    assert "different models" in summary["run"]["mixed_models"]
    run_json = json.loads((run / "run.json").read_text())
    assert run_json["stages"]["first"]["model"] == models["first"]

    # `diagnose` with the new checkpoint: every stage depends on the model, so all recompute
    cfg.write_text(cfg.read_text().replace("model: {factory: 'toy_stages:build_model'}", f"model: {{factory: 'toy_stages:build_model', weights: {weights}}}"))
    assert main(["diagnose", "--config", str(cfg)]) == 0
    assert computed() == ["first", "second", "third"]
    assert "mixed_models" not in _summary(run)["run"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_killed_run_resumes_from_finished_stages(toy, tmp_path, sig):
    cfg, run, computed = toy
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "TOY_BLOCK": "second", "TOY_ONLY": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mmdiag.flows.cli", "diagnose", "--config", str(cfg)], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while "second" not in (Path(env["TOY_LOG"]).read_text() if Path(env["TOY_LOG"]).exists() else ""):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr.read()
    assert not run.exists()
    assert not run.parent.exists() or not [p for p in run.parent.iterdir() if p.name.startswith(".")]
    assert computed() == ["first", "second"]

    assert main(["diagnose", "--config", str(cfg)]) == 0  # resume
    assert computed() == ["second", "third"]
    resumed = _summary(run)
    assert resumed["stages"]["first"]["cached"]

    uninterrupted = _summary(run)
    assert main(["rerun", str(run), "--stage", "first"]) == 0
    fresh = _summary(run)
    for stage in ("first", "second", "third"):
        assert fresh[stage] == uninterrupted[stage] == resumed[stage]


@pytest.mark.slow
def test_interrupt_ends_the_process_even_when_a_stage_does_not_stop(toy, tmp_path):
    from mmdiag.flows.flow import FORCED_EXIT_AFTER_S

    cfg, run, computed = toy
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "TOY_BLOCK": "second", "TOY_DEAF": "1", "TOY_ONLY": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mmdiag.flows.cli", "diagnose", "--config", str(cfg)], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while "second" not in (Path(env["TOY_LOG"]).read_text() if Path(env["TOY_LOG"]).exists() else ""):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=FORCED_EXIT_AFTER_S + 30)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr.read()
    assert not run.exists()


def test_bad_rerun_and_compare_input(toy, tmp_path, capsys):
    cfg, run, computed = toy
    cases = [
        (["rerun", str(tmp_path / "nowhere"), "--stage", "first"], "no run folder"),
        (["compare", str(tmp_path / "a"), str(tmp_path / "b")], "no run folder"),
    ]
    run.mkdir(parents=True)
    config = {"run": "toy", "model": {"factory": "toy_stages:build_model"}, "plugins": ["toy_stages"], "out": str(run.parent)}
    (run / "run.json").write_text(json.dumps({"config": config}))
    cases += [
        (["rerun", str(run), "--stage", "nope"], "--stage: unknown stage 'nope'"),
        (["rerun", str(run), "--stage", "second", "--set", "offsett=1"], "no setting 'offsett'"),
        (["rerun", str(run), "--stage", "second", "--set", "offset"], "key=value"),
    ]
    (run / "summary.json").write_text('{"schema": "mmdiag.summary/1", "model": {')  # truncated
    cases.append((["compare", str(run), str(run)], "not valid JSON"))
    damaged = tmp_path / "runs" / "damaged"
    damaged.mkdir()
    (damaged / "run.json").write_text('{"config": {"run": "dam')
    cases.append((["rerun", str(damaged), "--stage", "first"], "not valid JSON"))
    for argv, expected in cases:
        before = sorted(p.name for p in run.iterdir())
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert sorted(p.name for p in run.iterdir()) == before


def test_stages_lists_what_each_reads(toy, capsys):
    assert main(["stages"]) == 0
    out = capsys.readouterr().out
    assert "second     reads: first" in out and "first.mean_margin" in out


def _with(cfg, extra):
    cfg.write_text(cfg.read_text() + extra)
    return cfg


@pytest.mark.slow
def test_sharded_stage_gives_what_one_task_gives(toy, tmp_path):
    cfg, run, computed = toy
    assert main(["diagnose", "--config", str(cfg)]) == 0
    whole = _summary(run)
    arrays = (run / "stages" / "first" / "arrays.safetensors").read_bytes()
    computed()
    _with(cfg, "runner: {shards: 3}\n")
    assert main(["diagnose", "--config", str(cfg)]) == 0
    assert computed() == ["first"] * 3  # three shards; what reads them stays cached
    sharded = _summary(run)
    assert sharded["first"] == whole["first"] and sharded["stages"]["first"]["key"] == whole["stages"]["first"]["key"]
    assert sharded["stages"]["second"]["cached"] and sharded["stages"]["third"]["cached"]
    assert (run / "stages" / "first" / "arrays.safetensors").read_bytes() == arrays


def test_dask_without_a_server_is_refused(toy, monkeypatch, capsys):
    cfg, run, computed = toy
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    _with(cfg, "runner: {kind: dask}\n")
    assert main(["diagnose", "--config", str(cfg)]) == 2
    assert "runner.kind: dask needs a Prefect server" in capsys.readouterr().err


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def prefect_server(tmp_path):
    """A real Prefect API server on a loopback port, as the documentation's scale-out section (docs/cli.md) starts it."""
    import urllib.request

    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "server-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    prefect = Path(sys.executable).parent / "prefect"
    server = subprocess.Popen([str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            break
        except OSError:
            assert server.poll() is None and time.time() < deadline, "prefect server did not start"
            time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(timeout=60)


@pytest.mark.slow
def test_dask_cluster_runs_the_shards_on_its_workers(toy, tmp_path, prefect_server):
    cfg, run, computed = toy
    assert main(["diagnose", "--config", str(cfg)]) == 0  # the reference: one task, thread runner
    whole = _summary(run)
    computed()
    dask_cfg = tmp_path / "dask.yaml"
    dask_cfg.write_text(cfg.read_text().replace("run: toy", "run: toy-dask").replace("cache: ", "cache: ") + "runner: {kind: dask, workers: 2, shards: 2}\n")
    pids = tmp_path / "pids.log"
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "TOY_PIDS": str(pids), "TOY_ONLY": "1", "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("PREFECT_HOME", None)
    proc = subprocess.run([sys.executable, "-m", "mmdiag.flows.cli", "diagnose", "--config", str(dask_cfg)], env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ran = [line.split() for line in pids.read_text().splitlines()]
    workers = {pid for stage, pid in ran if stage == "first"}
    flow_process = {pid for stage, pid in ran if stage == "second"}  # a direct task call runs in the flow
    assert len(workers) == 2 and not workers & flow_process  # two shards, two worker processes
    sharded = _summary(run.parent / "toy-dask")
    for stage in ("first", "second", "third"):
        assert sharded[stage] == whole[stage]
    # the run published its markdown summary to the server, for the Prefect UI
    import urllib.request

    query = json.dumps({"artifacts": {"key": {"any_": ["mmdiag-toy-dask"]}}}).encode()
    request = urllib.request.Request(prefect_server + "/artifacts/filter", data=query, headers={"Content-Type": "application/json"})
    artifacts = json.loads(urllib.request.urlopen(request, timeout=10).read())
    assert artifacts and "accuracy" in artifacts[0]["data"] and "toy-dask" in artifacts[0]["data"]


def test_editing_a_stages_module_changes_its_cache_key(tmp_path, monkeypatch):
    from mmdiag.flows.tasks import code_version
    from mmdiag.stages import Stage, StageResult

    module = tmp_path / "edited_stage.py"
    module.write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_STAGES", {})
    registry.register(Stage("edited", lambda ctx, config, up: StageResult({}), modules=("edited_stage",)))
    key = code_version("edited")
    assert code_version("edited") == key
    module.write_text("VALUE = 2\n")
    assert code_version("edited") != key
    assert code_version() != key  # the evaluation step: pipeline/ and flows only


@pytest.mark.parametrize("name", ["résumé run ✓", "demo-film", "Ωmega", "a b/c", "✓✓"])
def test_any_printable_run_name_gives_a_valid_artifact_key(name):
    import re

    from mmdiag.flows.flow import _artifact_key

    key = _artifact_key(name)
    assert re.fullmatch(r"[a-z0-9-]+", key) and len(key) < 100
    assert _artifact_key("résumé") != _artifact_key("resume")


@pytest.mark.slow
def test_a_unicode_run_name_and_a_symlinked_run_folder_work_end_to_end(toy, tmp_path):
    cfg, run, computed = toy
    cfg.write_text(cfg.read_text().replace("run: toy", "run: 'résumé run ✓'"))
    assert main(["diagnose", "--config", str(cfg)]) == 0
    named = run.parent / "résumé run ✓"
    assert _summary(named)["run"]["name"] == "résumé run ✓" and (named / "report.html").is_file()

    target = tmp_path / "elsewhere" / "kept"
    target.parent.mkdir()
    os.replace(named, target)
    link = run.parent / "link"
    link.symlink_to(target)
    before = _summary(target)["second"]["shifted"]
    assert main(["rerun", str(link), "--stage", "second", "--set", "offset=1"]) == 0
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert _summary(target)["second"]["shifted"] == pytest.approx(before + 1)
    assert not [p for p in target.parent.iterdir() if p.name != "kept"]  # no staging folders left


@pytest.mark.slow
@pytest.mark.parametrize("block", ["first", "second", "third"])
def test_sigkill_leaves_no_orphan_and_the_next_run_equals_an_uninterrupted_one(toy, tmp_path, block):
    from mmdiag.flows.hosting.watchdog import _alive, children

    cfg, run, computed = toy
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "TOY_BLOCK": block, "TOY_ONLY": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mmdiag.flows.cli", "diagnose", "--config", str(cfg)], env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while block not in (Path(env["TOY_LOG"]).read_text() if Path(env["TOY_LOG"]).exists() else ""):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    spawned = children(proc.pid)  # the temporary Prefect server and the watchdog
    assert spawned
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.time() + 15
    while any(_alive(c) for c in spawned) and time.time() < deadline:
        time.sleep(0.2)
    assert not [c for c in spawned if _alive(c)]  # nothing outlives the killed run
    assert not run.exists()
    computed()

    assert main(["diagnose", "--config", str(cfg)]) == 0  # the next run
    assert computed() == ["first", "second", "third"][["first", "second", "third"].index(block) :]
    assert not [p for p in run.parent.iterdir() if p.name.startswith(".")]
    resumed = _summary(run)
    clean = tmp_path / "clean.yaml"  # an uninterrupted run, in a cache of its own
    clean.write_text(cfg.read_text().replace("run: toy", "run: clean").replace(str(tmp_path / "cache"), str(tmp_path / "cache-clean")))
    assert main(["diagnose", "--config", str(clean)]) == 0
    uninterrupted = _summary(run.parent / "clean")
    for stage in ("model", "first", "second", "third"):
        assert resumed[stage] == uninterrupted[stage]
    assert {k: v["key"] for k, v in resumed["stages"].items()} == {k: v["key"] for k, v in uninterrupted["stages"].items()}
