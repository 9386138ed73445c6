"""Stage 1's Captum methods and the KernelSHAP estimator, each against an independent truth:
a linear model's exact scores, conservation on layers the rules support, a planted Grad-CAM
channel, exact Shapley values by enumeration; and the refusals where a method cannot hold."""

import pytest
import torch
from torch import nn

from mmdiag.pipeline.adapter import TorchAdapter
from mmdiag.pipeline.errors import MmdiagError
from mmdiag.pipeline.units import FeatureGroups, PatchGrid, Tokens
from mmdiag.stages import attribution as attr
from mmdiag.stages import captum_methods as cm
from mmdiag.stages.methods import attribute
from mmdiag.stages.unimodal import UnimodalConfig

from ranges import holds

UNITS = {"image": PatchGrid(patch=4, baseline=0.5), "audio": FeatureGroups(groups=[0, 0, 1, 1, 2, 2, 3, 3], baseline=0.1, modality="audio")}


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3 * 8 * 8 + 8, 3)

    def forward(self, x):
        return self.head(torch.cat([x["image"].flatten(1), x["audio"]], 1))


class ReluNet(nn.Module):
    """Linear layers without biases and module ReLUs: what DeepLIFT's and LRP's rules cover."""

    def __init__(self):
        super().__init__()
        self.lin1, self.relu, self.lin2 = nn.Linear(3 * 8 * 8 + 8, 16, bias=False), nn.ReLU(), nn.Linear(16, 3, bias=False)

    def forward(self, x):
        return self.lin2(self.relu(self.lin1(torch.cat([x["image"].flatten(1), x["audio"]], 1))))


class FunctionalRelu(ReluNet):
    def forward(self, x):
        return self.lin2(torch.relu(self.lin1(torch.cat([x["image"].flatten(1), x["audio"]], 1))))


class WithNorm(ReluNet):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.lin2(self.relu(self.norm(self.lin1(torch.cat([x["image"].flatten(1), x["audio"]], 1)))))


def _game(net, n=6, seed=0):
    """A game on 6 random inputs of the model class `net`, its weights seeded: equal calls give
    equal games."""
    torch.manual_seed(seed)
    module = net()
    adapter = TorchAdapter(module.eval(), ("image", "audio"), UNITS, layers={}, class_names=["a", "b", "c"])
    g = torch.Generator().manual_seed(seed)
    inputs = {"image": torch.rand(n, 3, 8, 8, generator=g), "audio": torch.randn(n, 8, generator=g)}
    encoded = adapter.encode(inputs)
    with torch.no_grad():
        target = adapter.forward(encoded).argmax(1)
    return attr.Game(adapter, encoded, adapter.units(inputs, encoded), target, 64)


def _linear_truth(game):
    w = game.adapter.module.head.weight[game.target].detach()  # (B, 200)
    x = torch.cat([game.encoded[m].flatten(1) for m in game.modalities], 1)
    base = game.removed()
    b = torch.cat([base[m].flatten(1) for m in game.modalities], 1)
    contribution = w * (x - b)
    image, audio = contribution[:, :192].reshape(-1, 3, 8, 8), contribution[:, 192:]
    return torch.cat([game.units["image"].pool(image), game.units["audio"].pool(audio)], 1)


@pytest.mark.parametrize("method", ["lime", "kernel_shap", "shapley", "shapley_kernel"])
def test_surrogates_and_shapley_recover_a_linear_models_coefficients_times_the_input_change(method):
    game = _game(Linear)
    scores, _ = attribute(method, game, UnimodalConfig(shapley_pairs=3), None, torch.Generator().manual_seed(0))
    assert torch.allclose(scores, _linear_truth(game), atol=1e-4), (scores - _linear_truth(game)).abs().max()


def test_deeplift_and_deeplift_shap_conserve_and_lrp_sums_to_the_output_on_supported_layers():
    game = _game(ReluNet)
    scores, delta = cm.deeplift(game)
    gap = cm._ends_gap(game, game.removed())
    assert torch.allclose(scores.sum(1), gap, atol=1e-4) and delta.abs().max() < 1e-4
    refs_game = _game(ReluNet)
    shap = cm.deeplift_shap(refs_game, 4, torch.Generator().manual_seed(0))  # raises if it did not conserve
    assert torch.isfinite(shap).all() and shap.abs().sum() > 0
    relevance = cm.lrp(_game(ReluNet))
    out = game.target_logit({m: t.detach() for m, t in game.encoded.items()}).detach()
    assert torch.allclose(relevance.sum(1), out, rtol=1e-3, atol=1e-4)  # bias-free: all of f(x) reaches the inputs
    assert not any(hasattr(m, "rule") for m in game.adapter.module.modules())  # Captum's rules are removed again


def test_deeplift_is_refused_where_it_does_not_conserve_and_lrp_where_a_layer_has_no_rule():
    with pytest.raises(MmdiagError, match=r"stages.unimodal.methods: deeplift does not hold on this model .* remove deeplift"):
        cm.deeplift(_game(FunctionalRelu))
    game = _game(WithNorm)
    with pytest.raises(MmdiagError, match=r"lrp has no rule for the model's layer 'norm' \(LayerNorm\)"):
        cm.lrp(game)
    assert not any(hasattr(m, "rule") for m in game.adapter.module.modules())


class PlantedCam(nn.Module):
    """Channel 0 of `features` reads the red channel, channel 1 the green one; the logit reads
    channel 0 alone. Grad-CAM must light up where red is."""

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            self.features.weight.zero_()
            self.features.weight[0, 0] = 1.0
            self.features.weight[1, 1] = 1.0
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))

    def forward(self, x):
        return self.head(self.features(x["image"]).mean((2, 3))) + 0 * x["audio"].sum(1, keepdim=True)


def test_grad_cam_finds_the_planted_channels_region():
    module = PlantedCam().eval()
    adapter = TorchAdapter(module, ("image", "audio"), UNITS, layers={"features": "features"})
    image = torch.zeros(4, 3, 8, 8)
    image[:, 1] = 1.0  # green everywhere: channel 1, which the logit ignores
    spots = [(0, 0), (0, 4), (4, 0), (4, 4)]
    for i, (r, c) in enumerate(spots):
        image[i, 0, r : r + 4, c : c + 4] = 1.0  # red in one 4x4 patch
    inputs = {"image": image, "audio": torch.zeros(4, 8)}
    encoded = adapter.encode(inputs)
    game = attr.Game(adapter, encoded, adapter.units(inputs, encoded), torch.zeros(4, dtype=torch.long), 64)
    scores, _ = attribute("grad_cam", game, UnimodalConfig(), None, None)
    assert scores[:, :4].argmax(1).tolist() == [0, 1, 2, 3]  # the patch with the red
    assert (scores[:, 4:] == 0).all()  # Grad-CAM scores the image only


def test_smoothgrad_with_no_noise_is_gradient_times_input_change():
    game = _game(ReluNet)
    smooth = cm.smoothgrad(game, samples=4, noise=1e-9)
    assert torch.allclose(smooth, attr.grad_x_input(_game(ReluNet)), atol=1e-5)
    assert game.passes == 4 * 6 and game.backward == 4 * 6


def _exact(game):
    return attr.by_present(game, lambda sub, c: attr.shapley_from_values(c.value(attr.coalitions(c.n).expand(c.index.shape[0], -1, -1)), c.n))


@pytest.mark.trained
def test_the_kernel_estimator_beats_permutations_at_equal_evaluations_on_the_demo(demo_models):
    from mmdiag.pipeline.demo.models import demo_adapter
    from mmdiag.pipeline.demo.shapes import split

    adapter = demo_adapter(demo_models("demo-film").module, patch=16)  # 4 image units + the words: exact values are cheap
    data = split("ood", n=16, seed=3)
    encoded = adapter.encode(data.inputs)
    with torch.no_grad():
        target = adapter.forward(encoded).argmax(1)
    units = adapter.units(data.inputs, encoded)
    exact = _exact(attr.Game(adapter, encoded, units, target, 512))
    errors = {"shapley": [], "shapley_kernel": []}
    for seed in range(3):
        for name, estimate in (("shapley", attr.shapley_sampling), ("shapley_kernel", attr.kernel_shapley)):
            game = attr.Game(adapter, encoded, units, target, 512)
            phi = estimate(game, 10, torch.Generator().manual_seed(seed))
            assert torch.allclose(phi.sum(1), exact.sum(1), atol=1e-4)  # additivity, exactly
            errors[name].append(((phi - exact).norm(dim=1) / exact.norm(dim=1)).mean())
            passes = game.passes
        n = game.present.sum(1)
        assert passes == int((2 * 10 * (n - 1) + 2).sum())  # the same budget, absent slots skipped
    perm, kernel = (torch.stack(errors[k]).mean() for k in ("shapley", "shapley_kernel"))
    holds("error of the kernel estimator / of permutations", kernel / perm, below=0.85)


def test_the_kernel_estimator_is_exact_when_its_budget_covers_every_coalition():
    game = _game(ReluNet)  # 8 players: 254 coalitions besides the ends
    exact = _exact(_game(ReluNet))
    assert torch.allclose(attr.kernel_shapley(game, 20, torch.Generator().manual_seed(0)), exact, atol=1e-4)


def test_samplers_skip_absent_unit_slots():
    game = _game(ReluNet, n=4)
    game.units["audio"].mask = game.units["audio"].mask.clone()
    game.units["audio"].mask[1:, 6:] = -1  # samples 1-3 lack audio group 3
    for estimate in (attr.shapley_sampling, attr.kernel_shapley):
        g = attr.Game(game.adapter, game.encoded, game.units, game.target, 64)
        phi = estimate(g, 2, torch.Generator().manual_seed(0))
        assert (phi[1:, -1] == 0).all() and phi[0, -1] != 0
        assert g.passes == (2 * 2 * 7 + 2) + 3 * (2 * 2 * 6 + 2)


class SumText(nn.Module):
    """Words summed (the pad embeds to 0), so padding leaves the output unchanged."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(10, 6, padding_idx=0)
        self.head = nn.Linear(6 + 192, 2)

    def forward(self, x):
        text = x["text"] if x["text"].is_floating_point() else self.embedding(x["text"])
        return self.head(torch.cat([text.sum(1), x["image"].flatten(1)], 1))


def test_bottleneck_capacity_does_not_change_when_captions_are_padded():
    """IBA's and M2IB's shared bottleneck: the mean capacity is over the units' elements."""
    torch.manual_seed(0)
    module = SumText().eval()
    units = {"image": PatchGrid(patch=4, baseline=0.5), "text": Tokens(pad_id=0, special_ids=(1,))}
    adapter = TorchAdapter(module, ("image", "text"), units, embeddings={"text": "embedding"})
    ids = torch.tensor([[1, 4, 5, 6, 0], [1, 7, 8, 0, 0], [1, 2, 3, 9, 4]])
    image = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    found = []
    for pad in (0, 16):
        inputs = {"image": image, "text": torch.cat([ids, torch.zeros(3, pad, dtype=torch.long)], 1)}
        encoded = {m: t.detach() for m, t in adapter.encode(inputs).items()}
        game = attr.Game(adapter, encoded, adapter.units(inputs, encoded), torch.zeros(3, dtype=torch.long), 64)
        stats = attr.BottleneckStats.of(encoded)
        scores = attr.iba(game, "text", stats, attr.IBAConfig(steps=5), torch.Generator().manual_seed(0))
        found.append(scores[:, :5])
        assert torch.equal(scores[:, 5:], torch.zeros_like(scores[:, 5:]))
    assert torch.allclose(found[0], found[1], atol=1e-5), (found[0] - found[1]).abs().max()
