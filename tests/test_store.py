"""The run store: atomic writes, atomic run folders, fingerprints."""

import json
import os

import pytest
import torch

from mmdiag.pipeline.errors import MmdiagError
from mmdiag.pipeline.store import RunStore, atomic_write, fingerprint_module, new_run, read_arrays, read_json, write_arrays, write_json


def test_interrupted_write_leaves_no_file(tmp_path):
    target = tmp_path / "result.json"

    def half_then_crash(tmp):
        tmp.write_text('{"half": ')
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_crash)
    assert os.listdir(tmp_path) == []
    # an existing result survives a failed overwrite intact
    write_json(target, {"a": 1})
    with pytest.raises(ValueError):
        write_json(target, {"a": float("nan")})
    assert json.loads(target.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["result.json"]


def test_failed_run_leaves_no_folder_and_keeps_the_old_one(tmp_path):
    with new_run(tmp_path, "r") as store:
        store.write_json("summary.json", {"v": 1})
    with pytest.raises(RuntimeError):
        with new_run(tmp_path, "r") as store:
            store.write_json("summary.json", {"v": 2})
            raise RuntimeError("stage crashed")
    assert os.listdir(tmp_path) == ["r"]
    assert RunStore(tmp_path / "r").read_json("summary.json") == {"v": 1}
    with pytest.raises(RuntimeError):
        with new_run(tmp_path, "fresh"):
            raise RuntimeError
    assert os.listdir(tmp_path) == ["r"]


def test_completed_run_replaces_the_old_one(tmp_path):
    for v in (1, 2):
        with new_run(tmp_path, "r") as store:
            store.write_json("summary.json", {"v": v})
    assert read_json(tmp_path / "r" / "summary.json") == {"v": 2}
    assert sorted(os.listdir(tmp_path)) == ["r"]


def test_arrays_round_trip_and_damaged_files(tmp_path):
    write_arrays(tmp_path / "a.safetensors", {"x": torch.arange(6.0).reshape(2, 3)})
    assert read_arrays(tmp_path / "a.safetensors")["x"].tolist() == [[0, 1, 2], [3, 4, 5]]
    (tmp_path / "bad.json").write_text('{"x": ')
    with pytest.raises(MmdiagError, match="not valid JSON"):
        read_json(tmp_path / "bad.json")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(MmdiagError, match="damaged"):
        read_arrays(tmp_path / "bad.safetensors")


def test_fingerprint_changes_when_one_weight_changes_by_one_value():
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    before = fingerprint_module(net)
    assert fingerprint_module(net) == before
    with torch.no_grad():
        net[1].bias[1] = torch.nextafter(net[1].bias[1], torch.tensor(1.0))  # one ulp
    assert fingerprint_module(net) != before


def test_a_run_folder_that_is_a_link_is_written_where_it_points(tmp_path):
    target = tmp_path / "elsewhere" / "r"
    with new_run(target.parent, "r") as store:
        store.write_json("run.json", {"v": 1})
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "r").symlink_to(target)
    with new_run(tmp_path / "runs", "r") as store:
        store.write_json("run.json", {"v": 2})
    assert (tmp_path / "runs" / "r").is_symlink()
    assert read_json(target / "run.json") == {"v": 2}


def test_the_next_run_removes_what_a_killed_one_left_behind(tmp_path):
    import os
    import subprocess
    import sys

    from mmdiag.pipeline.store import _host, clean_stale, new_run

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    out = tmp_path / "runs"
    me = _host()
    (out / f".r.{me}-{dead}.abc123.partial").mkdir(parents=True)
    (out / f".r.{me}-{dead}.abc123.partial" / "summary.json").write_text("{")
    (out / f".summary.json.{me}-{dead}.x1y2.tmp").write_text("{")
    live = out / f".r.{me}-{os.getpid()}.zz.partial"  # a run going on right now: left alone
    live.mkdir()
    elsewhere = out / f".r.otherhost-{dead}.zz.partial"  # another machine's writer: left alone
    elsewhere.mkdir()
    (out / f".prev.{me}-{dead}.q.old" / "prev").mkdir(parents=True)  # killed between its two renames
    with new_run(out, "r") as store:
        store.write_json("summary.json", {"ok": True})
    assert sorted(p.name for p in out.iterdir()) == sorted(["r", "prev", live.name, elsewhere.name])
    assert clean_stale(out) == []
