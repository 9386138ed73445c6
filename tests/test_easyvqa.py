"""The easy-VQA example: its data (from the easy-vqa package), ground-truth shape masks recovered
from the pixels, concepts parsed from the questions, and a tiny training run."""

import pytest
import torch

pytest.importorskip("easy_vqa", reason="the easy-VQA example needs its data package: pip install easy-vqa")

from mmdiag.pipeline.config import import_callable  # noqa: E402
from mmdiag.pipeline.errors import MmdiagError  # noqa: E402
from mmdiag.pipeline.examples import easyvqa as ev  # noqa: E402


@pytest.fixture(scope="module")
def test_split():
    return ev.data("test", n=600, seed=0)


def test_the_data_set_as_shipped(test_split):
    d = test_split
    assert d.inputs["image"].shape == (600, 3, ev.SIZE, ev.SIZE) and d.inputs["text"][:, 0].eq(1).all()  # [CLS] first
    assert len(ev.answers()) == 13 and len(ev.vocabulary()) == 28 and d.labels.max() < 13
    assert ev.data("test", n=600, seed=0).ids.equal(d.ids) and not ev.data("test", n=600, seed=1).ids.equal(d.ids)
    assert len(ev.data("test")) == 9673
    with pytest.raises(MmdiagError, match="unknown split 'val'"):
        ev.data("val")


def test_shape_masks_cover_the_shape(test_split):
    d = test_split
    mask, image = d.truth["image"]["shape"], d.inputs["image"]
    area = mask.float().mean((1, 2))
    assert (area > 0.005).all() and (area < 0.4).all() and 0.05 < float(area.mean()) < 0.15
    inside = (image * mask[:, None]).sum((2, 3)) / mask[:, None].sum((2, 3))
    outside = (image * ~mask[:, None]).sum((2, 3)) / (~mask[:, None]).sum((2, 3))
    assert ((inside - outside).abs().amax(1) > 0.2).all()  # the shape stands out from its background
    red = d.meta["colour"] == ev.COLOURS.index("red")
    assert red.sum() > 10 and (inside[red, 0] > inside[red, 1] + 0.3).all()  # the mask holds the named colour


def test_concepts_parsed_from_the_questions(test_split):
    d = test_split
    meta, questions = d.meta, d.display["caption"]
    answer = [d.class_names[y] for y in d.labels]
    yes_no = meta["qtype"] == 0
    assert set(meta["qtype"].tolist()) == {0, 1, 2} and (meta["present"][yes_no] >= 0).all() and (meta["present"][~yes_no] == -1).all()
    for i in range(len(d)):
        if "not" in questions[i].split():
            assert meta["negation"][i] == 1 and d.truth["text"]["negation"][i].sum() == 1
        if meta["qtype"][i] == 1:
            assert meta["shape"][i] == ev.SHAPES.index(answer[i])
    assert float((meta["shape"] >= 0).float().mean()) > 0.9 and float((meta["colour"] >= 0).float().mean()) > 0.9


def test_a_tiny_training_run_gives_a_working_model(test_split):
    net = ev.train(ev.TrainConfig(n_train=256, epochs=1, batch_size=64))
    adapter = ev.adapter(net)
    batch = {m: x[:32] for m, x in test_split.inputs.items()}
    with torch.no_grad():
        logits = adapter(batch)
    assert logits.shape == (32, 13) and torch.isfinite(logits).all()
    units = adapter.units(batch, adapter.encode(batch))
    assert units["image"].n == 64 and units["text"].n == batch["text"].shape[1]


def test_the_example_config_names_importable_factories(tmp_path):
    config = ev.config(tmp_path)
    assert config.data.split == "test" and config.data.splits == ["train", "test"] and config.run == "easyvqa"
    assert import_callable(config.model.factory, "model.factory") is ev.model
    assert import_callable(config.data.factory, "data.factory") is ev.data
