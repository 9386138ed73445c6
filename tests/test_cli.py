"""Bad input: one line naming the field and the fix, exit code 2, no traceback, no run folder."""

import json
import os
import subprocess
import sys

import pytest

from mmdiag.flows.cli import main
from mmdiag.pipeline.config import load_config, parse_config
from mmdiag.pipeline.errors import MmdiagError

BAD_CONFIGS = {
    "unknown key": ("model: {name: demo-film}\nmodle_typo: 1\n", "modle_typo: unknown key"),
    "wrong type": ("model: {name: demo-film}\nbatch_size: lots\n", "batch_size"),
    "unknown model": ("model: {name: resnet-9000}\n", "model.name: unknown model 'resnet-9000'"),
    "missing weights file": ("model: {name: demo-film, weights: nowhere.safetensors}\n", "model.weights: no file"),
    "name and factory": ("model: {name: demo-film, factory: 'a:b'}\n", "exactly one of model.name"),
    "bad yaml": ("model: {name: [\n", "not valid YAML"),
    "unknown device": ("model: {name: demo-film}\ndevice: tpu\n", "device"),
    "unknown split": ("model: {name: demo-film}\ndata: {split: test}\n", "data.split: unknown split 'test'"),
    "unknown method": ("model: {name: demo-film}\nstages: {unimodal: {methods: [magic]}}\n", "stages.unimodal.methods.0"),
    "unknown stage": ("model: {name: demo-film}\nstages: {unimodel: {}}\n", "stages.unimodel: unknown stage"),
    "factory not importable": ("model: {factory: 'no_such_pkg.x:build'}\n", "model.factory: cannot import"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_config_exits_2_with_one_line(case, tmp_path, capsys, cache):
    text, expected = BAD_CONFIGS[case]
    cfg = tmp_path / "diag.yaml"
    cfg.write_text(text + f"out: {tmp_path / 'runs'}\n")
    assert main(["diagnose", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmdiag: error: ") and expected in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "runs").exists() or os.listdir(tmp_path / "runs") == []


def test_missing_config_file(tmp_path, capsys):
    assert main(["diagnose", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "--config: no file at" in capsys.readouterr().err


def test_real_entry_point_prints_no_traceback(tmp_path):
    cfg = tmp_path / "diag.yaml"
    cfg.write_text("model: {name: demo-film}\nbatch_size: -3\n")
    proc = subprocess.run([sys.executable, "-m", "mmdiag.flows.cli", "diagnose", "--config", str(cfg)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "batch_size" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_help_for_newcomers(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("demo", "diagnose", "bench", "multimodal"):
        assert word in out
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "--out" in capsys.readouterr().out


def test_config_defaults_and_relative_weights(tmp_path):
    cfg = tmp_path / "diag.yaml"
    (tmp_path / "w.safetensors").write_bytes(b"")
    cfg.write_text("model: {name: demo-film, weights: w.safetensors}\n")
    config = load_config(cfg)
    assert config.model.weights == tmp_path / "w.safetensors"
    assert config.data.split == "ood" and config.data.splits == ["iid", "ood", "anti"]
    assert parse_config({"model": {"factory": "a:b"}, "data": {"factory": "c:d", "split": "x"}}).data.splits[-1] == "x"
    with pytest.raises(MmdiagError, match="run: "):
        parse_config({"model": {"name": "demo-film"}, "run": "../escape"})


USER_MODULE = """
import torch
from mmdiag.pipeline import FeatureGroups, SampleSet, TorchAdapter


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)

    def forward(self, x):
        return self.a(x["audio"]) * self.b(x["tabular"])


def build():
    return TorchAdapter(Net(), ("audio", "tabular"), units={"audio": FeatureGroups([0, 1, 2]), "tabular": FeatureGroups([0, 1])})


def load(split, n, seed):
    g = torch.Generator().manual_seed(seed)
    n = n or 50
    return SampleSet(
        inputs={"audio": torch.randn(n, 3, generator=g), "tabular": torch.randn(n, 2, generator=g)},
        labels=torch.randint(0, 2, (n,), generator=g),
        meta={"loud": torch.randint(0, 2, (n,), generator=g)},
        class_names=["a", "b"],
    )
"""


def test_diagnose_a_users_own_model_and_data(tmp_path, monkeypatch, capsys):
    (tmp_path / "usermodel.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = tmp_path / "diag.yaml"
    cfg.write_text(f"run: mine\nmodel: {{factory: 'usermodel:build'}}\ndata: {{factory: 'usermodel:load', split: test, splits: [test], n: 40}}\nout: {tmp_path / 'runs'}\n")
    assert main(["diagnose", "--config", str(cfg)]) == 0
    summary = json.loads((tmp_path / "runs" / "mine" / "summary.json").read_text())
    assert summary["model"]["n"] == 40 and summary["model"]["split"] == "test"
    # a model that names no layers: stages 3 and 4 say why they skipped; the others run
    assert "names no layers" in summary["representation"]["skipped"]
    assert "representation" in summary["composition"]["skipped"]
    assert summary["crossmodal"]["n_reference"] == 40
    assert {s["where"] for s in summary["model"]["slices"]} == {"loud=0", "loud=1"}


def test_the_command_runs_the_exit_handlers_and_keeps_the_exit_code():
    """`entry` skips the interpreter's teardown, not the atexit handlers (Prefect's, the temporary
    server's stop) nor the output."""
    code = "import atexit, sys; atexit.register(lambda: print('handler ran', flush=True)); sys.argv = ['mmdiag', *sys.argv[1:]]; from mmdiag.flows.cli import entry; entry()"
    done = subprocess.run([sys.executable, "-c", code, "stages"], capture_output=True, text=True)
    assert done.returncode == 0 and "unimodal" in done.stdout and done.stdout.rstrip().endswith("handler ran")
    done = subprocess.run([sys.executable, "-c", code, "compare", "/nonexistent-a", "/nonexistent-b"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("mmdiag: error:") and "handler ran" in done.stdout
