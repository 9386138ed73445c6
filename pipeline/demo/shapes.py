"""Shapes and captions: a data set with a planted cross-modal rule and a planted shortcut.

Each 32x32 image has two different shapes (circle, square, triangle), one per half, each red or
blue. The caption names one of them: "<filler> the <shape> is [not] red". The label is
`[named shape is red] XOR [caption says "not"]`: neither modality alone predicts it, the text
picks the image region that matters and can flip the answer. A black 4x4 mark in the top-left
corner appears with probability p when y = 1 and 1 - p when y = 0: a shortcut whose strength
differs between splits (train and iid p = 0.8, ood 0.5, anti 0.2).

A quarter of the photos are grey: each shape is drawn at a grey level drawn whatever its colour, so
the colour, and with it the label, cannot be seen; there the mark is all a model can go by.
That makes the demo's bugs hold by construction rather than by a lucky seed: a model trained
with the mark uninformative on colour photos (`p_mark_colour=0.5`) can only fit those by the
rule and the grey ones by the mark, so it learns the shortcut on exactly the grey part.

Each truth region is linked to the concept it shows, and two counterfactuals come with the data:
the mark toggled (label unchanged) and "not" toggled (label flipped).
"""

from __future__ import annotations

import numpy as np
import torch

from mmdiag.pipeline.data import Counterfactual, SampleSet
from mmdiag.pipeline.demo.vocab import tokenize

SIZE = 32
MARK = 4  # side of the corner mark, pixels
SHAPES = ("circle", "square", "triangle")
FILLERS = ("", "in this image", "in the picture", "look", "here", "apparently")
SPLITS = {"train": 0.8, "iid": 0.8, "ood": 0.5, "anti": 0.2}
SPLIT_SEEDS = {"train": 0, "iid": 1, "ood": 2, "anti": 3}
RED, BLUE = (210, 40, 40), (40, 60, 210)
CLASS_NAMES = ["false", "true"]
GREY = 0.25  # share of grey photos
GREY_LEVEL = (85, 115)  # a grey shape's level, drawn whatever its colour
CONCEPTS = ("named_is_red", "other_is_red", "named_shape", "negation", "watermark", "named_left", "grey", "shortcut_agrees")


def _shape_masks(kind: np.ndarray, cx: np.ndarray, cy: np.ndarray, size: np.ndarray) -> np.ndarray:
    """(N, SIZE, SIZE) bool masks of one shape per sample."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    dx, dy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]
    s = size[:, None, None]
    circle = dx**2 + dy**2 <= s**2
    square = (np.abs(dx) <= 0.8 * s) & (np.abs(dy) <= 0.8 * s)
    # apex up: the half-width grows linearly from the top edge to the base
    triangle = (dy >= -s) & (dy <= 0.8 * s) & (np.abs(dx) <= (dy + s) * 0.6)
    k = kind[:, None, None]
    return np.where(k == 0, circle, np.where(k == 1, square, triangle))


def generate(n: int, p_mark: float, seed: int, name: str = "shapes", p_mark_colour: float | None = None) -> SampleSet:
    """n samples whose mark agrees with the label with probability `p_mark` (on colour photos
    `p_mark_colour`, where given)."""
    rng = np.random.default_rng(seed)
    left_kind = rng.integers(0, 3, n)
    right_kind = (left_kind + rng.integers(1, 3, n)) % 3  # always a different shape
    left_red, right_red = rng.random(n) < 0.5, rng.random(n) < 0.5
    named_left = rng.random(n) < 0.5
    negation = rng.random(n) < 0.5
    named_is_red = np.where(named_left, left_red, right_red)
    other_is_red = np.where(named_left, right_red, left_red)
    label = named_is_red ^ negation
    grey = rng.random(n) < GREY
    p = np.where(grey, p_mark, p_mark if p_mark_colour is None else p_mark_colour)
    watermark = rng.random(n) < np.where(label, p, 1 - p)

    size = rng.uniform(5.0, 6.5, (2, n)).astype(np.float32)
    cy = rng.uniform(11, 22, (2, n)).astype(np.float32)
    cx = np.stack([rng.uniform(7.5, 9.5, n), rng.uniform(22.5, 24.5, n)]).astype(np.float32)
    masks = [_shape_masks(k, cx[i], cy[i], size[i]) for i, k in enumerate((left_kind, right_kind))]
    corner = np.zeros((SIZE, SIZE), bool)
    corner[:MARK, :MARK] = True
    masks = [m & ~corner for m in masks]  # the mark region belongs to the mark alone

    image = rng.uniform(170, 240, (n, 3, 1, 1)) + rng.normal(0, 6, (n, 3, SIZE, SIZE))
    for mask, red in zip(masks, (left_red, right_red)):
        colour = np.where(red[:, None], RED, BLUE) + rng.uniform(-25, 25, (n, 3))
        colour = np.where(grey[:, None], rng.uniform(*GREY_LEVEL, (n, 1)), colour)
        image = np.where(mask[:, None], colour[:, :, None, None], image)
    image = np.where(grey[:, None, None, None], image.mean(1, keepdims=True), image)
    unmarked = np.clip(image, 0, 255).astype(np.float32) / 255.0
    marked = np.where(corner[None, None], 0.0, unmarked).astype(np.float32)
    image = np.where(watermark[:, None, None, None], marked, unmarked)
    mark = watermark[:, None, None] & corner[None]

    named_kind = np.where(named_left, left_kind, right_kind)
    fillers = rng.integers(0, len(FILLERS), n)
    captions = [" ".join(w for w in (FILLERS[f], "the", SHAPES[k], "is", "not" if neg else "", "red") if w) for f, k, neg in zip(fillers, named_kind, negation)]
    ids = tokenize(captions)
    # counterfactuals: the same image with the mark toggled (the label stays), the same caption
    # with "not" toggled (the label flips)
    toggled = [" ".join(w for w in (FILLERS[f], "the", SHAPES[k], "is", "" if neg else "not", "red") if w) for f, k, neg in zip(fillers, named_kind, negation)]
    tokens = [["[CLS]", *c.split()] for c in captions]
    named_mask = np.where(named_left[:, None, None], masks[0], masks[1])
    other_mask = np.where(named_left[:, None, None], masks[1], masks[0])

    def concept(v):
        return torch.as_tensor(np.asarray(v), dtype=torch.long)

    return SampleSet(
        inputs={"image": torch.from_numpy(image), "text": ids},
        labels=concept(label),
        meta={
            "named_is_red": concept(named_is_red),
            "other_is_red": concept(other_is_red),
            "named_shape": concept(named_kind),
            "negation": concept(negation),
            "watermark": concept(watermark),
            "named_left": concept(named_left),
            "grey": concept(grey),
            "shortcut_agrees": concept(watermark == label),
        },
        truth={
            "image": {
                "named_shape": torch.from_numpy(named_mask),
                "other_shape": torch.from_numpy(other_mask),
                "watermark": torch.from_numpy(mark),
            },
            "text": {
                "negation": ids == tokenize(["not"])[0, 1],
                "shape_word": (ids >= 10) & (ids <= 12),
            },
        },
        display={"text": tokens, "caption": captions},
        class_names=CLASS_NAMES,
        name=name,
        truth_concepts={
            "image": {"named_shape": "named_is_red", "other_shape": "other_is_red", "watermark": "watermark"},
            "text": {"negation": "negation", "shape_word": "named_shape"},
        },
        class_concepts=["watermark", "named_is_red", "other_is_red"],  # value 1 points to class "true"
        counterfactuals={
            "watermark": Counterfactual({"image": torch.from_numpy(np.where(watermark[:, None, None, None], unmarked, marked))}, labels=concept(label)),
            "negation": Counterfactual({"text": tokenize(toggled)}, labels=concept(~label.astype(bool))),
        },
    )


def split(name: str, n: int | None = None, seed: int = 0) -> SampleSet:
    """A named split: train (8,000 samples), iid, ood, anti (2,000 each) by default."""
    if name not in SPLITS:
        from mmdiag.pipeline.errors import MmdiagError

        raise MmdiagError(f"data.split: unknown split {name!r}; choose one of {', '.join(SPLITS)}")
    n = n if n is not None else (8000 if name == "train" else 2000)
    return generate(n, SPLITS[name], seed=1000 * seed + SPLIT_SEEDS[name], name=f"shapes/{name}")
