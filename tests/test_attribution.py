"""Attribution methods against independent truths, on tiny models with few units."""

import pytest
import torch

from pipeline import FeatureGroups, TorchAdapter
from stages import attribution as attr
from stages.unimodal import localisation, modality_games


class Mixer(torch.nn.Module):
    """Two 'modalities' of 3 features each, combined non-additively."""

    def __init__(self, additive: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(3, 8), torch.nn.Linear(3, 8)
        self.out = torch.nn.Linear(8, 2)
        self.additive = additive

    def forward(self, x):
        if self.additive:
            return self.out(torch.tanh(self.a(x["left"]))) + self.out(torch.tanh(self.b(x["right"])))
        return self.out(torch.tanh(self.a(x["left"]) * self.b(x["right"]) + self.a(x["left"])))


def game_for(model, b=4, baseline=0.0, target=None):
    adapter = TorchAdapter(model.eval(), ("left", "right"), units={"left": FeatureGroups([0, 1, 2], baseline=baseline), "right": FeatureGroups([0, 1, 2], baseline=baseline)})
    g = torch.Generator().manual_seed(1)
    x = {"left": torch.randn(b, 3, generator=g), "right": torch.randn(b, 3, generator=g)}
    encoded = adapter.encode(x)
    target = torch.tensor([0, 1] * (b // 2)) if target is None else target
    return attr.Game(adapter, encoded, adapter.units(x, encoded), target)


def test_exact_shapley_on_known_games():
    both = lambda keep: (keep[..., 0] & keep[..., 1]).float()  # noqa: E731  pays 1 only together
    assert torch.allclose(attr.exact_shapley(both, 2, 3), torch.full((3, 2), 0.5))
    additive = lambda keep: (keep.float() * torch.tensor([1.0, 2.0, -3.0])).sum(-1)  # noqa: E731
    assert torch.allclose(attr.exact_shapley(additive, 3, 1), torch.tensor([[1.0, 2.0, -3.0]]))


def test_shapley_sampling_is_additive_and_matches_enumeration():
    game = game_for(Mixer())
    phi = attr.shapley_sampling(game, pairs=400, generator=torch.Generator().manual_seed(0))
    gap = game.value(torch.stack([torch.zeros(4, 6, dtype=torch.bool), torch.ones(4, 6, dtype=torch.bool)], 1))
    assert torch.allclose(phi.sum(1), gap[:, 1] - gap[:, 0], atol=1e-5)  # additivity, to float precision
    exact = attr.exact_shapley(game.value, 6, 4)
    assert (phi - exact).abs().max() < 0.03 * exact.abs().max()
    few = attr.shapley_sampling(game, pairs=1, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(few.sum(1), gap[:, 1] - gap[:, 0], atol=1e-5)  # exact even with one pair


def test_integrated_gradients_completeness():
    game = game_for(Mixer(), baseline=0.3)
    scores, delta = attr.integrated_gradients(game, steps=256)
    gap = game.value(torch.stack([torch.ones(4, 6, dtype=torch.bool), torch.zeros(4, 6, dtype=torch.bool)], 1))
    f_x_minus_f_b = gap[:, 0] - gap[:, 1]
    assert torch.allclose(scores.sum(1) - f_x_minus_f_b, delta, atol=1e-4)
    assert (delta.abs() / f_x_minus_f_b.abs()).max() < 0.01


def test_occlusion_and_gradient_times_input():
    game = game_for(Mixer(), baseline=0.5)
    full = game.value(torch.ones(4, 1, 6, dtype=torch.bool))[:, 0]
    drop_one = game.value(~torch.eye(6, dtype=torch.bool).expand(4, 6, 6))
    assert torch.allclose(attr.occlusion(game), full[:, None] - drop_one, atol=1e-5)
    linear = torch.nn.Linear(6, 2)
    lin_game = game_for(Mixer(), baseline=0.5)
    lin_game.adapter.module.forward = lambda x: linear(torch.cat([x["left"], x["right"]], 1))
    w = linear.weight[lin_game.target]
    x = torch.cat([lin_game.encoded["left"], lin_game.encoded["right"]], 1)
    assert torch.allclose(attr.grad_x_input(lin_game), w * (x - 0.5), atol=1e-5)  # exact for a linear model


def test_iba_optimises_each_sample_on_its_own():
    """Batched IBA must equal per-sample IBA: sample 0's map cannot depend on its batch mates."""
    def first_map(x_other):
        game = game_for(Mixer(), b=2)
        game.encoded = {m: torch.stack([t[0], x_other[m]]) for m, t in game.encoded.items()}
        stats = attr.BottleneckStats(
            {m: torch.zeros(3) for m in game.encoded}, {m: torch.ones(3) for m in game.encoded}
        )
        out = attr.iba(game, "left", stats, attr.IBAConfig(steps=5, copies=4), torch.Generator().manual_seed(0))
        return out[0]

    a = first_map({"left": torch.tensor([9.0, 9, 9]), "right": torch.tensor([1.0, 1, 1])})
    b = first_map({"left": torch.tensor([-4.0, 0, 2]), "right": torch.tensor([0.0, 3, 1])})
    assert torch.allclose(a, b, atol=1e-6)
    assert (a >= 0).all() and a.shape == (3,)


def test_modality_values_of_an_additive_model():
    game = game_for(Mixer(additive=True))
    phi, interaction = modality_games(game)
    assert interaction.abs().max() < 1e-5
    only_left = game.value(torch.tensor([True] * 3 + [False] * 3).expand(4, 1, 6))[:, 0]
    none = game.value(torch.zeros(4, 1, 6, dtype=torch.bool))[:, 0]
    assert torch.allclose(phi[:, 0], only_left - none, atol=1e-5)  # Shapley = main effect when additive
    phi_x, interaction_x = modality_games(game_for(Mixer()))
    assert interaction_x.abs().mean() > 1e-3


def test_localisation_by_hand():
    scores = torch.tensor([[4.0, -1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [5.0, 5.0, 5.0, 5.0]])
    coverage = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 0]])  # no region in sample 3
    present = torch.ones(3, 4, dtype=torch.bool)
    out = localisation(scores, coverage, present)
    assert out["n"] == 2 and out["mass"] == pytest.approx((0.8 + 0.25) / 2)
    assert out["enrichment"] == pytest.approx(((0.8 + 0.25) / 2) / 0.25, rel=1e-3)
    assert out["top1_rate"] == 0.5  # first sample's top unit is inside; the tie in the second is not
