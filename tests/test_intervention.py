"""The intervention stage against hand computation: a region's removal is `Units.apply` and one
forward pass, its null sets have the region's size and avoid it, the modality values are the
exact 2^M game, counterfactuals are the flipped inputs, and shards merge to the whole."""

import numpy as np
import pytest
import torch

from mmdiag.pipeline.resolve import predict
from mmdiag.stages import attribution as attr
from mmdiag.stages import intervention as iv
from mmdiag.stages.base import Context

import planted as pl


@pytest.fixture(scope="module")
def world():
    return pl.World(label=lambda c: c["colour"], spurious={"zz": 0.9}, contrast=0.25)


@pytest.fixture(scope="module")
def model(world):
    return pl.train(world, steps=200)


@pytest.fixture(scope="module")
def data(world):
    return pl.samples(world, 120, seed=5, p_spurious={"zz": 0.5})


@pytest.fixture(scope="module")
def ran(model, data):
    logits = predict(model, data, torch.device("cpu"))
    return iv.run(Context(model, data, torch.device("cpu"), 0, logits), iv.InterventionConfig(null_sets=4, batch_size=32), {}), logits


def test_region_removal_is_one_forward_pass_of_the_removed_input(model, data, ran):
    result, logits = ran
    encoded = model.encode(data.inputs)
    units = model.units(data.inputs, encoded)
    region = (units["text"].coverage(data.truth["text"]["zz"]) > 0) & units["text"].present
    removed = {**encoded, "text": units["text"].apply(encoded["text"], ~region)}
    with torch.no_grad():
        after = model.forward(removed)
    has = region.any(1).numpy()
    pred = logits.argmax(1)
    a = result.arrays
    assert np.array_equal(a["region.text.zz.has"], has)
    assert np.array_equal(a["region.text.zz.pred_after"][has], after.argmax(1).numpy()[has])
    expected = (after.gather(1, pred[:, None]) - logits.gather(1, pred[:, None])).squeeze(1).numpy()
    assert np.allclose(a["region.text.zz.d_pred"][has], expected[has], atol=1e-5)
    assert np.array_equal(a["region.text.zz.size"][has], np.ones(has.sum()))  # one token


def test_null_sets_have_the_regions_size_and_avoid_it():
    present = torch.tensor([[True] * 6 + [False] * 2, [True] * 8])
    region = torch.tensor([[True, True, False, False, False, False, False, False], [False] * 7 + [True]])
    scores = iv.null_scores(torch.tensor([3, 9]), 0, 0, 50, 8)
    keep, valid = iv.region_keeps(present, slice(0, 8), region, scores)
    assert valid.tolist() == [True, True]
    assert torch.equal(keep[:, 0], ~region)
    removed = ~keep[:, 1:]
    assert torch.equal(removed.sum(2), region.sum(1, keepdim=True).expand(2, 50))
    assert not (removed & region[:, None]).any()  # never the region's own units
    assert not (removed & ~present[:, None]).any()  # never an absent slot
    assert removed[0].any(0)[2:6].all()  # every other present unit is drawn sometimes


def test_a_samples_null_does_not_depend_on_its_batch():
    a = iv.null_scores(torch.tensor([4, 7, 11]), 3, 1, 2, 5)
    b = iv.null_scores(torch.tensor([11]), 3, 1, 2, 5)
    assert torch.equal(a[2], b[0])


def test_modality_values_are_the_exact_game(model, data, ran):
    result, logits = ran
    encoded = model.encode(data.inputs)
    units = model.units(data.inputs, encoded)
    game = attr.Game(model, {m: t.detach() for m, t in encoded.items()}, units, logits.argmax(1))
    owner = torch.repeat_interleave(torch.arange(2), torch.tensor(game.sizes))
    c = attr.coalitions(2)
    v = game.value(c[:, owner].expand(len(data), -1, -1))
    assert np.allclose(result.arrays["modality.pred"], v.numpy(), atol=1e-5)
    phi = attr.shapley_from_values(v.double(), 2).numpy()
    share = np.abs(phi) / np.abs(phi).sum(1, keepdims=True)
    assert result.summary["modalities"]["text"]["share"]["value"] == pytest.approx(share[:, 1].mean(), abs=1e-4)
    pair = result.summary["pairs"]["image×text"]["mean"]
    assert pair == pytest.approx(float((v[:, 3] - v[:, 2] - v[:, 1] + v[:, 0]).mean()), abs=1e-4)


def test_a_counterfactual_is_the_flipped_input(model, data, ran):
    result, logits = ran
    cf = data.counterfactuals["zz"]
    with torch.no_grad():
        after = model({**data.inputs, **cf.inputs}).argmax(1).numpy()
    assert np.array_equal(result.arrays["counterfactual.zz.pred_after"], after)
    figures = result.summary["counterfactuals"]["zz"]
    assert figures["label_changed_rate"]["value"] == 0.0  # the word is spurious: the label stays
    assert figures["flip_rate_label_kept"]["value"] == pytest.approx(float((after != logits.argmax(1).numpy()).mean()), abs=1e-4)


def test_shards_merge_to_the_whole(model, data, ran):
    result, logits = ran
    config = iv.InterventionConfig(null_sets=4, batch_size=32)
    halves = [torch.arange(0, 50), torch.arange(50, len(data))]
    parts = [iv.run(Context(model, data.subset(h), torch.device("cpu"), 0, logits[h]), config, {}) for h in halves]
    merged = iv.merge(parts)
    assert merged.summary == result.summary
    for k, v in result.arrays.items():
        assert np.allclose(merged.arrays[k], v, atol=1e-6), k


def test_the_summary_compares_each_region_with_its_null(ran):
    result, _ = ran
    zz = result.summary["regions"]["text.zz"]
    assert zz["concept"] == "zz" and zz["units"] == 1.0
    assert zz["flip_effect"]["low"] <= zz["flip_effect"]["value"] <= zz["flip_effect"]["high"]
    assert zz["flip_rate"]["value"] == pytest.approx(zz["null_flip_rate"]["value"] + zz["flip_effect"]["value"], abs=0.05)
