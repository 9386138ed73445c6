"""The bad-input battery: every mistake a user can make with a config, the command line, a model
or data factory, a run folder or a cache ends in exit code 2 with exactly one line on stderr that
names the field (and says what to do), no traceback, and nothing written: no run folder, no
partial file. Nearly all of them are caught by the pre-flight, before Prefect or any stage runs."""

import json
import os

import pytest

from mmdiag.flows.cli import main

GOOD_MODEL = "model: {factory: 'bad_input_kit:build'}\n"
GOOD_DATA = "data: {factory: 'bad_input_kit:load', split: val}\n"
GOOD = GOOD_MODEL + GOOD_DATA


# a folder this process cannot write into: a read-only one, or /proc for root (who writes anywhere else)
READ_ONLY = "/proc" if os.geteuid() == 0 else "readonly"


def data(factory: str, extra: str = "") -> str:
    return GOOD_MODEL + f"data: {{factory: 'bad_input_kit:{factory}', split: val{extra}}}\n"


def model(factory: str, data_factory: str = "load") -> str:
    return f"model: {{factory: 'bad_input_kit:{factory}'}}\ndata: {{factory: 'bad_input_kit:{data_factory}', split: val}}\n"


def stage(text: str) -> str:
    return GOOD + f"stages: {text}\n"


# (config text, the field the one line must name). The battery appends `out` and `cache`.
CONFIGS = {
    # the file and its YAML
    "empty file": ("", "model: required"),
    "a list": ("- model\n- data\n", "expected a mapping"),
    "a scalar": ("just text\n", "expected a mapping"),
    "bad yaml": ("model: {name: [\n", "not valid YAML"),
    "tab indentation": ("model:\n\t name: demo-film\n", "not valid YAML"),
    "duplicate top key": (GOOD + "seed: 1\nseed: 2\n", "key 'seed' is given twice"),
    "duplicate nested key": ("model: {factory: 'bad_input_kit:build', factory: 'x:y'}\n" + GOOD_DATA, "key 'factory' is given twice"),
    "unknown key": (GOOD + "modle_typo: 1\n", "modle_typo: unknown key"),
    "unknown model key": ("model: {factory: 'bad_input_kit:build', wieghts: w}\n" + GOOD_DATA, "model.wieghts: unknown key"),
    "unknown data key": (GOOD_MODEL + "data: {factory: 'bad_input_kit:load', spilt: val}\n", "data.spilt: unknown key"),
    "unknown runner key": (GOOD + "runner: {nodes: 3}\n", "runner.nodes: unknown key"),
    "model not a mapping": ("model: demo-film\n" + GOOD_DATA, "model: must be a mapping"),
    "data not a mapping": (GOOD_MODEL + "data: shapes\n", "data: must be a mapping"),
    "model name and factory": ("model: {name: demo-film, factory: 'a:b'}\n", "exactly one of model.name"),
    "model neither": ("model: {}\n", "exactly one of model.name"),
    "unknown model": ("model: {name: resnet-9000}\n", "model.name: unknown model 'resnet-9000'"),
    "unknown data": ("model: {name: demo-film}\ndata: {name: imagenet}\n", "data.name: unknown data 'imagenet'"),
    "data name and factory": ("model: {name: demo-film}\ndata: {name: shapes, factory: 'a:b'}\n", "exactly one of data.name"),
    "unknown built-in split": ("model: {name: demo-film}\ndata: {split: test}\n", "data.split: unknown split 'test'"),
    "splits not a list": (GOOD_MODEL + "data: {factory: 'bad_input_kit:load', split: val, splits: val}\n", "data.splits: must be a list"),
    "weights missing": ("model: {factory: 'bad_input_kit:build', weights: nowhere.safetensors}\n" + GOOD_DATA, "model.weights: no file"),
    "weights a folder": ("model: {factory: 'bad_input_kit:build', weights: .}\n" + GOOD_DATA, "model.weights: no file"),
    "weights not safetensors": ("model: {factory: 'bad_input_kit:build', weights: garbage.bin}\n" + GOOD_DATA, "model.weights: "),
    "weights empty file": ("model: {factory: 'bad_input_kit:build', weights: empty.safetensors}\n" + GOOD_DATA, "not a readable safetensors file"),
    "weights of another model": ("model: {factory: 'bad_input_kit:build', weights: other.safetensors}\n" + GOOD_DATA, "model.weights: "),
    # values
    "negative seed": (GOOD + "seed: -1\n", "seed: must be >= 0"),
    "huge seed": (GOOD + f"seed: {2**70}\n", "seed: must be < "),
    "text seed": (GOOD + "seed: abc\n", "seed: must be a whole number"),
    "fractional seed": (GOOD + "seed: 1.5\n", "seed: must be a whole number"),
    "zero batch": (GOOD + "batch_size: 0\n", "batch_size: must be > 0"),
    "negative batch": (GOOD + "batch_size: -3\n", "batch_size: must be > 0"),
    "text batch": (GOOD + "batch_size: lots\n", "batch_size: must be a whole number"),
    "huge batch": (GOOD + "batch_size: 1000000000\n", "batch_size: must be <= "),
    "list batch": (GOOD + "batch_size: [1, 2]\n", "batch_size: must be a whole number"),
    "unknown device": (GOOD + "device: tpu\n", "device: must be 'auto', 'cpu' or 'cuda'"),
    "numeric device": (GOOD + "device: 1\n", "device: must be"),
    "n as 1e12": (GOOD_MODEL + "data: {factory: 'bad_input_kit:load', split: val, n: 1e12}\n", "data.n: must be a whole number"),
    "n zero": (GOOD_MODEL + "data: {factory: 'bad_input_kit:load', split: val, n: 0}\n", "data.n: must be > 0"),
    "n negative": (GOOD_MODEL + "data: {factory: 'bad_input_kit:load', split: val, n: -5}\n", "data.n: must be > 0"),
    "n huge": (GOOD_MODEL + "data: {factory: 'bad_input_kit:load', split: val, n: 1000000000000}\n", "data.n: must be <= "),
    "run with slash": (GOOD + "run: a/b\n", "run: must be a plain"),
    "run with backslash": (GOOD + "run: 'a\\b'\n", "run: must be a plain"),
    "run starting with dot": (GOOD + "run: .hidden\n", "run: must be a plain"),
    "run empty": (GOOD + "run: ''\n", "run: must be a plain"),
    "run too long": (GOOD + "run: " + "a" * 300 + "\n", "run: is 300 bytes long"),
    "run of long unicode": (GOOD + "run: " + "é" * 150 + "\n", "run: is 300 bytes long"),
    "run with NUL": (GOOD + 'run: "a\\0b"\n', "run: must be a plain"),
    "run with a tab": (GOOD + 'run: "a\\tb"\n', "run: must be a plain"),
    "run with a newline": (GOOD + 'run: "a\\nb"\n', "run: must be a plain"),
    "run a number": (GOOD + "run: 12\n", "run: must be text"),
    "out is a file": (GOOD + "out: afile\n", "out: "),
    "out under a file": (GOOD + "out: afile/runs\n", "out: cannot write"),
    "cache is a file": (GOOD + "cache: afile\n", "cache: "),
    "cache under a file": (GOOD + "cache: afile/cache\n", "cache: cannot write"),
    "out through a dangling link": (GOOD + "out: dangling/runs\n", "dangling is a link to "),
    "out in a read-only folder": (GOOD + f"out: {READ_ONLY}/runs\n", "out: cannot write to "),
    "cache in a read-only folder": (GOOD + f"cache: {READ_ONLY}/cache\n", "cache: cannot write to "),
    "plugins unknown": (GOOD + "plugins: [no_such_plugin_mod]\n", "plugins"),
    "plugins not a list": (GOOD + "plugins: 3\n", "plugins: must be a list"),
    # stages and their settings
    "stages not a mapping": (GOOD + "stages: [unimodal]\n", "stages: must be a mapping"),
    "unknown stage": (stage("{unimodel: {}}"), "stages.unimodel: unknown stage"),
    "stage settings not a mapping": (stage("{unimodal: 3}"), "stages.unimodal: must be a mapping"),
    "unimodal typo": (stage("{unimodal: {n_corect: 3}}"), "stages.unimodal.n_corect: unknown key"),
    "unknown method": (stage("{unimodal: {methods: [magic]}}"), "stages.unimodal.methods.0: unknown method 'magic'; the methods are: grad_x_input"),
    "methods not a list": (stage("{unimodal: {methods: shapley}}"), "stages.unimodal.methods: must be a list"),
    "methods empty": (stage("{unimodal: {methods: []}}"), "stages.unimodal.methods"),
    "ig_steps 1e9": (stage("{unimodal: {ig_steps: 1e9}}"), "stages.unimodal.ig_steps: must be a whole number"),
    "ig_steps a billion": (stage("{unimodal: {ig_steps: 1000000000}}"), "stages.unimodal.ig_steps: 1000000000 is more than"),
    "ig_steps 1": (stage("{unimodal: {ig_steps: 1}}"), "stages.unimodal.ig_steps: must be > 1"),
    "n_correct negative": (stage("{unimodal: {n_correct: -1}}"), "stages.unimodal.n_correct: must be >= 0"),
    "max_errors zero": (stage("{unimodal: {max_errors: 0}}"), "stages.unimodal.max_errors: must be > 0"),
    "shapley_pairs zero": (stage("{unimodal: {shapley_pairs: 0}}"), "stages.unimodal.shapley_pairs: must be > 0"),
    "unimodal batch zero": (stage("{unimodal: {batch_size: 0}}"), "stages.unimodal.batch_size: must be > 0"),
    "iba_beta text": (stage("{unimodal: {iba_beta: strong}}"), "stages.unimodal.iba_beta: must be a number"),
    "curve_points one": (stage("{unimodal: {curve_points: 1}}"), "stages.unimodal.curve_points: must be > 1"),
    "smoothgrad_noise zero": (stage("{unimodal: {smoothgrad_noise: 0}}"), "stages.unimodal.smoothgrad_noise: must be > 0"),
    "deeplift_references one": (stage("{unimodal: {deeplift_references: 1}}"), "stages.unimodal.deeplift_references: must be >= 2"),
    "m2ib_layers wrong": (stage("{unimodal: {m2ib_layers: 7}}"), "stages.unimodal.m2ib_layers"),
    "surrogate_samples one": (stage("{unimodal: {surrogate_samples: 1}}"), "stages.unimodal.surrogate_samples: must be > 1"),
    "crossmodal n_reference 1": (stage("{crossmodal: {n_reference: 1}}"), "stages.crossmodal.n_reference: must be > 1"),
    "crossmodal edges 0": (stage("{crossmodal: {edges: 0}}"), "stages.crossmodal.edges: must be > 0"),
    "crossmodal typo": (stage("{crossmodal: {edge: 3}}"), "stages.crossmodal.edge: unknown key"),
    "crossmodal huge": (stage("{crossmodal: {shapley_draws: 50000000}}"), "stages.crossmodal.shapley_draws: 50000000 is more than"),
    "representation holdout": (stage("{representation: {holdout: 1.5}}"), "stages.representation.holdout: must be < 1"),
    "representation threshold": (stage("{representation: {auroc_threshold: 0.2}}"), "stages.representation.auroc_threshold: must be >= 0.5"),
    "representation layers empty": (stage("{representation: {layers: []}}"), "stages.representation.layers"),
    "composition alpha": (stage("{composition: {alpha: 0}}"), "stages.composition.alpha: must be > 0"),
    "composition simulate empty": (stage("{composition: {simulate: []}}"), "stages.composition.simulate"),
    "composition eps": (stage("{composition: {eps: 2}}"), "stages.composition.eps: must be < 1"),
    "intervention null_sets": (stage("{intervention: {null_sets: 0}}"), "stages.intervention.null_sets: must be > 0"),
    "intervention confidence": (stage("{intervention: {confidence: 1.2}}"), "stages.intervention.confidence: must be < 1"),
    "intervention typo": (stage("{intervention: {nulls: 3}}"), "stages.intervention.nulls: unknown key"),
    # runner
    "runner kind": (GOOD + "runner: {kind: k8s}\n", "runner.kind: must be"),
    "runner shards zero": (GOOD + "runner: {shards: 0}\n", "runner.shards: must be > 0"),
    "runner workers zero": (GOOD + "runner: {workers: 0}\n", "runner.workers: must be > 0"),
    "more shards than samples": (GOOD + "runner: {shards: 100}\n", "runner.shards: 100 shards for 24 samples"),
    "shards beyond any machine": (GOOD + "runner: {shards: 100000}\n", "runner.shards: must be <= 1024"),
    "an unhashable key": (GOOD + "? [a, b]\n: 1\n", "not valid YAML"),
    "dask without a server": (GOOD + "runner: {kind: dask}\n", "runner.kind: dask needs a Prefect server"),
    # factory references
    "factory without colon": ("model: {factory: bad_input_kit.build}\n" + GOOD_DATA, "model.factory: 'bad_input_kit.build' should look like"),
    "factory module missing": ("model: {factory: 'no_such_pkg.x:build'}\n" + GOOD_DATA, "model.factory: cannot import"),
    "factory attribute missing": ("model: {factory: 'bad_input_kit:nothing_here'}\n" + GOOD_DATA, "model.factory: 'bad_input_kit' has no callable 'nothing_here'"),
    "factory not callable": ("model: {factory: 'bad_input_kit:N'}\n" + GOOD_DATA, "model.factory: 'bad_input_kit' has no callable 'N'"),
    "factory syntax error": ("model: {factory: 'kit_syntax_error:build'}\n" + GOOD_DATA, "model.factory: 'kit_syntax_error' has a syntax error"),
    "factory raises on import": ("model: {factory: 'kit_raises_on_import:build'}\n" + GOOD_DATA, "model.factory: importing 'kit_raises_on_import' raised RuntimeError"),
    "data factory missing": (GOOD_MODEL + "data: {factory: 'no_such_pkg:load', split: val}\n", "data.factory: cannot import"),
    "data factory syntax error": (GOOD_MODEL + "data: {factory: 'kit_syntax_error:load', split: val}\n", "data.factory: 'kit_syntax_error' has a syntax error"),
    # data factories
    "data raises": (data("data_raises"), "data.factory: bad_input_kit:data_raises raised ValueError: the bucket is empty"),
    "data not a SampleSet": (data("data_not_a_sampleset"), "data.factory: bad_input_kit:data_not_a_sampleset returned dict, not a SampleSet"),
    "data None": (data("data_none"), "returned NoneType, not a SampleSet"),
    "data unknown split": (data("data_unknown_split", ", splits: [train]"), "data.factory: bad_input_kit:data_unknown_split raised KeyError"),
    "data takes no arguments": (data("data_no_arguments"), "data.factory: bad_input_kit:data_no_arguments raised TypeError"),
    "float labels": (data("data_float_labels"), "labels must be integer class indices"),
    "2-d labels": (data("data_2d_labels"), "labels must be a 1-D tensor"),
    "labels out of range": (data("data_labels_out_of_range"), "labels must lie in 0..1"),
    "negative labels": (data("data_negative_labels"), "labels must lie in 0..1"),
    "empty data": (data("data_empty"), "the data set is empty"),
    "no inputs": (data("data_no_inputs"), "samples have no inputs"),
    "rows mismatch": (data("data_rows_mismatch"), "inputs.audio has 22 rows for 24 labels"),
    "NaN input": (data("data_nan"), "inputs.audio of sample 3 holds NaN or inf"),
    "inf input": (data("data_inf"), "inputs.tabular of sample 1 holds NaN or inf"),
    "1-d input": (data("data_1d_input"), "inputs.audio must be a tensor with a batch axis"),
    "list input": (data("data_list_input"), "inputs.audio must be a tensor"),
    "bool meta": (data("data_bool_meta"), "meta.loud must be a 1-D integer tensor"),
    "float meta": (data("data_float_meta"), "meta.loud must be a 1-D integer tensor"),
    "short meta": (data("data_short_meta"), "meta.loud has 5 values for 24 samples"),
    "short display": (data("data_short_display"), "display.caption must be a list with one entry per sample"),
    "display not a list": (data("data_display_not_list"), "display.caption must be a list"),
    "truth rows": (data("data_truth_rows"), "truth.audio.peak has 3 masks for 24 samples"),
    "truth 1-d": (data("data_truth_1d"), "truth.audio.peak must be a tensor of masks"),
    "truth narrower than the units": (data("data_truth_narrow"), "data.truth.audio.peak: masks shaped (2,) do not fit the audio input's grid"),
    "truth of an unknown modality": (data("data_truth_unknown_modality"), "data.truth: modality 'video' is not one of the model's"),
    "class names not text": (data("data_class_names_not_strings"), "class_names must be a list of strings"),
    "link to a missing region": (data("data_bad_link"), "truth_concepts.audio.peak names no truth region"),
    "unknown class concept": (data("data_unknown_class_concept"), "class_concepts names 'colour'"),
    "a modality missing from the data": (data("data_missing_modality"), "data: inputs have no 'tabular'"),
    "more class names than logits": (data("data_three_classes"), "model: forward returns 2 logits, the data has 3 class_names"),
    # model factories
    "model raises": (model("model_raises"), "model.factory: bad_input_kit:model_raises raised RuntimeError"),
    "model not an adapter": (model("model_not_an_adapter"), "model.factory: bad_input_kit:model_not_an_adapter returned Net, not a ModelAdapter"),
    "model None": (model("model_none"), "returned NoneType, not a ModelAdapter"),
    "adapter missing units": (model("model_missing_units"), "units: no unit spec for modality 'tabular'"),
    "adapter unknown unit modality": (model("model_unknown_unit_modality"), "units: 'video' is not one of the modalities"),
    "adapter missing layer": (model("model_missing_layer"), "layers: the model has no submodule 'encoder.deep'"),
    "input of the wrong width": (model("model_wrong_width"), "model: forward of the encoded inputs on 2 samples of split 'val' failed"),
    "1-d output": (model("model_1d_output"), "model: forward returned (2,) for 2 samples"),
    "3-d output": (model("model_3d_output"), "model: forward returned (2, 1, 2) for 2 samples"),
    "NaN output": (model("model_nan_output"), "model: non-finite logits"),
    "forward raises": (model("model_forward_raises"), "model: forward of the encoded inputs on 2 samples of split 'val' failed (ValueError: shape mismatch deep inside)"),
    "unit groups of the wrong size": (model("model_bad_units"), "units.features: 2 feature groups do not cover an input shaped (2, 3)"),
    "embeddings the forward cannot take": (model("model_embedding_mismatch", "data_tokens"), "model: forward of the encoded inputs"),
}


def _kit_files(tmp_path):
    (tmp_path / "kit_syntax_error.py").write_text("def build(:\n    pass\n")
    (tmp_path / "kit_raises_on_import.py").write_text("raise RuntimeError('no licence server')\n")
    (tmp_path / "garbage.bin").write_bytes(os.urandom(64))
    (tmp_path / "empty.safetensors").write_bytes(b"")
    import torch
    from safetensors.torch import save_file

    save_file({"other.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    (tmp_path / "afile").write_text("not a folder\n")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "readonly").mkdir(mode=0o555)


def _check(capsys, tmp_path, code, expected, before=None):
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and expected in err, err
    assert "Traceback" not in err and err.startswith("mmdiag")
    out = tmp_path / "out"
    assert not out.exists() or not [p for p in out.iterdir()], list(out.iterdir())
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith((".partial", ".tmp", ".old"))]
    assert not leftovers, leftovers


@pytest.fixture
def battery(tmp_path, monkeypatch, cache):
    monkeypatch.syspath_prepend(str(tmp_path))
    _kit_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("case", CONFIGS)
def test_a_bad_config_is_one_line_naming_the_field(case, battery, capsys):
    text, expected = CONFIGS[case]
    cfg = battery / "diag.yaml"
    mapping = not text or (":" in text.splitlines()[0] and not text.startswith("- "))
    if mapping:  # where the run would write: `out` and `cache` inside the test's folder
        text += "" if "\nout:" in "\n" + text else f"out: {battery / 'out'}\n"
        text += "" if "\ncache:" in "\n" + text else f"cache: {battery / 'cache'}\n"
    cfg.write_text(text)
    _check(capsys, battery, main(["diagnose", "--config", str(cfg)]), expected)


RAW = {
    "binary bytes": (b"\x80\x81\xfe\xff\x00model", "not a text file"),
    "latin-1 text": ("model: {name: démo}\n".encode("latin-1"), "not a text file"),
    "a NUL in the YAML": (b"model: {name: demo\x00film}\n", "not valid YAML"),
}


@pytest.mark.parametrize("case", RAW)
def test_a_config_that_is_not_text_is_one_line(case, battery, capsys):
    raw, expected = RAW[case]
    cfg = battery / "diag.yaml"
    cfg.write_bytes(raw)
    _check(capsys, battery, main(["diagnose", "--config", str(cfg)]), expected)


def _run_folder(root, run_json, summary=None, name="r"):
    folder = root / "fixtures" / name
    folder.mkdir(parents=True, exist_ok=True)
    _write(folder / "run.json", run_json)
    if summary is not None:
        _write(folder / "summary.json", summary)
    return folder


def _write(path, content):
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))


NOT_UTF8 = b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary"


def _good_run(root, name="r"):
    config = {"run": name, "model": {"factory": "bad_input_kit:build"}, "data": {"factory": "bad_input_kit:load", "split": "val"}, "out": str(root / "fixtures"), "cache": str(root / "cache")}
    summary = {"schema": "mmdiag.summary/1", "model": {"fingerprint": "f", "accuracy": 0.5, "splits": {}}, "stages": {}}
    return _run_folder(root, {"config": config}, summary, name)


# (argv builder, the field named); a builder gets the battery's folder
ARGV = {
    "unknown command": (lambda t: ["diagnoze"], "invalid choice: 'diagnoze'"),
    "diagnose without --config": (lambda t: ["diagnose"], "--config"),
    "config file missing": (lambda t: ["diagnose", "--config", str(t / "nope.yaml")], "--config: no file at"),
    "config is a folder": (lambda t: ["diagnose", "--config", str(t)], "--config: "),
    "demo unknown model": (lambda t: ["demo", "--models", "demo-resnet", "--out", str(t / "out")], "--models: 'demo-resnet' is not a built-in model"),
    "demo unknown device": (lambda t: ["demo", "--device", "tpu"], "argument --device: invalid choice"),
    "demo out is a file": (lambda t: ["demo", "--out", str(t / "afile")], "--out: "),
    "demo out under a file": (lambda t: ["demo", "--out", str(t / "afile" / "runs")], "--out: cannot write"),
    "demo out through a dangling link": (lambda t: ["demo", "--out", str(t / "dangling" / "runs")], "dangling is a link to "),
    "demo out in a read-only folder": (lambda t: ["demo", "--out", str(t / READ_ONLY / "runs")], "--out: cannot write to "),
    "example unknown": (lambda t: ["example", "coco"], "invalid choice: 'coco'"),
    "example out is a file": (lambda t: ["example", "easyvqa", "--out", str(t / "afile")], "--out: "),
    "bench unknown device": (lambda t: ["bench", "--device", "tpu"], "argument --device: invalid choice"),
    "stages with an argument": (lambda t: ["stages", "extra"], "unrecognized arguments: extra"),
    "rerun no folder": (lambda t: ["rerun", str(t / "nowhere"), "--stage", "unimodal"], "RUN_DIR: no run folder"),
    "rerun without --stage": (lambda t: ["rerun", str(_good_run(t))], "--stage"),
    "rerun unknown stage": (lambda t: ["rerun", str(_good_run(t)), "--stage", "nope"], "--stage: unknown stage 'nope'"),
    "rerun set without =": (lambda t: ["rerun", str(_good_run(t)), "--stage", "unimodal", "--set", "ig_steps"], "--set: 'ig_steps' should look like key=value"),
    "rerun set empty key": (lambda t: ["rerun", str(_good_run(t)), "--stage", "unimodal", "--set", "=3"], "should look like key=value"),
    "rerun set unknown key": (lambda t: ["rerun", str(_good_run(t)), "--stage", "unimodal", "--set", "ig_stepz=3"], "--set: stage 'unimodal' has no setting 'ig_stepz'"),
    "rerun set not YAML": (lambda t: ["rerun", str(_good_run(t)), "--stage", "unimodal", "--set", "methods=[shapley"], "--set: the value of 'methods'"),
    "rerun set of the wrong type": (lambda t: ["rerun", str(_good_run(t)), "--stage", "unimodal", "--set", "ig_steps=lots"], "stages.unimodal.ig_steps: must be a whole number"),
    "rerun set out of range": (lambda t: ["rerun", str(_good_run(t)), "--stage", "unimodal", "--set", "ig_steps=-4"], "stages.unimodal.ig_steps: must be > 1"),
    "rerun set an unknown method": (lambda t: ["rerun", str(_good_run(t)), "--stage", "unimodal", "--set", "methods=[magic]"], "stages.unimodal.methods.0"),
    "rerun set on the model": (lambda t: ["rerun", str(_good_run(t)), "--stage", "model", "--set", "batch_size=3"], "--set: the model evaluation has no settings"),
    "rerun new model missing": (lambda t: ["rerun", str(_good_run(t)), "--stage", "unimodal", "--model", str(t / "nope.safetensors")], "--model: no file at"),
    "rerun new model for the evaluation": (lambda t: ["rerun", str(_good_run(t)), "--stage", "model", "--model", str(t / "other.safetensors")], "--model: every stage reads the model"),
    "rerun new model garbage": (lambda t: ["rerun", str(_good_run(t)), "--stage", "unimodal", "--model", str(t / "garbage.bin")], "model.weights: "),
    "rerun new model of another shape": (lambda t: ["rerun", str(_good_run(t)), "--stage", "unimodal", "--model", str(t / "other.safetensors")], "model.weights: "),
    "rerun run.json garbage": (lambda t: ["rerun", str(_run_folder(t, "{not json")), "--stage", "unimodal"], "run.json: not valid JSON"),
    "rerun run.json of binary bytes": (lambda t: ["rerun", str(_run_folder(t, NOT_UTF8)), "--stage", "unimodal"], "run.json: not valid JSON (not UTF-8 text: byte 0x89 at offset 0)"),
    "rerun run.json a list": (lambda t: ["rerun", str(_run_folder(t, [1, 2])), "--stage", "unimodal"], "run.json: not an mmdiag run record"),
    "rerun run.json empty object": (lambda t: ["rerun", str(_run_folder(t, {})), "--stage", "unimodal"], "run.json: not an mmdiag run record"),
    "rerun run.json missing": (
        lambda t: ["rerun", str(_run_folder(t, "{}").parent / "empty-run" if (t / "fixtures" / "empty-run").mkdir(parents=True) is None else None), "--stage", "unimodal"],
        "run.json: file not found",
    ),
    "rerun config of another version": (lambda t: ["rerun", str(_run_folder(t, {"config": {"model": {"nme": 1}}})), "--stage", "unimodal"], "its config is not readable by this version"),
    "compare first missing": (lambda t: ["compare", str(t / "a"), str(_good_run(t))], "RUN_DIR: no run folder"),
    "compare second missing": (lambda t: ["compare", str(_good_run(t)), str(t / "b")], "RUN_DIR: no run folder"),
    "compare summary empty object": (lambda t: ["compare", str(_run_folder(t, {"config": {}}, {})), str(_good_run(t, "g"))], "summary.json: not an mmdiag.summary/1 summary"),
    "compare summary a list": (lambda t: ["compare", str(_run_folder(t, {"config": {}}, [1])), str(_good_run(t, "g"))], "summary.json: not an mmdiag.summary/1 summary (found 'list')"),
    "compare summary garbage": (lambda t: ["compare", str(_run_folder(t, {"config": {}}, "\x00garbage")), str(_good_run(t, "g"))], "summary.json: not valid JSON"),
    "compare summary of binary bytes": (lambda t: ["compare", str(_run_folder(t, {"config": {}}, NOT_UTF8)), str(_good_run(t, "g"))], "summary.json: not valid JSON (not UTF-8 text"),
    "compare run.json of binary bytes": (lambda t: ["compare", str(_good_run(t)), str(_run_folder(t, NOT_UTF8, name="g"))], "run.json: not valid JSON (not UTF-8 text"),
    "compare summary of another schema": (lambda t: ["compare", str(_run_folder(t, {"config": {}}, {"schema": "other/9"})), str(_good_run(t, "g"))], "found 'other/9'"),
    "compare summary without a model block": (
        lambda t: ["compare", str(_run_folder(t, {"config": {}}, {"schema": "mmdiag.summary/1", "stages": {}})), str(_good_run(t, "g"))],
        "its model or stages block",
    ),
    "compare summary missing": (lambda t: ["compare", str(_run_folder(t, {"config": {}})), str(_good_run(t, "g"))], "summary.json: file not found"),
    "compare --json onto a folder": (lambda t: ["compare", str(_good_run(t)), str(_good_run(t, "g")), "--json", str(t)], "--json: "),
    "compare --html onto a folder": (lambda t: ["compare", str(_good_run(t)), str(_good_run(t, "g")), "--html", str(t)], "--html: "),
    "compare --html in a read-only folder": (lambda t: ["compare", str(_good_run(t)), str(_good_run(t, "g")), "--html", str(t / READ_ONLY / "d.html")], "--html: cannot write to "),
    "compare --json under a file": (lambda t: ["compare", str(_good_run(t)), str(_good_run(t, "g")), "--json", str(t / "afile" / "d.json")], "afile is a file, not a folder"),
    "cache unknown action": (lambda t: ["cache", "purge"], "invalid choice: 'purge'"),
    "cache bad date": (lambda t: ["cache", "prune", "--unused-since", "yesterday"], "YYYY-MM-DD"),
    "cache folder is a file": (lambda t: ["cache", "info", "--cache", str(t / "afile")], "--cache: "),
    "verbose flag after the command": (lambda t: ["diagnose", "--config", str(t / "nope.yaml"), "--verbos"], "unrecognized arguments: --verbos"),
}


@pytest.mark.parametrize("case", ARGV)
def test_a_bad_command_line_is_one_line_naming_the_field(case, battery, capsys):
    build, expected = ARGV[case]
    argv = build(battery)
    fixtures = sorted(str(p) for p in (battery / "fixtures").rglob("*")) if (battery / "fixtures").exists() else []
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors exit from inside it
        code = e.code
    _check(capsys, battery, code, expected)
    after = sorted(str(p) for p in (battery / "fixtures").rglob("*")) if (battery / "fixtures").exists() else []
    assert after == fixtures  # nothing written, nothing removed


# what a stage needs of the analysed split, found by the pre-flight (not after stage 1 ran)
NEEDED_BY_A_STAGE = {
    "n below n_reference": (
        data("load", ", n: 10") + "stages: {crossmodal: {n_reference: 20}}\n",
        "stages.crossmodal.n_reference: 20 reference samples asked for, the analysed split has 10; lower n_reference or use more samples (data.n)",
    ),
    "a single class": (data("data_one_class"), "data: every sample of the analysed split has the same label ('a'); stage crossmodal needs at least two classes"),
}


@pytest.mark.parametrize("case", NEEDED_BY_A_STAGE)
def test_what_a_stage_needs_of_the_data_is_checked_before_anything_runs(case, battery, capsys):
    text, expected = NEEDED_BY_A_STAGE[case]
    cfg = battery / "diag.yaml"
    cfg.write_text(text + f"out: {battery / 'out'}\ncache: {battery / 'cache'}\n")
    _check(capsys, battery, main(["diagnose", "--config", str(cfg)]), expected)
    assert not list(battery.glob("cache/results/*"))  # not even the evaluation ran


def test_compare_checks_where_it_writes_before_it_prints(battery, capsys):
    a, b = _good_run(battery), _good_run(battery, "g")
    for flag in ("--json", "--html"):
        assert main(["compare", str(a), str(b), flag, str(battery / READ_ONLY / "diff")]) == 2
        printed = capsys.readouterr()
        assert printed.out == "" and printed.err.startswith(f"mmdiag: error: {flag}: cannot write to "), printed


def test_a_lone_surrogate_in_a_caption_or_class_name_is_shown_replaced(battery, capsys):
    """Captions and class names are only shown: a lone surrogate in one (which no UTF-8 file can
    hold) becomes U+FFFD in the report, and the run, which used to fail after every stage, ends."""
    cfg = battery / "diag.yaml"
    cfg.write_text(data("data_lone_surrogates") + f"device: cpu\nout: {battery / 'out'}\ncache: {battery / 'cache'}\nstages: {{crossmodal: {{shapley_draws: 2}}}}\n")
    assert main(["diagnose", "--config", str(cfg)]) == 0, capsys.readouterr().err
    run = battery / "out" / "diagnosis"
    html = (run / "report.html").read_bytes().decode("utf-8")
    assert "caption 0 \ufffd" in html and "b\ufffd" in html
    assert json.loads((run / "run.json").read_text())["report"]["bytes"] == len(html.encode())
    assert json.loads((run / "summary.json").read_text())["model"]["n"] == 24


def test_the_battery_has_at_least_150_cases():
    assert len(CONFIGS) + len(RAW) + len(ARGV) >= 150


def test_an_unexpected_error_is_one_line_with_a_log_file(battery, capsys, monkeypatch):
    import mmdiag.flows.cli as cli

    def broken(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "_run", broken)
    assert main(["stages"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "internal error (ZeroDivisionError: a bug)" in err and "Traceback" not in err
    log = err.split("traceback is in ")[1].split(" ")[0]
    assert "ZeroDivisionError" in open(log).read()
    os.unlink(log)
    with pytest.raises(ZeroDivisionError):  # -v: the traceback itself
        main(["-v", "stages"])


def test_a_factory_gets_the_flows_cache_and_device_when_it_asks(battery):
    from mmdiag.pipeline.config import ModelSpec
    from mmdiag.pipeline.resolve import load_model

    adapter, _ = load_model(ModelSpec(factory="bad_input_kit:build_with"), cache=battery / "cache", device="cpu")
    assert adapter.modalities == ("audio", "tabular")


def test_relative_paths_in_a_config_are_relative_to_its_folder(battery, monkeypatch, tmp_path_factory):
    from mmdiag.pipeline.config import load_config

    (battery / "conf").mkdir()
    (battery / "conf" / "w.safetensors").write_bytes(b"")
    cfg = battery / "conf" / "diag.yaml"
    cfg.write_text(GOOD_DATA + "model: {factory: 'bad_input_kit:build', weights: w.safetensors}\nout: runs\ncache: c\n")
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    config = load_config(cfg)
    here = (battery / "conf").resolve()
    assert (config.out, config.cache, config.model.weights) == (here / "runs", here / "c", here / "w.safetensors")
