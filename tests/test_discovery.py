"""Discovery (stages/discovery.py): the words, places and image-wide properties a model follows,
found with no annotations.

By construction first (hand-made models whose rule is known exactly: a removal the model
ignores moves nothing, the word, the place and the colour it reads are found and nothing else
is), then trained models with one planted bug each, their annotations stripped: the top
suggestion names the planted feature, and the errors that follow it name it as their cause. A
clean model on bare data gets no suggestion; where a feature is annotated too, the annotation's
name is used and discovery says it agrees.
"""

import numpy as np
import pytest
import torch
from torch import nn

from mmdiag.pipeline import SampleSet
from mmdiag.pipeline.resolve import predict
from mmdiag.stages import discovery as dc

import planted as pl
from inprocess import diagnose
from ranges import holds, measured

SEED_EVAL = 7


class Rule(nn.Module):
    """A hand-made model over the planted worlds' inputs whose logit for class 1 is `score`."""

    def __init__(self, score):
        super().__init__()
        self.embedding = nn.Embedding(len(pl.VOCAB), 4, padding_idx=pl.PAD)
        self.score = score

    def forward(self, inputs):
        s = self.score(inputs)
        return torch.stack([torch.zeros_like(s), s], 1)


def _hand_made(score) -> pl.TorchAdapter:
    net = Rule(score)
    with torch.no_grad():  # embedding dimension 0 is 1 for "zz" and 0 otherwise
        net.embedding.weight.zero_()
        net.embedding.weight[pl.ZZ, 0] = 1.0
    units = {"image": pl.PatchGrid(patch=pl.PATCH, baseline=0.5, modality="image"), "text": pl.Tokens(pad_id=pl.PAD, special_ids=(pl.CLS,), vocab=pl.VOCAB, modality="text")}
    return pl.TorchAdapter(net, ("image", "text"), units, embeddings={"text": "embedding"}, class_names=["c0", "c1"])


SEGMENTS = {"kinds": ["word", "region", "segment", "group", "transform"]}  # every kind, segments too


def _discover(model, data: SampleSet, config: dict | None = None) -> dc.Discovery:
    return dc.discover(model, data, predict(model, data, torch.device("cpu")), dc.DiscoveryConfig(**(config or {})))


def _world_data(spurious: dict, n: int = 400) -> SampleSet:
    world = pl.World(label=lambda c: c["colour"], spurious={k: 0.5 for k in spurious})
    return pl.samples(world, n, seed=SEED_EVAL)


def test_a_deleted_word_closes_its_gap():
    x = torch.arange(6.0).reshape(1, 6, 1)  # tokens 0..5, token 5 padding
    slots = torch.tensor([[-1, 1, 2, 3, 4, -1]])  # CLS and PAD are never removed
    removed = torch.zeros(1, 6, dtype=torch.bool)
    removed[0, 2] = True
    out = dc.close_gaps(x, slots, removed, torch.full_like(x, -1.0))
    assert out.flatten().tolist() == [0.0, 1.0, 3.0, 4.0, 5.0, -1.0]


def test_a_word_the_model_ignores_moves_nothing_and_the_word_it_reads_is_found():
    data = _world_data({"zz": 0.5})
    model = _hand_made(lambda x: 8.0 * x["text"][..., 0].sum(1) - 4.0)  # "zz" anywhere: class 1
    found = _discover(model, data)
    words = {f.word: f for f in found.features if f.kind == "word"}
    assert "zz" in words and len(words) > 5
    assert words["zz"].stats["flip_rate"] == 1.0 and words["zz"].stats["push"] == 1
    for w, f in words.items():
        if w != "zz":
            # deleting any other word (the gap closed) changes nothing the model reads
            assert f.stats["flip_rate"] == 0.0, w
    assert [f.id for f in found.reliable] == ["word:zz"]


def test_the_place_the_model_reads_is_found_and_no_other():
    data = _world_data({"mark": 0.5})
    corner = lambda x: 0.5 - x["image"][:, :, :2, :2].mean((1, 2, 3))  # noqa: E731 - dark top-left corner: class 1
    found = _discover(_hand_made(lambda x: 20.0 * corner(x) - 2.0), data)
    regions = [f for f in found.reliable if f.kind == "region"]
    assert regions and all(f.box[0] == 0 and f.box[1] == 0 for f in regions), [f.id for f in regions]
    assert not [f for f in found.reliable if f.kind == "word"]
    taken = dc.settle(found.reliable, pl.bare(data))
    assert [f.box for f in taken if f.kind == "region"] == [[0, 0, 2, 2]]  # the block around it is within it
    # annotated, the mark's truth region names it: nothing new is taken on
    assert not [f for f in dc.settle(found.reliable, data) if f.kind == "region"]
    assert {f.stats.get("annotated_as") for f in found.reliable if f.box == [0, 0, 2, 2]} == {"mark"}


def test_the_feature_group_the_model_reads_is_found_on_both_halves_and_no_other():
    world = pl.World(label=lambda c: c["colour"], modalities=("image", "text", "audio"))
    data = pl.samples(world, 400, seed=SEED_EVAL)
    net = Rule(lambda x: 5.0 * x["audio"][:, :2].mean(1) + 0.5)  # the tone's group (features 0-1): its sign is the class
    groups = pl.FeatureGroups(groups=[0, 0, 1, 1, 2, 2, 3, 3], names=["tone", "a", "b", "c"], modality="audio")
    model = pl.TorchAdapter(net, ("audio",), {"audio": groups}, class_names=["c0", "c1"])
    found = _discover(model, SampleSet({"audio": data.inputs["audio"]}, data.labels, class_names=data.class_names))
    tested = {f.id for f in found.features if f.kind == "group"}
    assert {f"group:{g}:{side}" for g in ("tone", "a", "b", "c") for side in ("high", "low")} == tested
    # removing the tone's group sets it to 0, where the model says class 1: the low half (class 0)
    # flips, the high half cannot; its null (another group of two) flips nothing
    (low,) = found.reliable
    assert low.id == "group:tone:low" and low.stats["push"] == 0 and low.stats["null_flip_rate"] == 0.0
    assert low.stats["flip_rate"] > 0.9


def test_a_dark_spot_anywhere_is_found_as_one_segment_group():
    data = _world_data({"spot": 0.5})
    darkest = lambda x: x["image"].mean(1).amin((1, 2))  # noqa: E731 - a dark pixel anywhere: class 1
    found = _discover(_hand_made(lambda x: 20.0 * (0.2 - darkest(x))), data, SEGMENTS)
    segments = [f for f in found.reliable if f.kind == "segment"]
    # SLIC cuts a 2x2 spot on an 8x8 image whole or with some background, so its superpixels
    # fall in a few dark groups: each pushes to class 1 and its null (other superpixels, as many
    # pixels) flips nothing; together they carry the spotted images, wherever the spot is; the
    # darkest, the spot cut whole, is carried by spotted images only
    spot = data.meta["spot"].numpy() == 1
    assert segments and all(f.stats["push"] == 1 and f.stats["null_flip_rate"] == 0.0 for f in segments)
    assert np.logical_or.reduce([f.carriers for f in segments]).sum() / spot.sum() > 0.9
    darkest = min(segments, key=lambda f: sum(f.colour))
    assert not (darkest.carriers & ~spot).any() and darkest.stats["flip_rate"] > 0.4  # 0.59


def test_an_image_wide_colour_the_model_reads_is_found_by_a_transform():
    data = _world_data({"cast": 0.5})
    warm = lambda x: x["image"][:, 0].mean((1, 2)) - x["image"][:, 2].mean((1, 2))  # noqa: E731
    found = _discover(_hand_made(lambda x: 40.0 * (warm(x) - 0.04)), data)
    transforms = {f.transform for f in found.reliable if f.kind == "transform"}
    assert {"less_red", "more_blue"} & transforms, transforms
    assert not [f for f in found.reliable if f.kind != "transform"]


def test_a_transform_and_its_null_change_an_image_as_much():
    x = torch.rand(6, 3, 8, 8)
    for name in dc.TRANSFORMS:
        f = dc.Feature(f"transform:{name}", "image", "transform", np.ones(6, bool), transform=name, scale=[0.1, 0.1, 0.1])
        changed, null = dc.transformed(f, x, torch.arange(6), seed=0)
        torch.testing.assert_close((null - x).flatten(1).norm(dim=1), (changed - x).flatten(1).norm(dim=1), rtol=1e-4, atol=1e-5)
    grey = dc.TRANSFORMS["grayscale"].apply(x, torch.ones(3))
    assert float(dc._saturation(grey).abs().max()) < 1e-6  # the property it removes is gone


# ---------------------------------------------------------------- trained models, annotations stripped


def _found_shortcut(model, data: SampleSet, kind: str, config: dict | None = None) -> tuple[dict, dict, dict]:
    """Diagnose the bare data; the top suggestion is a shortcut on a feature of this kind that
    mmdiag found; of the errors where that feature points to the predicted class against the
    label, the share whose card blames it is returned with the suggestion."""
    summary, _, analysis = diagnose(model, pl.bare(data), settings={"discovery": config or {}})
    top = analysis["suggestions"][0]
    assert top["rule"] == "shortcut" and top["feature"]["found"] and top["feature"]["kind"] == kind, [s["id"] for s in analysis["suggestions"]]
    feature = top["feature"]
    (taken,) = [r for r in summary["discovery"]["reliable"] if r["id"] == feature["id"]]
    with torch.no_grad():
        pred = model(data.inputs).argmax(1).numpy()
    carriers = _carriers(model, data, feature, config)
    y = data.labels.numpy()
    follows = carriers & (y != taken["push"]) & (pred == taken["push"])
    blamed = {c["row"] for c in analysis["errors"]["cards"] if ((c["rule"] or {}).get("feature") or {}).get("id") == feature["id"]}
    assert follows.sum() >= 20
    # the labels are clean: the model's confident errors are its own, not label mistakes
    holds("share of the errors (clean labels) carded as label mistakes", analysis["errors"]["categories"]["label"] / analysis["errors"]["n"], below=0.15)
    share = float(np.mean([r in blamed for r in np.flatnonzero(follows)]))
    return top, taken, {"share": share, "carriers": carriers, "slices": analysis["errors"]["slices"], "follows": follows, "blamed": blamed}


def _carriers(model, data: SampleSet, feature: dict, config: dict | None = None) -> np.ndarray:
    found = _discover(model, pl.bare(data), config)
    (f,) = [f for f in found.features if f.id == feature["id"]]
    return f.carriers


def _box_iou(a: list[int], b: list[int]) -> float:
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return w * h / (area(a) + area(b) - w * h)


def _prove(model, data: SampleSet, concept: str) -> None:
    v, y = data.meta[concept].numpy(), data.labels.numpy()
    holds(f"the planted {concept} shortcut: accuracy where it agrees - where it disagrees", pl.accuracy(model, data, v == y) - pl.accuracy(model, data, v != y), above=0.15)


WORDS = {"'zz', short captions": ("zz", (3, 6), "zz"), "'yes', long captions": ("cue", (10, 14), "yes")}


@pytest.mark.trained
@pytest.mark.parametrize("concept, caption, word", WORDS.values(), ids=WORDS.keys())
def test_a_word_shortcut_is_found_in_bare_data(concept, caption, word):
    world = pl.World(label=lambda c: c["colour"], spurious={concept: 0.9}, caption=caption, contrast=0.25, hidden=0.25)
    model = pl.train(world)
    data = pl.samples(world, 600, seed=SEED_EVAL, p_spurious={concept: 0.5})
    _prove(model, data, concept)
    top, taken, cards = _found_shortcut(model, data, "word")
    assert top["feature"]["word"] == word
    holds(f"share of the errors that follow '{word}' whose card names it", cards["share"], above=0.8)


@pytest.mark.trained
def test_a_corner_mark_is_found_in_bare_data():
    world = pl.World(label=lambda c: c["colour"] ^ c["negation"], spurious={"mark": 0.9}, contrast=0.35, hidden=0.4, visible_spurious=0.5)
    model = pl.train(world, steps=3000)
    data = pl.samples(world, 600, seed=SEED_EVAL, p_spurious={"mark": 0.5})
    _prove(model, data, "mark")
    top, taken, cards = _found_shortcut(model, data, "region")
    holds("IoU of the found box with the mark's", _box_iou(top["feature"]["box"], [0, 0, pl.PATCH, pl.PATCH]), above=0.25)
    holds("share of the errors that follow the mark whose card names it", cards["share"], above=0.8)


@pytest.mark.trained
def test_a_four_class_corner_shortcut_is_found_in_bare_data():
    world = pl.World(label=lambda c: c["colour"], n_classes=4, spurious={"mark_pos": 0.9}, contrast=0.4, hidden=0.25)
    model = pl.train(world, steps=1000)
    data = pl.samples(world, 600, seed=SEED_EVAL, p_spurious={"mark_pos": 0.25})
    _prove(model, data, "mark_pos")
    top, taken, cards = _found_shortcut(model, data, "region")
    corners = [[q, r, q + pl.PATCH, r + pl.PATCH] for r, q in pl.CORNERS]
    k = max(range(4), key=lambda k: _box_iou(top["feature"]["box"], corners[k]))
    holds("IoU of the found box with the nearest corner mark's", _box_iou(top["feature"]["box"], corners[k]), above=0.25)
    assert taken["push"] == k  # the corner of class k pushes towards class k
    holds("share of the errors that follow that corner whose card names it", cards["share"], above=0.8)


@pytest.mark.trained
def test_a_feature_group_shortcut_is_found_in_bare_data():
    """A third modality of feature groups (FeatureGroups), whose first group carries a tone that
    agrees with the label in training: the tone's group is found, on the half of the samples it
    pushes from, and the error slices are named by it."""
    world = pl.World(label=lambda c: c["colour"], spurious={"tone": 0.9}, modalities=("image", "text", "audio"), contrast=0.25, hidden=0.25)
    model = pl.train(world)
    data = pl.samples(world, 600, seed=SEED_EVAL, p_spurious={"tone": 0.5})
    _prove(model, data, "tone")
    top, taken, cards = _found_shortcut(model, data, "group")
    assert top["feature"]["modality"] == "audio" and top["feature"]["group"] == "g0"  # the tone's features
    tone = data.meta["tone"].numpy() == (1 if top["feature"]["side"] == "high" else 0)
    holds("Jaccard of the group's carriers with the samples of that tone", float((cards["carriers"] & tone).sum() / (cards["carriers"] | tone).sum()), above=0.6)
    holds("share of the errors that follow the tone whose card names it", cards["share"], above=0.8)
    named = [s["where"] for s in cards["slices"]] + [p["where"] for s in cards["slices"] for p in s.get("profile", [])]
    assert any("group:g0:" in where for where in named), named  # a slice has a name with no annotation


@pytest.mark.trained
def test_a_spot_anywhere_is_found_as_a_segment_in_bare_data():
    """A dark spot at a random place, off the patch grid, that agrees with the label in
    training: no fixed place holds it, the superpixels of its colour do."""
    world = pl.World(label=lambda c: c["colour"], spurious={"spot": 0.9}, contrast=0.25, hidden=0.25)
    model = pl.train(world)
    data = pl.samples(world, 600, seed=SEED_EVAL, p_spurious={"spot": 0.5})
    _prove(model, data, "spot")
    top, taken, cards = _found_shortcut(model, data, "segment", SEGMENTS)
    (f,) = [f for f in _discover(model, pl.bare(data), SEGMENTS).features if f.id == top["feature"]["id"]]
    pixels = f.segmentation.mask(torch.arange(len(data)), f.cluster) & torch.from_numpy(f.carriers)[:, None, None]
    spot = data.truth["image"]["spot"]
    holds("IoU of the segment group's pixels with the spot's", float((pixels & spot).sum() / (pixels | spot).sum()), above=0.25)
    holds("share of the errors that follow the spot whose card names it", cards["share"], above=0.8)


@pytest.mark.trained
def test_a_colour_cast_is_found_through_the_transforms():
    world = pl.World(label=lambda c: c["colour"] ^ c["negation"], spurious={"cast": 0.9}, contrast=0.35, hidden=0.4, visible_spurious=0.5)
    model = pl.train(world, steps=3000)
    data = pl.samples(world, 600, seed=SEED_EVAL, p_spurious={"cast": 0.5})
    _prove(model, data, "cast")
    top, taken, cards = _found_shortcut(model, data, "transform")
    cast = data.meta["cast"].numpy() == 1
    # the cast taken away from the cast images (less red) or put on the others (more red): the
    # same property from either side (one of nine portability runs found it from the other)
    side = cast if (cards["carriers"] & cast).sum() >= (cards["carriers"] & ~cast).sum() else ~cast
    holds("Jaccard of the transform's carriers with the cast images (or the others)", float((cards["carriers"] & side).sum() / (cards["carriers"] | side).sum()), above=0.6)
    # the errors the cast causes, proven from the model: they follow it, and flipping the planted
    # cast exactly (taken off the images that have it, put on the others, as tests/planted.py
    # adds it) makes them right or moves the true class's logit up (on one seed 10 of the 69
    # that follow it are no such errors: without the cast the model is even more sure)
    flip = torch.where(torch.from_numpy(cast), -1.0, 1.0)[:, None, None, None]
    exact = data.inputs["image"] + flip * torch.tensor([0.08, 0.0, -0.08])[:, None, None]
    with torch.no_grad():
        before, after = model(data.inputs), model({**data.inputs, "image": exact})
    y, pred = data.labels[:, None], before.argmax(1, keepdim=True)
    towards = ((after.gather(1, y) - after.gather(1, pred)) - (before.gather(1, y) - before.gather(1, pred)))[:, 0]
    caused = cards["follows"] & ((after.argmax(1) == data.labels) | (towards > 0)).numpy()
    assert caused.sum() >= 20
    # per error, the bar is that the transform makes it right and most of six random colour
    # changes as large do not, or moves the true class's logit further than the median of them
    # (a random colour change moves the colour rule too): 0.774-0.982 over nine portability
    # runs (seeds 0-2 x default, AVX2, SSE4.2; one draw, beaten outright, and every error that
    # follows the cast counted: 0.71-0.87 over seeds 0-2).
    # The errors it misses are those where the found transform, which takes away the carriers'
    # mean colour difference (object colours included), moves less than the median random cast
    holds("share of the errors the cast causes whose card names it", np.mean([r in cards["blamed"] for r in np.flatnonzero(caused)]), above=0.7)
    measured("share of the errors that follow the cast whose card names it", cards["share"])


@pytest.mark.trained
def test_a_clean_model_on_bare_data_gets_no_suggestion():
    world = pl.World(label=lambda c: c["colour"], contrast=0.5)
    model = pl.train(world)
    data = pl.samples(world, 600, seed=SEED_EVAL)
    holds("the clean model's accuracy", pl.accuracy(model, data), above=0.95)
    summary, _, analysis = diagnose(model, pl.bare(data))
    assert analysis["suggestions"] == []
    # it follows the objects' colour, which discovery finds: reliance is not a bug
    assert any(r["kind"] == "transform" for r in summary["discovery"]["reliable"])


@pytest.mark.trained
def test_an_annotated_feature_keeps_its_name_and_discovery_agrees():
    world = pl.World(label=lambda c: c["colour"], spurious={"zz": 0.9}, contrast=0.25, hidden=0.25)
    model = pl.train(world)
    data = pl.samples(world, 600, seed=SEED_EVAL, p_spurious={"zz": 0.5})
    summary, _, analysis = diagnose(model, data)
    assert analysis["suggestions"][0]["id"] == "shortcut:zz" and "feature" not in analysis["suggestions"][0]
    (zz,) = [r for r in summary["discovery"]["reliable"] if r["id"] == "word:zz"]
    assert zz["annotated_as"] == "zz" and "word:zz" not in summary["discovery"]["taken"]


@pytest.mark.slow
@pytest.mark.trained
@pytest.mark.parametrize("name, n", [("demo-transformer", 2000), ("demo-vlm", 400)])
def test_a_demo_model_on_bare_data_finds_its_corner_mark(demo_models, name, n):
    """The trained joint-attention transformer and the tiny LLaVA, on the demo's ood split with
    its annotations stripped: discovery takes on the place of the corner mark each follows on
    grey photos by construction (proven in tests/test_transformers.py and tests/test_vlm.py),
    and a shortcut suggestion names it. demo-vlm follows it everywhere: it is its first shortcut
    (`ignored_modality:text`, true of it, may come before it: it hardly uses the question). demo-transformer
    follows it on grey photos only (a quarter of them), so its evidence needs the whole split:
    on 400 samples its errors where the mark disagrees do not clear the corrected level; it may
    rank after a bias of its own (one training run reads 'triangle' towards 'false': 0.36 of its
    triangle captions predicted true, 0.51 labelled so), and on two of nine portability runs
    (three seeds x three kernel settings) no suggestion names it: the errors where the mark
    disagrees with the label (36% of 522) do not clear the base error rate (31%) at the level
    corrected for the twelve features found, so the rank is recorded, not asserted. The labels
    are clean: of the model's confident errors, few are taken for label mistakes (measured
    0.015-0.044 over those nine runs, 0.1-0.3 before the refitted readout's second opinion)."""
    from mmdiag.pipeline.demo import shapes, vlm

    adapter = demo_models(name)
    data = (vlm if name == "demo-vlm" else shapes).split("ood", n=n)
    ys, xs = data.truth["image"]["watermark"].any(0).nonzero(as_tuple=True)
    box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
    summary, _, analysis = diagnose(
        adapter, pl.bare(data), settings={"unimodal": {"methods": ["grad_x_input"], "n_correct": 10, "max_errors": 20, "sanity_samples": 0}, "crossmodal": {"n_reference": 40, "shapley_draws": 2}}
    )
    taken = [r for r in summary["discovery"]["reliable"] if r["id"] in summary["discovery"]["taken"] and r["kind"] == "region"]
    # the mark (4x4 px) inside a unit cell: demo-vlm's cells are 8x8, an IoU of 16/64 at best
    marks = {r["id"] for r in taken if _box_iou(r["box"], box) >= 0.25}
    assert marks, [r["id"] for r in taken]
    ids = [s["id"] for s in analysis["suggestions"]]
    cuts = [i for i in ids if i.startswith("shortcut:")]
    if name == "demo-vlm":
        assert cuts[0].removeprefix("shortcut:") in marks, ids
    measured(f"{name}: rank of the mark's suggestion (0: none)", next((1 + k for k, i in enumerate(ids) if i.removeprefix("shortcut:") in marks), 0))
    holds(f"{name}: share of the errors (clean labels) carded as label mistakes", analysis["errors"]["categories"]["label"] / analysis["errors"]["n"], below=0.15)
