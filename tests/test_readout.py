"""What a modality shows of the label against what the model takes from it (stages/readout.py),
by construction: a model that reads nothing of an informative modality leaves all of it unused,
one that reads it fully leaves nothing, and a modality that tells nothing of the label is never
called unused, however little the model reads it."""

import numpy as np
import torch

from mmdiag.pipeline.units import Units
from mmdiag.stages import attribution as attr
from mmdiag.stages import readout

Z = 2.24  # 95% over two modalities


def _world(seed: int = 0, n: int = 600):
    """Two modalities: `a` tells the label (its first feature's sign), `b` is noise."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(n, 4)), rng.normal(size=(n, 4))
    return a, b, (a[:, 0] > 0).astype(np.int64)


def _ablations(score) -> np.ndarray:
    """(N, 4, 2) logits of a model whose class-1 logit is `score(a, b)` under the four modality
    coalitions (a removed: its features 0; b likewise), in attribution.coalitions order."""
    out = []
    for keep_a, keep_b in attr.coalitions(2).tolist():
        s = score(keep_a, keep_b)
        out.append(np.stack([np.zeros_like(s), s], 1))
    return np.stack(out, 1)


def test_a_model_that_reads_nothing_of_the_telling_modality_leaves_it_unused():
    a, b, y = _world()
    logits = _ablations(lambda ka, kb: 0.5 * (b[:, 1] if kb else 0 * b[:, 1]))  # reads the noise only
    found = readout.unused(logits, {"a": a, "b": b}, y, Z)
    assert found["a"]["model_gain"] == 0.0  # removing a changes nothing the model computes
    assert found["a"]["readout_gain"] > 0.3 and found["a"]["unused"]["low"] > 0 and found["a"]["beyond_answer"]["low"] > 0
    # b tells nothing: the readout gains nothing from it (the model's small use of it is a loss)
    assert found["b"]["unused"]["low"] <= 0 and found["b"]["beyond_answer"]["low"] <= 0


def test_a_model_that_reads_the_telling_modality_leaves_nothing_unused():
    a, b, y = _world()
    logits = _ablations(lambda ka, kb: 8.0 * (a[:, 0] if ka else 0 * a[:, 0]))  # the label's own rule
    found = readout.unused(logits, {"a": a, "b": b}, y, Z)
    # it takes from `a` all the readout does (a readout of its logits with `a` beside them is
    # a shade sharper than one of the logits alone, on samples both already classify right:
    # the rule needs both intervals above 0)
    assert found["a"]["unused"]["low"] <= 0
    assert found["b"]["unused"]["low"] <= 0 and found["b"]["beyond_answer"]["low"] <= 0


def test_a_model_that_reads_a_little_of_the_telling_modality_still_leaves_most_of_it():
    """A fixed share would pass this model (it reads `a`, weakly): the readout does not."""
    a, b, y = _world()
    logits = _ablations(lambda ka, kb: 0.3 * (a[:, 0] if ka else 0 * a[:, 0]))
    found = readout.unused(logits, {"a": a, "b": b}, y, Z)
    assert 0 < found["a"]["model_gain"] < found["a"]["readout_gain"]
    assert found["a"]["unused"]["low"] > 0 and found["a"]["beyond_answer"]["low"] > 0


def test_the_readout_sees_an_image_pooled_and_a_sequence_as_a_bag_of_its_units():
    image = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    grid = Units(torch.zeros(1, 1, 16, 16, dtype=torch.long), 1, image, [[""], [""]])
    assert readout.features(image, grid).shape == (2, 3 * 8 * 8)
    words = torch.tensor([[[1.0], [3.0], [100.0]]])  # the third slot is padding (no unit)
    units = Units(torch.tensor([[0, 1, -1]]), 2, torch.zeros_like(words), [["x", "y"]])
    assert readout.features(words, units).tolist() == [[2.0]]
    tiles = torch.ones(2, 5, 3, 32, 32)  # five tiles of each image: their mean, pooled
    assert readout.features(tiles, grid).shape == (2, 3 * 8 * 8)
    wide = torch.randn(3, 4096)  # a large model's embedding: projected, the same for every batch
    assert readout.features(wide, grid).shape == (3, readout.WIDTH)
    assert torch.allclose(readout.features(wide[:1], grid), readout.features(wide, grid)[:1], atol=1e-5)
