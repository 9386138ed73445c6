"""Attribution methods against independent truths, on tiny models with few units."""

import pytest
import torch

from mmdiag.pipeline import FeatureGroups, TorchAdapter
from mmdiag.stages import attribution as attr
from mmdiag.stages.unimodal import localisation, modality_games


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


@pytest.mark.parametrize("estimate", [attr.shapley_sampling, attr.kernel_shapley])
def test_several_targets_share_one_set_of_coalitions(estimate):
    """A game of (B, 2) targets gives each target's values as its own game would with the same
    draws, at the evaluation cost of one target."""
    targets = torch.tensor([[0, 1], [1, 1], [0, 0], [1, 0]])
    both = game_for(Mixer(), target=targets)
    phi = estimate(both, 3, torch.Generator().manual_seed(0))
    assert phi.shape == (4, 6, 2)
    for t in range(2):
        alone = game_for(Mixer(), target=targets[:, t])
        assert torch.allclose(phi[..., t], estimate(alone, 3, torch.Generator().manual_seed(0)), atol=1e-5)
        assert both.passes == alone.passes


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
        stats = attr.BottleneckStats({m: torch.zeros(3) for m in game.encoded}, {m: torch.ones(3) for m in game.encoded})
        out = attr.iba(game, "left", stats, attr.IBAConfig(steps=5, copies=4), torch.Generator().manual_seed(0))
        return out[0]

    a = first_map({"left": torch.tensor([9.0, 9, 9]), "right": torch.tensor([1.0, 1, 1])})
    b = first_map({"left": torch.tensor([-4.0, 0, 2]), "right": torch.tensor([0.0, 3, 1])})
    assert torch.allclose(a, b, atol=1e-6)
    assert (a >= 0).all() and a.shape == (3,)


def test_bottleneck_leaves_the_models_gradients_alone():
    game = game_for(Mixer())
    stats = attr.BottleneckStats.of(game.encoded)
    attr.iba(game, "left", stats, attr.IBAConfig(steps=2, copies=2), torch.Generator().manual_seed(0))
    assert all(p.grad is None for p in game.adapter.module.parameters())


def test_modality_values_of_an_additive_model():
    game = game_for(Mixer(additive=True))
    phi, interaction, pairs = modality_games(game)
    assert interaction.abs().max() < 1e-5
    assert torch.allclose(pairs[:, 0], interaction, atol=1e-5)  # two players: the index is the interaction
    only_left = game.value(torch.tensor([True] * 3 + [False] * 3).expand(4, 1, 6))[:, 0]
    none = game.value(torch.zeros(4, 1, 6, dtype=torch.bool))[:, 0]
    assert torch.allclose(phi[:, 0], only_left - none, atol=1e-5)  # Shapley = main effect when additive
    phi_x, interaction_x, pairs_x = modality_games(game_for(Mixer()))
    assert interaction_x.abs().mean() > 1e-3
    assert torch.allclose(pairs_x[:, 0], interaction_x, atol=1e-5)


def test_pair_interactions_name_the_one_interacting_pair_of_three_players():
    # v(S) = 1 + 2 [a in S] - [c in S] + 3 [a in S and b in S]: only (a, b) interacts, by 3
    def value(keep):
        a, b, c = keep.unbind(-1)
        return 1 + 2 * a.float() - c.float() + 3 * (a & b).float()

    c = attr.coalitions(3)
    v = value(c.expand(2, -1, -1))
    pairs, names = attr.pair_interactions(v, 3)
    assert names == [(0, 1), (0, 2), (1, 2)]
    assert torch.allclose(pairs, torch.tensor([[3.0, 0.0, 0.0]] * 2))
    # Shapley values split the interaction evenly: a = 2 + 1.5, b = 1.5, c = -1
    assert torch.allclose(attr.shapley_from_values(v, 3), torch.tensor([[3.5, 1.5, -1.0]] * 2))


def test_pair_interactions_equal_the_definition_by_enumeration():
    import itertools
    import math

    torch.manual_seed(0)
    n = 4
    c = attr.coalitions(n)
    v = torch.randn(3, 2**n)
    index = {tuple(x.tolist()): k for k, x in enumerate(c)}
    pairs, names = attr.pair_interactions(v, n)
    for p, (i, j) in enumerate(names):
        expected = torch.zeros(3)
        rest = [k for k in range(n) if k not in (i, j)]
        for size in range(len(rest) + 1):
            for s in itertools.combinations(rest, size):

                def at(extra):
                    return v[:, index[tuple(k in s or k in extra for k in range(n))]]

                w = math.factorial(size) * math.factorial(n - size - 2) / math.factorial(n - 1)
                expected += w * (at((i, j)) - at((i,)) - at((j,)) + at(()))
        assert torch.allclose(pairs[:, p], expected, atol=1e-5)


def test_localisation_by_hand():
    scores = torch.tensor([[4.0, -1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [5.0, 5.0, 5.0, 5.0]])
    coverage = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 0]])  # no region in sample 3
    present = torch.ones(3, 4, dtype=torch.bool)
    out = localisation(scores, coverage, present)
    assert out["n"] == 2 and out["mass"] == pytest.approx((0.8 + 0.25) / 2)
    assert out["enrichment"] == pytest.approx(((0.8 + 0.25) / 2) / 0.25, rel=1e-3)
    assert out["top1_rate"] == 0.5  # first sample's top unit is inside; the tie in the second is not


class TwoTowers(torch.nn.Module):
    """A tiny CLIP-like model: each modality has its own tower into a shared 4-d space, the
    output is the match score as two logits (match, no match)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.left = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        self.right = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))

    def embed(self, x):
        return {"left": self.left(x["left"]), "right": self.right(x["right"])}

    def forward(self, x):
        e = self.embed(x)
        cos = torch.nn.functional.cosine_similarity(e["left"], e["right"], dim=-1)
        return torch.stack([cos, -cos], 1)


class SharedSpaceAdapter(TorchAdapter):
    def shared_embeddings(self, encoded):
        return self.module.embed(encoded)


def _towers_game(seed=0, b=6):
    model = TwoTowers(seed).eval()
    adapter = SharedSpaceAdapter(model, ("left", "right"), units={m: FeatureGroups([0, 0, 1, 1, 2, 2]) for m in ("left", "right")})
    g = torch.Generator().manual_seed(3)
    x = {"left": torch.randn(b, 6, generator=g), "right": torch.randn(b, 6, generator=g)}
    encoded = adapter.encode(x)
    return attr.Game(adapter, encoded, adapter.units(x, encoded), torch.zeros(b, dtype=torch.long)), encoded


def test_m2ib_maps_per_modality_and_their_sanity():
    game, encoded = _towers_game()
    stats = attr.BottleneckStats.of(encoded)
    config = attr.IBAConfig(beta=0.1, smooth=0.0, steps=10, copies=10)
    maps = {m: attr.m2ib(game, m, stats, config, torch.Generator().manual_seed(0)) for m in ("left", "right")}
    assert maps["left"].shape == (6, 3) and (maps["left"] >= 0).all() and maps["left"].sum() > 0
    # the same inputs through a model with other weights give other maps (Adebayo's check)
    other, _ = _towers_game(seed=1)
    redrawn = attr.m2ib(other, "left", stats, config, torch.Generator().manual_seed(0))
    assert not torch.allclose(redrawn, maps["left"], rtol=0.05)
    # no shared space, no M2IB
    from mmdiag.pipeline.errors import MmdiagError

    with pytest.raises(MmdiagError, match="shared embedding space"):
        attr.m2ib(game_for(Mixer()), "left", stats, config)


def test_unimodal_stage_runs_m2ib_only_where_there_is_a_shared_space():
    from mmdiag.pipeline import SampleSet
    from mmdiag.pipeline.errors import MmdiagError
    from mmdiag.stages.base import Context
    from mmdiag.stages.unimodal import UnimodalConfig, run

    game, encoded = _towers_game(b=8)
    data = SampleSet(inputs={m: t.detach() for m, t in encoded.items()}, labels=torch.zeros(8, dtype=torch.long), class_names=["match", "no"])
    logits = game.adapter.forward(encoded).detach()
    config = UnimodalConfig(methods=["m2ib", "shapley"], n_correct=8, sanity_samples=4, shapley_pairs=2)
    summary = run(Context(game.adapter, data, torch.device("cpu"), 0, logits), config, {}).summary
    assert summary["methods"]["m2ib"]["sanity_rank_corr"] is not None
    plain = game_for(Mixer(), b=8)
    data2 = SampleSet(inputs={m: t.detach() for m, t in plain.encoded.items()}, labels=torch.zeros(8, dtype=torch.long))
    with pytest.raises(MmdiagError, match="m2ib needs"):
        run(Context(plain.adapter, data2, torch.device("cpu"), 0, plain.adapter.forward(plain.encoded).detach()), config, {})


def test_adam_is_torch_optims_adam_to_the_bit():
    torch.manual_seed(0)
    ours = torch.randn(6, 5)
    theirs = ours.clone().requires_grad_(True)
    opt, reference = attr.Adam(ours, lr=1.0), torch.optim.Adam([theirs], lr=1.0)
    for _ in range(10):
        grad = torch.randn(6, 5) * 3
        opt.step(grad)
        theirs.grad = grad.clone()
        reference.step()
        assert torch.equal(ours, theirs.detach())
