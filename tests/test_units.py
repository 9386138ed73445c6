"""Units: removing, keeping and pooling attribution units."""

import pytest
import torch

from mmdiag.pipeline.errors import MmdiagError
from mmdiag.pipeline.units import FeatureGroups, PatchGrid, Tokens

EMBED = torch.nn.Embedding(10, 4, padding_idx=0)


def test_patch_grid_keep_all_none_and_one():
    x = torch.rand(2, 3, 8, 8)
    u = PatchGrid(patch=4, baseline=(0.1, 0.2, 0.3)).build(x, x)
    assert u.n == 4 and u.labels[0] == ["r0c0", "r0c1", "r1c0", "r1c1"]
    assert torch.equal(u.apply(x, torch.ones(2, 4, dtype=torch.bool)), x)
    none = u.apply(x, torch.zeros(2, 4, dtype=torch.bool))
    assert torch.allclose(none[:, 1], torch.full((2, 8, 8), 0.2))
    only_first = u.apply(x, torch.tensor([[True, False, False, False]] * 2))
    assert torch.equal(only_first[:, :, :4, :4], x[:, :, :4, :4])
    assert torch.allclose(only_first[:, 0, 4:, :], torch.full((2, 4, 8), 0.1))


def test_many_coalitions_per_sample_and_soft_masks():
    x = torch.rand(2, 3, 8, 8)
    u = PatchGrid(patch=4).build(x, x)
    keep = torch.rand(2, 5, 4) > 0.5
    out = u.apply(x, keep)
    assert out.shape == (10, 3, 8, 8)
    for b in range(2):
        for k in range(5):
            one = PatchGrid(patch=4).build(x[b : b + 1], x[b : b + 1])
            assert torch.equal(out[b * 5 + k], one.apply(x[b : b + 1], keep[b : b + 1, k])[0])
    half = u.apply(x, torch.full((2, 4), 0.5))
    assert torch.allclose(half, x / 2)


def test_pool_and_coverage():
    x = torch.ones(1, 3, 8, 8)
    u = PatchGrid(patch=4).build(x, x)
    assert torch.equal(u.pool(x), torch.full((1, 4), 48.0))
    region = torch.zeros(1, 8, 8)
    region[0, :4, :2] = 1  # half of the first patch
    assert torch.allclose(u.coverage(region), torch.tensor([[0.5, 0, 0, 0]]))


def test_tokens_keep_special_and_pad():
    ids = torch.tensor([[1, 5, 6, 0], [1, 7, 0, 0]])  # 1 = [CLS], 0 = [PAD]
    emb = EMBED(ids)
    u = Tokens(pad_id=0, special_ids=(1,)).build(ids, emb, EMBED)
    assert u.present.tolist() == [[False, True, True, False], [False, True, False, False]]
    removed = u.apply(emb, torch.zeros(2, 4, dtype=torch.bool))
    assert torch.equal(removed[:, 0], emb[:, 0])  # [CLS] kept
    assert torch.equal(removed, EMBED(torch.tensor([[1, 0, 0, 0], [1, 0, 0, 0]])))


def test_units_that_do_not_cover_the_input():
    x = torch.rand(1, 3, 10, 10)
    with pytest.raises(MmdiagError, match="does not tile"):
        PatchGrid(patch=4).build(x, x)
    with pytest.raises(MmdiagError, match="do not cover"):
        FeatureGroups(groups=[0, 0, 1]).build(torch.rand(2, 4), torch.rand(2, 4))
    with pytest.raises(MmdiagError, match="token ids"):
        Tokens().build(torch.rand(2, 3), torch.rand(2, 3, 4), EMBED)


def test_feature_groups():
    x = torch.rand(3, 4)
    u = FeatureGroups(groups=[0, 0, 1, -1], names=["a", "b"]).build(x, x)
    out = u.apply(x, torch.tensor([[False, True]] * 3))
    assert torch.equal(out[:, :2], torch.zeros(3, 2)) and torch.equal(out[:, 2:], x[:, 2:])
    assert torch.allclose(u.pool(x), torch.stack([x[:, 0] + x[:, 1], x[:, 2]], 1))


def test_take_with_a_bool_mask_keeps_the_chosen_samples_labels():
    units = Tokens(pad_id=0).build(torch.tensor([[5, 6], [7, 8], [9, 4]]), torch.zeros(3, 2, 4), lambda ids: torch.zeros(*ids.shape, 4))
    taken = units.take(torch.tensor([False, True, True]))
    assert taken.labels == [["7", "8"], ["9", "4"]] and taken.baseline.shape[0] == 2
    assert units.take(torch.tensor([True, False, False])).labels == [["5", "6"]]
