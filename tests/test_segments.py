"""Image segments as units (pipeline.units.Segments): SLIC superpixels of each image, removed
and scored like any units, with Shapley values checked against exact enumeration and against
Captum's ShapleyValueSampling on the same masks; `with_units` and `model.segments`."""

import pytest
import torch
from torch import nn

from mmdiag.pipeline.adapter import TorchAdapter, with_units
from mmdiag.pipeline.demo import shapes
from mmdiag.pipeline.errors import MmdiagError
from mmdiag.pipeline.units import PatchGrid, Segments
from mmdiag.stages import attribution as attr


def images(n=4):
    return shapes.split("ood", n=n).inputs["image"]


def test_segments_cover_each_image_and_follow_its_shapes():
    data = shapes.split("ood", n=16)
    x = data.inputs["image"]
    units = Segments(16).build(x, x)
    assert units.n == 32 and units.mask.shape == (16, 1, 32, 32) and (units.mask >= 0).all() and (units.mask < 32).all()
    assert ((units.present.sum(1) >= 4) & (units.present.sum(1) <= 32)).all()
    # a shape is covered by whole segments: those mostly inside it cover it with an IoU near 1
    # (0.996 on average over 64 images; a grey photo's shape is fainter)
    named = data.truth["image"]["named_shape"]
    ious = []
    for i in range(16):
        mask = units.mask[i, 0]
        inside = torch.zeros_like(named[i])
        for k in mask.unique():
            seg = mask == k
            if (seg & named[i]).sum() > seg.sum() / 2:
                inside |= seg
        ious.append(float((inside & named[i]).sum() / (inside | named[i]).sum()))
    assert sum(ious) / len(ious) > 0.95 and min(ious) > 0.6, ious
    # each unit's label gives its box in the input's pixels, end exclusive
    k = int(units.mask[0, 0, 0, 0])
    ys, xs = (units.mask[0, 0] == k).nonzero(as_tuple=True)
    assert units.labels[0][k] == f"s{k} [{int(xs.min())}, {int(ys.min())}, {int(xs.max()) + 1}, {int(ys.max()) + 1}]"


def test_an_image_cut_into_more_segments_than_slots_shares_the_last_among_its_smallest():
    x = images(2)
    full = Segments(16, slots=64).build(x, x).mask
    capped = Segments(16, slots=3).build(x, x).mask
    assert capped.max() == 2
    for i in range(2):
        sizes = torch.bincount(full[i].flatten())
        largest = sizes.argsort(descending=True, stable=True)[:2]
        for rank, k in enumerate(largest.tolist()):  # the two largest keep a slot of their own
            assert torch.equal(capped[i] == rank, full[i] == k)


def test_removing_a_segment_sets_exactly_its_pixels_to_the_baseline():
    x = images(2)
    units = Segments(8, baseline=[0.1, 0.2, 0.3]).build(x, x)
    keep = units.present.clone()
    k = int(units.mask[0, 0, 5, 5])
    keep[0, k] = False
    out = units.apply(x, keep)
    gone = units.mask[0, 0] == k
    assert torch.equal(out[0][:, gone], torch.tensor([0.1, 0.2, 0.3])[:, None].expand(3, int(gone.sum())))
    assert torch.equal(out[0][:, ~gone], x[0][:, ~gone]) and torch.equal(out[1], x[1])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 5, stride=2), nn.Tanh(), nn.Conv2d(8, 8, 5, stride=2), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))

    def forward(self, inputs):
        return self.body(inputs["image"])


def test_shapley_over_segments_equals_enumeration_and_captums_on_the_same_masks():
    """7-8 segments an image: our antithetic sampler at 400 permutations is within 0.03% of the
    largest exact value, Captum's ShapleyValueSampling at 400 within 0.2% (measured)."""
    from captum.attr import ShapleyValueSampling

    x = images(2)
    net = Net()
    net({"image": x})  # sizes the lazy layer
    model = with_units(TorchAdapter(net, ("image",), units={"image": PatchGrid(8)}), images=Segments(10, slots=20))
    encoded = model.encode({"image": x})
    units = model.units({"image": x}, encoded)
    assert units["image"].labels[0][0].startswith("s0 [")  # the segments, not the grid
    target = model.forward(encoded).argmax(1)
    game = attr.Game(model, encoded, units, target)
    present = game.present
    exact = torch.zeros(len(x), units["image"].n)
    for i in range(len(x)):  # exact Shapley by enumerating the present segments' coalitions
        at = present[i].nonzero().flatten()

        def value(keep, i=i, at=at):
            full = torch.zeros(keep.shape[0], keep.shape[1], units["image"].n, dtype=torch.bool)
            full[..., at] = keep
            return attr.Game(model, {"image": encoded["image"][i : i + 1]}, {"image": units["image"].take(slice(i, i + 1))}, target[i : i + 1]).value(full)

        exact[i, at] = attr.exact_shapley(value, len(at), 1)[0]
    ours = attr.shapley_sampling(game, pairs=200, generator=torch.Generator().manual_seed(0))
    scale = exact.abs().max()
    assert (ours - exact).abs().max() < 0.05 * scale
    masks = units["image"].mask.expand(-1, 3, -1, -1)
    theirs = torch.stack(
        [
            ShapleyValueSampling(lambda z: model.forward({"image": z})).attribute(x[i : i + 1], baselines=0.0, target=int(target[i]), feature_mask=masks[i : i + 1].contiguous(), n_samples=400)[0, 0]
            for i in range(len(x))
        ]
    )  # (B, H, W): each pixel holds its segment's value
    per_segment = torch.stack([torch.stack([theirs[i][units["image"].mask[i, 0] == k][0] if present[i, k] else torch.tensor(0.0) for k in range(units["image"].n)]) for i in range(len(x))])
    assert (per_segment - exact).abs().max() < 0.1 * scale
    assert torch.allclose(exact.sum(1), game.value(torch.stack([present, torch.zeros_like(present)], 1)).diff(dim=1)[:, 0].neg(), atol=1e-4)


def test_units_of_a_modality_the_model_lacks_are_one_line():
    model = TorchAdapter(Net(), ("image",), units={"image": PatchGrid(8)})
    with pytest.raises(MmdiagError, match="units: the model has no modality 'text'; it has image"):
        with_units(model, text=Segments(4))


def test_every_stage_runs_on_segments_set_in_the_config():
    from mmdiag.pipeline.config import ModelSpec
    from mmdiag.pipeline.resolve import load_model

    import frozen_run
    from inprocess import diagnose

    model, _ = load_model(ModelSpec(factory="frozen_run:build_model", segments=12))
    data = shapes.split("ood", n=96)
    x = data.inputs
    encoded = model.encode(x)
    assert model.units(x, encoded)["image"].labels[0][0].startswith("s0 [")
    assert frozen_run.build_model().units(x, encoded)["image"].labels[0][0] == "r0c0"  # the factory's own model keeps its grid
    summary, _, analysis = diagnose(model, data)
    assert summary["unimodal"]["n_explained"] > 0 and "image.named_shape" in summary["intervention"]["regions"]
    assert summary["representation"]["probes"] and isinstance(analysis["suggestions"], list)
