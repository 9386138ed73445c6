"""The demo data: the planted rule, the planted shortcut and the ground-truth masks."""

from collections import defaultdict

import numpy as np
import pytest
import torch

from mmdiag.pipeline.demo import shapes
from mmdiag.pipeline.demo.vocab import INDEX, words


@pytest.fixture(scope="module")
def train():
    return shapes.split("train")


def test_label_is_named_colour_xor_not(train):
    m = train.meta
    assert torch.equal(train.labels, m["named_is_red"] ^ m["negation"])
    has_not = (train.inputs["text"] == INDEX["not"]).any(1).long()
    assert torch.equal(has_not, m["negation"])
    # on colour photos the colour concept is what the pixels show: red beats blue inside the
    # named shape
    colour = m["grey"] == 0
    img, mask = train.inputs["image"][colour], train.truth["image"]["named_shape"][colour]
    area = mask.sum((1, 2))
    red = (img[:, 0] * mask).sum((1, 2)) / area
    blue = (img[:, 2] * mask).sum((1, 2)) / area
    assert torch.equal((red > blue).long(), m["named_is_red"][colour])


def test_grey_photos_show_no_colour(train):
    """A quarter of the photos are grey: every pixel's channels are equal, and a shape's grey
    level is drawn whatever its colour, so nothing in the image tells the label."""
    grey = train.meta["grey"] == 1
    assert abs(grey.float().mean().item() - shapes.GREY) < 0.02
    img = train.inputs["image"][grey]
    assert torch.equal(img[:, 0], img[:, 1]) and torch.equal(img[:, 0], img[:, 2])
    mask = train.truth["image"]["named_shape"][grey]
    level = (img[:, 0] * mask).sum((1, 2)) / mask.sum((1, 2))
    red = train.meta["named_is_red"][grey] == 1
    assert abs(level[red].mean() - level[~red].mean()) < 0.01


@pytest.mark.parametrize("p_colour", [0.5, 0.8])
def test_the_mark_agrees_at_its_own_rate_on_colour_photos(p_colour):
    data = shapes.generate(8000, p_mark=0.8, seed=5, p_mark_colour=p_colour)
    agrees, grey = data.meta["shortcut_agrees"] == 1, data.meta["grey"] == 1
    assert abs(agrees[grey].float().mean().item() - 0.8) < 0.03
    assert abs(agrees[~grey].float().mean().item() - p_colour) < 0.03


def _rate_by_group(keys, y):
    groups = defaultdict(list)
    for k, v in zip(keys, y.tolist()):
        groups[k].append(v)
    return {k: (np.mean(v), len(v)) for k, v in groups.items()}


def test_neither_modality_alone_predicts_the_label(train):
    m, y = train.meta, train.labels
    # image content without the mark: the two shapes, their sides and colours
    left_red = torch.where(m["named_left"] == 1, m["named_is_red"], m["other_is_red"])
    right_red = torch.where(m["named_left"] == 1, m["other_is_red"], m["named_is_red"])
    image_keys = list(zip(left_red.tolist(), right_red.tolist()))
    for p, n in _rate_by_group(image_keys, y).values():
        assert abs(p - 0.5) < 0.05, (p, n)
    for p, n in _rate_by_group(train.display["caption"], y).values():
        assert abs(p - 0.5) < 0.15, (p, n)
    assert abs(y.float().mean().item() - 0.5) < 0.03


@pytest.mark.parametrize("split", ["iid", "ood", "anti"])
def test_mark_rate_per_class_matches_p(split):
    data = shapes.split(split)
    p = shapes.SPLITS[split]
    mark, y = data.meta["watermark"].float(), data.labels
    assert abs(mark[y == 1].mean().item() - p) < 0.04
    assert abs(mark[y == 0].mean().item() - (1 - p)) < 0.04
    # the mark is in the pixels exactly when the concept says so
    corner_black = (data.inputs["image"][:, :, :4, :4] == 0).all(dim=(1, 2, 3)).long()
    assert torch.equal(corner_black, data.meta["watermark"])


def test_masks_cover_exactly_the_drawn_shapes_and_mark():
    data = shapes.split("iid", n=500)
    img = data.inputs["image"]
    t = data.truth["image"]
    named, other, mark = t["named_shape"], t["other_shape"], t["watermark"]
    assert not (named & other).any() and not (named & mark).any() and not (other & mark).any()
    assert (named.sum((1, 2)) > 40).all() and (other.sum((1, 2)) > 40).all()
    assert torch.equal(mark.sum((1, 2)) > 0, data.meta["watermark"] == 1)
    assert (img.permute(0, 2, 3, 1)[mark] == 0).all()
    # on colour photos shape pixels are saturated red or blue; everything else is light background
    shape = (named | other)[:, None].expand_as(img)
    spread = img.amax(1) - img.amin(1)
    colour = (data.meta["grey"] == 0)[:, None, None]
    assert (spread[(named | other) & colour] > 0.35).all()
    background = ~(named | other | mark)
    assert (img.amin(1)[background] > 0.5).all()
    assert shape.any()
    # named shape sits in the half the concept says
    cols = torch.arange(32).float()
    centre = (named.sum(1).float() * cols).sum(1) / named.sum((1, 2))
    assert torch.equal((centre < 16).long(), data.meta["named_left"])


def test_text_truth_marks_the_negation_word():
    data = shapes.split("ood", n=300)
    neg = data.truth["text"]["negation"]
    assert torch.equal(neg.any(1).long(), data.meta["negation"])
    for i, j in neg.nonzero().tolist():
        assert words(data.inputs["text"][i : i + 1])[0][j] == "not"


def test_same_seed_same_data_other_seed_other_data():
    a, b = shapes.split("ood", n=200), shapes.split("ood", n=200)
    assert a.fingerprint() == b.fingerprint()
    assert shapes.split("ood", n=200, seed=1).fingerprint() != a.fingerprint()
    assert shapes.split("anti", n=200).fingerprint() != a.fingerprint()
