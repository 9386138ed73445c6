"""The computation cache (flows.cache): JSON records beside content-addressed results, reused
after a move, healed when damaged, and `mmdiag cache info|verify|prune|clear`."""

import json
import logging
import shutil
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
import torch

from mmdiag.flows import cache, results
from mmdiag.flows.cli import main
from mmdiag.pipeline.errors import MmdiagError
from mmdiag.stages import StageResult


def _compute(folder, calls, value=1.0):
    def compute():
        calls.append(value)
        return results.save(folder / "results", StageResult({"v": value}, {"a": np.full(3, value)}), {"seconds": 0.1})

    return compute


def _only_file(folder, pattern):
    (path,) = folder.glob(pattern)
    return path


def test_a_recorded_computation_is_reused_and_refresh_recomputes(tmp_path):
    calls = []
    ref, hit = cache.cached(tmp_path, "stage", {"x": 1}, "code", False, _compute(tmp_path, calls))
    assert not hit and calls == [1.0]
    again, hit = cache.cached(tmp_path, "stage", {"x": 1}, "code", False, _compute(tmp_path, calls))
    assert hit and again == ref and calls == [1.0]
    assert cache.cached(tmp_path, "stage", {"x": 2}, "code", False, _compute(tmp_path, calls))[1] is False  # other inputs
    assert cache.cached(tmp_path, "stage", {"x": 1}, "new code", False, _compute(tmp_path, calls))[1] is False
    assert cache.cached(tmp_path, "stage", {"x": 1}, "code", True, _compute(tmp_path, calls))[1] is False  # refresh
    assert len(calls) == 4
    assert results.load(ref, tmp_path / "results")[0].summary == {"v": 1.0}


def test_a_moved_cache_is_reused_as_it_is(tmp_path):
    calls = []
    ref, _ = cache.cached(tmp_path / "a", "stage", {"x": 1}, "code", False, _compute(tmp_path / "a", calls))
    shutil.move(tmp_path / "a", tmp_path / "b")
    moved, hit = cache.cached(tmp_path / "b", "stage", {"x": 1}, "code", False, _compute(tmp_path / "b", calls))
    assert hit and moved == ref and calls == [1.0]
    record = _only_file(tmp_path / "b" / "records", "*.json").read_text()
    assert str(tmp_path) not in record  # no absolute path anywhere in a record


@pytest.mark.parametrize("damage", ["truncated result", "edited result", "missing result", "garbage record", "foreign record", "record naming a path"])
def test_damage_is_recomputed_with_one_warning(tmp_path, caplog, damage):
    calls = []
    ref, _ = cache.cached(tmp_path, "stage", {"x": 1}, "code", False, _compute(tmp_path, calls))
    result, record = _only_file(tmp_path / "results", "*.safetensors"), _only_file(tmp_path / "records", "*.json")
    if damage == "truncated result":
        result.write_bytes(result.read_bytes()[:40])
    elif damage == "edited result":
        blob = bytearray(result.read_bytes())
        blob[-1] ^= 1
        result.write_bytes(bytes(blob))
    elif damage == "missing result":
        result.unlink()
    elif damage == "garbage record":
        record.write_bytes(b"\x80\x04\x95garbage")
    elif damage == "foreign record":
        record.write_text(json.dumps({"schema": "prefect", "sha256": ref["sha256"]}))
    else:
        record.write_text(json.dumps({"schema": cache.RECORD_SCHEMA, "sha256": "../../../etc/passwd", "meta": {}}))
    assert cache.verify(tmp_path), damage
    with caplog.at_level(logging.WARNING, logger="mmdiag"):
        healed, hit = cache.cached(tmp_path, "stage", {"x": 1}, "code", False, _compute(tmp_path, calls))
    assert not hit and calls == [1.0, 1.0] and healed["sha256"] == ref["sha256"]
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("cache: ") and "computed again" in line
    assert cache.verify(tmp_path) == []
    assert results.load(healed, tmp_path / "results")[0].summary == {"v": 1.0}


def test_damaged_trained_weights_are_trained_again_with_one_warning(tmp_path, caplog):
    from mmdiag.pipeline.demo.train import TrainConfig, load_or_train

    config = TrainConfig(arch="late", n_train=64, epochs=1, batch_size=32)
    model, from_cache = load_or_train(config, cache=tmp_path)
    assert not from_cache and cache.verify(tmp_path) == []
    weights = _only_file(tmp_path / "models", "*.safetensors")
    weights.write_bytes(weights.read_bytes()[:-7])
    assert [d for d in cache.verify(tmp_path) if d.startswith(f"weights {weights.name}")]
    with caplog.at_level(logging.WARNING, logger="mmdiag"):
        again, from_cache = load_or_train(config, cache=tmp_path)
    assert not from_cache and any("trained again" in r.getMessage() for r in caplog.records)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name  # seeded training: the same weights
    assert cache.verify(tmp_path) == [] and load_or_train(config, cache=tmp_path)[1]


def _age(folder, hours=2):
    """Make every result look last used `hours` ago (prune keeps what was used in the last hour)."""
    import os
    import time

    for path in [*(folder / "results").glob("*"), *(folder / "analyses").glob("*")]:
        os.utime(path, (time.time() - hours * 3600,) * 2)


def test_prune_keeps_what_run_folders_refer_to(tmp_path, capsys):
    calls = []
    cache_dir = tmp_path / "cache"
    kept, _ = cache.cached(cache_dir, "stage", {"x": 1}, "code", False, _compute(cache_dir, calls, 1.0))
    cache.cached(cache_dir, "stage", {"x": 2}, "code", False, _compute(cache_dir, calls, 2.0))
    assert cache.prune(cache_dir)["results"] == 0  # no run folders known, but all used within the hour
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"stages": {"first": {"sha256": kept["sha256"]}}}))
    cache.register_run(cache_dir, run)
    cache.register_run(cache_dir, tmp_path / "runs" / "deleted")
    _age(cache_dir)
    assert main(["cache", "prune", "--cache", str(cache_dir)]) == 0
    assert "removed 1 results and 1 records" in capsys.readouterr().out
    assert [p.stem for p in (cache_dir / "results").glob("*")] == [kept["sha256"]]
    assert cache.cached(cache_dir, "stage", {"x": 1}, "code", False, _compute(cache_dir, calls))[1]
    assert cache.known_runs(cache_dir) == [str(run.resolve())]

    # cache and runs moved together: the run is found by its path relative to the cache
    shutil.move(tmp_path, tmp_path.parent / (tmp_path.name + "-moved"))
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    assert cache.known_runs(moved / "cache") == [str((moved / "runs" / "r").resolve())]
    # the cache alone moved and no run folder can be found: refused, nothing removed
    shutil.move(moved / "runs", moved / "elsewhere")
    _age(moved / "cache")
    with pytest.raises(MmdiagError, match="none of the 2 run folders"):
        cache.prune(moved / "cache")
    assert len(list((moved / "cache" / "results").glob("*"))) == 1

    # by last use: a hit counts as use
    root = moved / "cache"
    assert cache.prune(root, unused_since=datetime.now(timezone.utc) - timedelta(days=1))["results"] == 0
    assert cache.prune(root, unused_since=datetime.now(timezone.utc) + timedelta(days=1))["results"] == 1
    shutil.move(moved, tmp_path)


def test_an_analysis_made_before_on_the_same_inputs_is_taken_from_the_memo(tmp_path):
    folder, calls = tmp_path / "cache" / "analyses", []

    def analyse(value):
        calls.append(value)
        return {"errors": {"n": value, "cards": [{"row": 1}]}, "suggestions": [{"id": f"s{value}"}]}

    first = cache.remembered_analysis(folder, [{"a": 1}, "sha"], lambda: analyse(1))
    assert cache.remembered_analysis(folder, [{"a": 1}, "sha"], lambda: analyse(2)) == first and calls == [1]
    assert cache.remembered_analysis(folder, [{"a": 2}, "sha"], lambda: analyse(3))["errors"]["n"] == 3  # other inputs
    entry = next(p for p in folder.glob("*.json") if json.loads(p.read_text())["errors"]["n"] == 1)
    entry.write_text('{"errors": ')  # damaged: analysed again, and the memo mended
    assert cache.remembered_analysis(folder, [{"a": 1}, "sha"], lambda: analyse(4))["errors"]["n"] == 4
    assert cache.remembered_analysis(folder, [{"a": 1}, "sha"], lambda: analyse(5))["errors"]["n"] == 4 and calls == [1, 3, 4]
    _age(tmp_path / "cache")
    assert cache.prune(tmp_path / "cache")["analyses"] == 2  # a memo: gone once unused for an hour


def test_clear_refuses_a_folder_that_is_not_a_cache(tmp_path):
    (tmp_path / "thesis.tex").write_text("years of work")
    with pytest.raises(MmdiagError, match="does not look like an mmdiag cache"):
        cache.clear(tmp_path)
    assert (tmp_path / "thesis.tex").exists()


def test_info_verify_and_clear_commands(tmp_path, capsys):
    calls = []
    cache.cached(tmp_path, "stage", {"x": 1}, "code", False, _compute(tmp_path, calls))
    assert main(["cache", "info", "--cache", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "results" in out and "records" in out and "models" in out
    assert cache.info(tmp_path)["kinds"]["results"]["files"] == 1
    assert main(["cache", "verify", "--cache", str(tmp_path)]) == 0
    assert "0 damaged" in capsys.readouterr().out
    result = _only_file(tmp_path / "results", "*.safetensors")
    result.write_bytes(result.read_bytes()[:-1])
    assert main(["cache", "verify", "--cache", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"damaged: result {result.name} does not match its hash" in out and "1 damaged" in out
    assert main(["cache", "clear", "--cache", str(tmp_path)]) == 0
    assert "results" in capsys.readouterr().out
    assert cache.info(tmp_path)["total"]["files"] == 0
    with pytest.raises(SystemExit) as exit:
        main(["cache", "prune", "--unused-since", "yesterday"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "YYYY-MM-DD" in err and len(err.strip().splitlines()) == 1


def _summary(run):
    return json.loads((run / "summary.json").read_text())


FIGURES = ("model", "first", "second", "third")


def _figures(run):
    s = _summary(run)
    return {k: s[k] for k in FIGURES}, {k: v["key"] for k, v in s["stages"].items()}


@pytest.mark.slow
def test_fresh_caches_give_equal_keys_and_a_moved_cache_is_fully_cached(toy, tmp_path, monkeypatch):
    cfg, run, computed = toy
    assert main(["diagnose", "--config", str(cfg)]) == 0
    figures, keys = _figures(run)
    other = tmp_path / "other.yaml"
    other.write_text(cfg.read_text().replace(str(tmp_path / "cache"), str(tmp_path / "cache2")).replace("run: toy", "run: toy2"))
    assert main(["diagnose", "--config", str(other)]) == 0
    assert computed() == ["first", "second", "third"] * 2
    assert _figures(run.parent / "toy2") == (figures, keys)  # equal keys for every stage

    shutil.move(tmp_path / "cache", tmp_path / "moved")
    cfg.write_text(cfg.read_text().replace(str(tmp_path / "cache"), str(tmp_path / "moved")))
    before = {k: _summary(run)[k] for k in ("errors", "suggestions")}
    monkeypatch.setattr("mmdiag.reports.analyse", lambda *a, **k: pytest.fail("the error analysis was made again"))
    assert main(["diagnose", "--config", str(cfg)]) == 0
    assert computed() == []
    assert _figures(run) == (figures, keys) and all(s["cached"] for s in _summary(run)["stages"].values())
    assert {k: _summary(run)[k] for k in ("errors", "suggestions")} == before  # the analysis, from its memo


@pytest.mark.slow
def test_rerun_recomputes_exactly_what_changed(toy):
    cfg, run, computed = toy
    assert main(["diagnose", "--config", str(cfg)]) == 0
    computed()
    figures, keys = _figures(run)
    # nothing changed: the stage alone (its result is the same, so its readers stay cached)
    assert main(["rerun", str(run), "--stage", "second"]) == 0
    assert computed() == ["second"] and _figures(run) == (figures, keys)
    # a setting that changes how, not what: the stage alone again
    assert main(["rerun", str(run), "--stage", "second", "--set", "chunk=4"]) == 0
    assert computed() == ["second"] and _figures(run) == (figures, keys)
    # a setting that changes the stage's figures: the stage and its readers
    assert main(["rerun", str(run), "--stage", "second", "--set", "offset=2"]) == 0
    assert computed() == ["second", "third"]
    moved, moved_keys = _figures(run)
    assert moved["first"] == figures["first"] and moved_keys["first"] == keys["first"]
    assert moved_keys["second"] != keys["second"] and moved_keys["third"] != keys["third"]
    # the evaluation: recomputed, unchanged, nothing else recomputed
    assert main(["rerun", str(run), "--stage", "model"]) == 0
    assert computed() == [] and _figures(run)[1]["model"] == keys["model"]
    assert not _summary(run)["stages"]["model"]["cached"] and _summary(run)["stages"]["first"]["cached"]


def _no_pickle(folder):
    """No pickle stream (protocol 2-5 header) and no base64-encoded one ("gAS"/"gAW"). A
    safetensors file starts with its header's length, which can read like a pickle header (a
    length of 0x0580 is b"\x80\x05"): it must parse as safetensors instead, which never unpickles."""
    from safetensors import safe_open

    for path in folder.rglob("*"):
        if path.is_file() and path.suffix not in (".db", ".db-wal", ".db-shm"):
            head = path.read_bytes()
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as f:
                    list(f.keys())
            else:
                assert not (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05"), path
            assert b'"gAS' not in head and b'"gAW' not in head, path


@pytest.mark.slow
def test_damage_in_the_cache_is_recomputed_with_a_warning_and_equal_figures(toy, tmp_path, capsys):
    cfg, run, computed = toy
    assert main(["diagnose", "--config", str(cfg)]) == 0
    computed()
    figures, keys = _figures(run)
    root = tmp_path / "cache"
    _no_pickle(root), _no_pickle(run)
    records = {json.loads(p.read_text())["sha256"]: p for p in (root / "records").glob("*.json")}
    result = results.path(root / "results", json.loads((run / "run.json").read_text())["stages"]["second"]["sha256"])
    result.write_bytes(result.read_bytes()[:50])  # truncated
    first = json.loads((run / "run.json").read_text())["stages"]["first"]["sha256"]
    records[first].write_text("not json")
    capsys.readouterr()
    assert main(["cache", "verify", "--cache", str(root)]) == 1
    assert len(capsys.readouterr().out.splitlines()) == 3  # two damaged entries and the count
    assert main(["diagnose", "--config", str(cfg)]) == 0
    assert computed() == ["first", "second"]  # their results are unchanged: third stays cached
    warnings = [line for line in capsys.readouterr().err.splitlines() if "cache:" in line]
    assert len(warnings) == 2 and all("computed again" in w for w in warnings)
    assert _figures(run) == (figures, keys)
    assert cache.verify(root) == []


def test_weights_written_before_hashes_are_adopted_when_they_parse(tmp_path):
    from mmdiag.pipeline.store import load_weights, save_weights

    path = tmp_path / "models" / "w.safetensors"
    save_weights(path, {"w": torch.ones(3)})
    path.with_name("w.safetensors.sha256").unlink()
    assert cache.verify(tmp_path) == []
    assert torch.equal(load_weights(path)["w"], torch.ones(3)) and path.with_name("w.safetensors.sha256").is_file()
    path.with_name("w.safetensors.sha256").unlink()
    path.write_bytes(path.read_bytes()[:-2])
    assert "unreadable" in cache.verify(tmp_path)[0] and load_weights(path) is None and not path.exists()


def test_an_adapters_settings_are_part_of_its_key():
    from mmdiag.pipeline.adapter import setup, with_units
    from mmdiag.pipeline.units import Segments

    import vlm_kit

    a, b = vlm_kit.adapter("llava"), vlm_kit.adapter("llava")
    assert setup(a) == setup(b)  # the same settings, built twice: no address or other accident in it
    assert setup(vlm_kit.adapter("llava", answers=("yes", "no"))) != setup(a)
    assert setup(vlm_kit.adapter("llava", prompt="user : <image> {question} assistant :")) != setup(a)
    assert setup(with_units(a, images=Segments(16))) != setup(with_units(a, images=Segments(8))) != setup(a)
    assert setup(with_units(a, images=Segments(16))) == setup(with_units(b, images=Segments(16)))


@pytest.mark.slow
def test_an_edit_to_the_models_factory_recomputes_the_stages(toy, tmp_path, monkeypatch):
    cfg, run, computed = toy
    (tmp_path / "mymodel.py").write_text("from toy_stages import build_model\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg.write_text(cfg.read_text().replace("toy_stages:build_model", "mymodel:build_model"))
    assert main(["diagnose", "--config", str(cfg)]) == 0
    assert computed() == ["first", "second", "third"]
    assert main(["diagnose", "--config", str(cfg)]) == 0
    assert computed() == []
    (tmp_path / "mymodel.py").write_text("from toy_stages import build_model  # answers edited\n")
    assert main(["diagnose", "--config", str(cfg)]) == 0
    assert computed() == ["first", "second", "third"]
