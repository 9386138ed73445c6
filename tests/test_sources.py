"""Streamed data: a set read from disk a batch at a time gives what the same data held in memory
gives (fingerprint, every read, the whole diagnosis); stages do not depend on their batch size;
a source that fails mid-stream is one line naming the row."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mmdiag.flows.cli import main
from mmdiag.pipeline.demo import shapes
from mmdiag.pipeline.errors import MmdiagError
from mmdiag.pipeline.resolve import predict
from mmdiag.pipeline.sources import StreamedSampleSet, hf_dataset, image_table, streamed
from mmdiag.stages import Context, registry

import planted as pl
from inprocess import QUICK


class SampleFolder(torch.utils.data.Dataset):
    """One safetensors file and one JSON file per sample: a data set that lives on disk."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.n = len(list(self.folder.glob("*.json")))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        small = json.loads((self.folder / f"{i}.json").read_text())
        tensors = load_file(str(self.folder / f"{i}.safetensors"))
        item = {
            "id": small["id"],
            "label": small["label"],
            "meta": small["meta"],
            "display": small["display"],
            "inputs": {},
            "truth": {},
            "counterfactuals": {c: {"inputs": {}, "label": label} for c, label in small["cf_labels"].items()},
        }
        for key, t in tensors.items():
            part, *path = key.split("/")
            if part == "inputs":
                item["inputs"][path[0]] = t
            elif part == "truth":
                item["truth"].setdefault(path[0], {})[path[1]] = t
            else:
                item["counterfactuals"][path[0]]["inputs"][path[1]] = t
        return item


def write_folder(data, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(len(data)):
        item = data[i]
        tensors = {f"inputs/{m}": x.contiguous() for m, x in item["inputs"].items()}
        tensors.update({f"truth/{m}/{r}": t.contiguous() for m, rs in item["truth"].items() for r, t in rs.items()})
        tensors.update({f"cf/{c}/{m}": x.contiguous() for c, cf in item["counterfactuals"].items() for m, x in cf["inputs"].items()})
        save_file(tensors, str(folder / f"{i}.safetensors"))
        cf_labels = {c: cf.get("label") for c, cf in item["counterfactuals"].items()}
        (folder / f"{i}.json").write_text(json.dumps({k: item[k] for k in ("id", "label", "meta", "display")} | {"cf_labels": cf_labels}))
    return folder


def from_disk(folder: Path, like, **kw) -> StreamedSampleSet:
    return streamed(SampleFolder(folder), class_names=like.class_names, name=like.name, truth_concepts=like.truth_concepts, class_concepts=like.class_concepts, **kw)


def test_a_streamed_set_reads_what_the_in_memory_set_holds(tmp_path):
    memory = shapes.split("ood", n=150)
    disk = from_disk(write_folder(memory, tmp_path / "ood"), memory, batch_size=32)
    assert isinstance(disk.inputs["image"], type(disk.inputs["image"])) and not torch.is_tensor(disk.inputs["image"])
    assert disk.fingerprint() == memory.fingerprint()
    rows = torch.tensor([3, 77, 149])
    for a, b in ((disk.subset(rows), memory.subset(rows)), (disk.view(rows).subset(torch.arange(3)), memory.subset(rows))):
        assert a.fingerprint() == b.fingerprint()
    seen = 0
    for rows, inputs in disk.batches(40):
        assert all(torch.equal(inputs[m], memory.inputs[m][rows]) for m in inputs)
        assert torch.equal(disk.truth["image"]["watermark"][rows], memory.truth["image"]["watermark"][rows])
        seen += len(inputs["image"])
    assert seen == 150
    cf = disk.counterfactuals["negation"]
    assert torch.equal(cf.inputs["text"][10:20], memory.counterfactuals["negation"].inputs["text"][10:20])
    assert torch.equal(cf.labels, memory.counterfactuals["negation"].labels)


def test_every_stage_gives_the_same_result_whatever_its_batch_size():
    world = pl.World(label=lambda c: c["colour"])
    model = pl.train(world, steps=50)
    data = pl.samples(world, 90, seed=1)
    logits = predict(model, data, torch.device("cpu"))

    def run(batch_size):
        found = {}
        for stage in registry.stages():
            settings = dict(QUICK[stage.name])
            if stage.name == "unimodal":  # every sampled method: its draws are the sample's own
                settings.update(methods=["shapley", "shapley_kernel", "iba", "lime", "kernel_shap", "smoothgrad"], sanity_samples=8)
            if "batch_size" in stage.config.model_fields:
                settings["batch_size"] = batch_size
            ctx = Context(model, data, torch.device("cpu"), 0, logits)
            found[stage.name] = stage.run(ctx, stage.config.model_validate(settings), {r: found[r] for r in stage.reads})
        return found

    small, large = run(16), run(64)
    for name, result in small.items():
        assert json.dumps(result.summary, sort_keys=True, default=str) == json.dumps(large[name].summary, sort_keys=True, default=str), name
        for key, array in result.arrays.items():
            np.testing.assert_allclose(array, large[name].arrays[key], atol=1e-5, err_msg=f"{name}: {key}")


def _figures(summary: dict):
    """summary.json without what differs between two runs of the same computation."""
    if isinstance(summary, dict):
        return {k: _figures(v) for k, v in summary.items() if k not in ("seconds", "created", "cached")}
    if isinstance(summary, list):
        return [_figures(v) for v in summary]
    return summary


FACTORY = """
from pathlib import Path
import sys
sys.path.insert(0, {tests!r})
from mmdiag.pipeline.demo import shapes
from test_sources import from_disk, write_folder

def memory(split, n, seed):
    return shapes.split(split, n=n, seed=seed)

def disk(split, n, seed):
    data = memory(split, n, seed)
    folder = Path({root!r}) / split
    if not folder.exists():
        write_folder(data, folder)
    return from_disk(folder, data, batch_size=24)
"""


@pytest.mark.slow
def test_streamed_and_in_memory_data_give_identical_summaries(tmp_path, monkeypatch, capsys, cache, demo_models):
    import shutil

    demo_models("demo-film")  # trained once; each run gets its own copy, and a cache of its own
    (tmp_path / "userdata.py").write_text(FACTORY.format(tests=str(Path(__file__).parent), root=str(tmp_path / "samples")))
    monkeypatch.syspath_prepend(str(tmp_path))
    stages = json.dumps({**QUICK, "unimodal": {**QUICK["unimodal"], "n_correct": 10, "max_errors": 20}})
    summaries = {}
    for kind in ("memory", "disk"):
        shutil.copytree(cache / "models", tmp_path / kind / "cache" / "models")
        cfg = tmp_path / f"{kind}.yaml"
        cfg.write_text(
            f"run: {kind}\nmodel: {{name: demo-film}}\ndata: {{factory: 'userdata:{kind}', split: ood, splits: [ood], n: 160}}\n"
            f"out: {tmp_path / 'runs'}\ncache: {tmp_path / kind / 'cache'}\nstages: {stages}\n"
        )
        capsys.readouterr()
        assert main(["diagnose", "--config", str(cfg)]) == 0
        summaries[kind] = json.loads((tmp_path / "runs" / kind / "summary.json").read_text())
        done = {line.split(":")[1].strip() for line in capsys.readouterr().err.splitlines() if ": 100% (" in line}
        assert done == {s.name for s in registry.stages()}, done  # every stage's progress reached 100%
    memory, disk = (_figures(summaries[k]) for k in ("memory", "disk"))
    memory["run"].pop("name"), disk["run"].pop("name")
    assert memory == disk
    assert summaries["memory"]["stages"]["unimodal"]["key"] == summaries["disk"]["stages"]["unimodal"]["key"]


def _table(tmp_path: Path, n: int = 12) -> tuple[Path, object]:
    """n shapes images as PNG files and a CSV table of captions, labels and concepts."""
    from PIL import Image

    data = shapes.split("ood", n=n)
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(n):
        pixels = (data.inputs["image"][i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / "img" / f"{i}.png")
        rows.append(
            {
                "image": f"img/{i}.png",
                "caption": data.display["caption"][i],
                "label": data.class_names[int(data.labels[i])],
                "negation": int(data.meta["negation"][i]),
                "watermark": int(data.meta["watermark"][i]),
            }
        )
    import csv

    with open(tmp_path / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return tmp_path / "table.csv", data


def test_an_image_folder_with_a_csv_or_parquet_table_and_a_hf_dataset_read_the_same_samples(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmdiag.pipeline.demo.vocab import tokenize

    table, data = _table(tmp_path)
    common = dict(tokenize=tokenize, concepts=["negation", "watermark"], class_names=data.class_names, image_size=32, name="shapes-table")
    csv_set = image_table(table, **common)
    assert torch.equal(csv_set.labels, data.labels) and torch.equal(csv_set.meta["negation"], data.meta["negation"])
    assert torch.equal(csv_set.subset(torch.arange(12)).inputs["text"], data.inputs["text"])
    # PNG holds 8 bits per channel: the pixels come back to within half a step
    assert (csv_set.subset(torch.arange(12)).inputs["image"] - data.inputs["image"]).abs().max() <= 0.5 / 255 + 1e-6
    assert csv_set.display["caption"] == data.display["caption"]

    rows = [dict(r) for r in __import__("csv").DictReader(open(table))]
    for r in rows:
        r["negation"], r["watermark"] = int(r["negation"]), int(r["watermark"])
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "table.parquet")
    assert image_table(tmp_path / "table.parquet", **common).fingerprint() == csv_set.fingerprint()

    ds = datasets.Dataset.from_list([{**r, "image": str(tmp_path / r["image"])} for r in rows]).cast_column("image", datasets.Image())
    ds = ds.cast_column("label", datasets.ClassLabel(names=data.class_names))
    hf = hf_dataset(ds, **{**common, "class_names": None}, workers=2)
    assert hf.class_names == data.class_names
    assert hf.fingerprint() == csv_set.fingerprint()


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


BROKEN = """
from mmdiag.pipeline.demo.vocab import tokenize
from mmdiag.pipeline.sources import image_table
import torch

def table(split, n, seed):
    return image_table({table!r}, tokenize=tokenize, concepts=["negation"], image_size=32)

class Failing(torch.utils.data.Dataset):
    def __len__(self):
        return 10
    def __getitem__(self, i):
        if i == 7:
            raise OSError("disk read error")
        return {{"inputs": {{"x": torch.ones(3), "y": torch.ones(2)}}, "label": i % 2}}

def failing(split, n, seed):
    from mmdiag.pipeline.sources import streamed
    return streamed(Failing(), class_names=["a", "b"], batch_size=4)
"""


@pytest.mark.parametrize("broken, where", [("corrupt image", "row 5"), ("missing caption", "row 3"), ("failing dataset", "row 7")])
def test_a_source_that_fails_mid_stream_is_one_line_naming_the_row(tmp_path, monkeypatch, capsys, broken, where):
    table, _ = _table(tmp_path)
    if broken == "corrupt image":
        (tmp_path / "img" / "5.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    if broken == "missing caption":
        lines = table.read_text().splitlines()
        cells = lines[4].split(",")
        cells[1] = ""
        lines[4] = ",".join(cells)
        table.write_text("\n".join(lines) + "\n")
    module = f"broken_{broken.replace(' ', '_')}"  # a module name per case: each is imported afresh
    (tmp_path / f"{module}.py").write_text(BROKEN.format(table=str(table)))
    monkeypatch.syspath_prepend(str(tmp_path))
    factory = f"{module}:failing" if broken == "failing dataset" else f"{module}:table"
    cfg = tmp_path / "diag.yaml"
    cfg.write_text(f"run: broken\nmodel: {{name: demo-film}}\ndata: {{factory: '{factory}', split: val}}\nout: {tmp_path / 'runs'}\n")
    assert main(["diagnose", "--config", str(cfg)]) == 2
    line = _one_line(capsys)
    assert where in line, line
    assert not (tmp_path / "runs" / "broken").exists()


def test_rows_that_disagree_are_refused_with_their_row():
    class Ragged(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return {"inputs": {"text": torch.ones(9 if i != 4 else 11, dtype=torch.long)}, "label": 0, "display": {"caption": "x"}}

    with pytest.raises(MmdiagError, match=r"row 4: inputs.text is torch.int64 \(11,\), row 0 had torch.int64 \(9,\)"):
        streamed(Ragged())
    nan = [{"inputs": {"x": torch.tensor([0.0, float("nan")])}, "label": 0}] * 3
    with pytest.raises(MmdiagError, match="row 0: inputs.x holds NaN"):
        streamed(nan)


def test_a_table_read_with_a_hugging_face_processor_equals_hf_samples(tmp_path):
    from PIL import Image

    from mmdiag.pipeline.hf import hf_readers, hf_samples, load_clip

    from test_hf import CAPTIONS, images, save_clip

    clip = load_clip(save_clip(tmp_path / "clip"), local_files_only=True)
    pictures = images(len(CAPTIONS))
    lines = ["image,caption,label"]
    for i, (p, c) in enumerate(zip(pictures, CAPTIONS)):
        Image.fromarray(p).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png,{c},{i % 2}")
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    table = image_table(tmp_path / "pairs.csv", **hf_readers(clip, length=16), class_names=clip.class_names)
    direct = hf_samples(clip, pictures, CAPTIONS, [i % 2 for i in range(len(CAPTIONS))])
    rows = torch.arange(len(CAPTIONS))
    assert torch.allclose(table.subset(rows).inputs["image"], direct.inputs["image"], atol=1e-6)
    streamed_ids, ids = table.subset(rows).inputs["text"], direct.inputs["text"]
    assert torch.equal(streamed_ids[:, : ids.shape[1]], ids) and streamed_ids.shape[1] == 16
    with torch.no_grad():  # padded to the model's length: the same scores
        assert torch.allclose(clip(table.subset(rows).inputs), clip(direct.inputs), atol=1e-5)
