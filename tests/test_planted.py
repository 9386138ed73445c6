"""The planted worlds themselves (tests/planted.py): what their counterfactuals and label noise
change, and nothing else."""

import numpy as np
import torch

import planted as pl


def test_a_counterfactual_toggles_its_concept_and_nothing_else():
    world = pl.World(label=lambda c: c["colour"], spurious={"zz": 0.7, "mark": 0.7}, caption=(3, 6))
    data = pl.samples(world, 300, seed=1)
    ids, flipped = data.inputs["text"], data.counterfactuals["zz"].inputs["text"]
    for row, new in zip(ids.tolist(), flipped.tolist()):
        words, toggled = [t for t in row if t != pl.PAD], [t for t in new if t != pl.PAD]
        if pl.ZZ in words:
            assert pl.ZZ not in toggled and [t for t in words if t != pl.ZZ] == toggled  # deleted, the gap closed
        else:
            rest = [t for t in toggled if t != pl.ZZ]
            assert toggled.count(pl.ZZ) == 1
            # a full caption drops one filler word to make room
            assert rest == words or any(rest == words[:k] + words[k + 1 :] for k, t in enumerate(words) if t >= 5)
    image, painted = data.inputs["image"], data.counterfactuals["mark"].inputs["image"]
    corner = torch.zeros(8, 8, dtype=torch.bool)
    corner[:2, :2] = True
    assert torch.equal(image[..., ~corner], painted[..., ~corner])
    marked = (image[:, :, :2, :2] == np.float32(0.05)).flatten(1).all(1)
    assert torch.equal(marked, data.meta["mark"] == 1)
    assert torch.equal((painted[:, :, :2, :2] == np.float32(0.05)).flatten(1).all(1), ~marked)
    assert torch.equal(data.counterfactuals["mark"].labels, data.labels)


def test_label_noise_flips_the_given_labels_only():
    world = pl.World(label=lambda c: c["colour"], n_classes=3)
    clean, noisy = pl.samples(world, 2000, seed=2), pl.samples(world, 2000, seed=2, label_noise=0.1)
    assert torch.equal(clean.inputs["image"], noisy.inputs["image"])
    assert np.array_equal(pl.true_labels(world, noisy), clean.labels.numpy())
    assert abs((noisy.labels != clean.labels).float().mean().item() - 0.1) < 0.02
