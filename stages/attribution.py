"""Unit attribution methods, all over one cooperative game.

The players are the attribution units of every modality of a batch, side by side (image patches
then tokens, say); a coalition keeps some units and replaces the rest by their baselines
(`Units.apply`), and its value is the target class's logit. Every method returns a (B, F)
tensor over the F players, so methods are interchangeable and comparable, in the way Captum
gives every method one `attribute()` call.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mmdiag.pipeline.adapter import ModelAdapter
from mmdiag.pipeline.units import Units


def default_batch(device: torch.device) -> int:
    """Model inputs per forward pass. On CPU, batches that stay in cache are fastest (demo, 2
    cores: 87 us an input at 128, 154 at 512); a GPU wants large ones."""
    return 8192 if device.type == "cuda" else 128


@dataclass
class Draws:
    """Random streams, one per sample, each seeded by (seed, salt, the sample's id): what a
    sample draws does not depend on which batch it is in, so a stage's result does not depend on
    its batch size. `Draws.shared(g, b)` gives every sample the one generator `g` (the draws then
    follow the batch, as a plain generator does)."""

    generators: list[torch.Generator]

    @classmethod
    def seeded(cls, seed: int, ids: Tensor, salt: int = 0) -> Draws:
        return cls([torch.Generator().manual_seed(((seed * 1_000_003 + salt) * 1_000_033 + int(i)) % 2**63) for i in ids.tolist()])

    @classmethod
    def shared(cls, generator: torch.Generator | None, b: int) -> Draws:
        return cls([generator or torch.default_generator] * b)

    def take(self, rows) -> Draws:
        if isinstance(rows, slice):
            return Draws(self.generators[rows])
        rows = torch.as_tensor(rows).cpu()
        index = rows.nonzero().flatten() if rows.dtype == torch.bool else rows
        return Draws([self.generators[i] for i in index.tolist()])

    def each(self, draw: Callable[[torch.Generator], Tensor]) -> Tensor:
        """draw(generator) for every sample, stacked (B, ...)."""
        return torch.stack([draw(g) for g in self.generators])


@dataclass
class Game:
    adapter: ModelAdapter
    encoded: dict[str, Tensor]
    units: dict[str, Units]
    target: Tensor  # (B,) class index per sample; (B, T): T targets scored from the same evaluations
    batch_size: int = 128  # model inputs per forward pass: default_batch on a CPU (the stages pass the device's)
    passes: int = 0  # model inputs evaluated (forward), for the cost accounting
    backward: int = 0  # model inputs differentiated
    draws: Draws | None = None  # per-sample random streams; None: the method's generator, shared
    tick: Callable[[int], None] | None = None  # told each batch's model inputs (stages.base.Heartbeat)

    def streams(self, generator: torch.Generator | None) -> Draws:
        """Where the samples' random draws come from."""
        return self.draws if self.draws is not None else Draws.shared(generator, len(self.target))

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.units)

    @property
    def sizes(self) -> list[int]:
        return [u.n for u in self.units.values()]

    @property
    def n_players(self) -> int:
        return sum(self.sizes)

    @property
    def present(self) -> Tensor:
        """(B, F) bool: players that exist in each sample (absent token slots are dummies)."""
        return torch.cat([u.present for u in self.units.values()], dim=1)

    def split(self, per_player: Tensor) -> dict[str, Tensor]:
        """(..., F) -> {modality: (..., n_m)}."""
        return dict(zip(self.modalities, per_player.split(self.sizes, dim=-1)))

    def rows(self, rows: slice) -> Game:
        """The game of some samples of the batch."""
        units = {m: u.take(rows) for m, u in self.units.items()}
        draws = None if self.draws is None else self.draws.take(rows)
        return Game(self.adapter, {m: t[rows] for m, t in self.encoded.items()}, units, self.target[rows], self.batch_size, draws=draws, tick=self.tick)

    def sample(self, i: int) -> Game:
        return self.rows(slice(i, i + 1))

    def in_chunks(self, samples: int, method: Callable[[Game], Tensor]) -> Tensor:
        """method's (b, n) output over chunks of `samples` samples, their cost counted here."""
        out = []
        for start in range(0, len(self.target), samples):
            part = self.rows(slice(start, start + samples))
            out.append(method(part))
            self.passes += part.passes
            self.backward += part.backward
        return torch.cat(out)

    def removed(self) -> dict[str, Tensor]:
        """The input with every unit removed (special tokens kept): the baseline of IG."""
        b = len(self.target)
        return {m: u.apply(self.encoded[m], torch.zeros(b, u.n, dtype=torch.bool, device=self.target.device)) for m, u in self.units.items()}

    def logits(self, keep: Tensor) -> Tensor:
        """Logits of coalitions: keep (B, K, F) bool or soft -> (B, K, C), in batches of
        `batch_size` model inputs."""
        b, k, _ = keep.shape
        out = None
        per = max(1, self.batch_size // max(k, 1))  # samples per chunk
        for s in range(0, b, per):
            rows = slice(s, min(s + per, b))
            for start in range(0, k, self.batch_size):
                cols = slice(start, min(start + self.batch_size, k))
                parts = self.split(keep[rows, cols])
                perturbed = {m: self.units[m].take(rows).apply(self.encoded[m][rows], parts[m]) for m in self.modalities}
                with torch.no_grad():
                    logits = self.adapter.forward(perturbed).float()
                self.passes += logits.shape[0]
                if self.tick is not None:
                    self.tick(logits.shape[0])
                if out is None:
                    out = torch.empty(b, k, logits.shape[-1], device=keep.device)
                out[rows, cols] = logits.reshape(rows.stop - rows.start, cols.stop - cols.start, -1)
        return out

    def value(self, keep: Tensor, output: str = "logit") -> Tensor:
        """Values of coalitions: keep (B, K, F) bool or soft -> (B, K) target logit (or
        probability); (B, K, T) for T targets per sample."""
        logits = self.logits(keep)
        score = logits.log_softmax(-1).exp() if output == "prob" else logits
        target = self.target.reshape(len(self.target), 1, -1).expand(-1, keep.shape[1], -1)
        return score.gather(2, target).reshape(*keep.shape[:2], *self.target.shape[1:])

    def target_logit(self, encoded: dict[str, Tensor]) -> Tensor:
        logits = self.adapter.forward(encoded)
        return logits.gather(1, self.target[:, None]).squeeze(1)


def grad_x_input(game: Game) -> Tensor:
    """Gradient x (input - baseline), pooled per unit: the first-order estimate of what removing
    each unit costs. Relative to the baseline, not to zero as Captum's InputXGradient: against
    zero, black pixels (the demo's shortcut mark) could never receive attribution."""
    x = {m: t.detach().requires_grad_(True) for m, t in game.encoded.items()}
    base = game.removed()
    grads = torch.autograd.grad(game.target_logit(x).sum(), list(x.values()))
    game.passes += len(game.target)
    game.backward += len(game.target)
    per_unit = [u.pool(g * (x[m] - base[m])).detach() for (m, u), g in zip(game.units.items(), grads)]
    return torch.cat(per_unit, dim=1)


def integrated_gradients(game: Game, steps: int = 32) -> tuple[Tensor, Tensor]:
    """Captum's Integrated Gradients from the all-removed input; (attributions, completeness
    delta = sum(attr) - (f(x) - f(baseline)) per sample)."""
    from captum.attr import IntegratedGradients

    mods = game.modalities

    def forward(*tensors):
        return game.adapter.forward(dict(zip(mods, tensors)))

    base = game.removed()
    ig = IntegratedGradients(forward)
    inputs = tuple(game.encoded[m].detach() for m in mods)
    attrs, delta = ig.attribute(
        inputs,
        baselines=tuple(base[m].detach() for m in mods),
        target=game.target,
        n_steps=steps,
        internal_batch_size=max(len(game.target), game.batch_size // 4),
        return_convergence_delta=True,
    )
    game.passes += len(game.target) * (steps + 2)
    game.backward += len(game.target) * steps
    per_unit = torch.cat([game.units[m].pool(a.detach()) for m, a in zip(mods, attrs)], dim=1)
    return per_unit, delta.detach()


def occlusion(game: Game) -> Tensor:
    """Captum's FeatureAblation over the units: f(x) - f(x without unit). Special tokens get a
    feature id of their own whose 'removal' keeps their value, so they score exactly 0."""
    from captum.attr import FeatureAblation

    mods = game.modalities
    offsets = [0, *itertools.accumulate(game.sizes)]
    masks, baselines = [], []
    for m, off in zip(mods, offsets):
        u, x = game.units[m], game.encoded[m]
        mask = u.mask.expand(x.shape[0], *u.mask.shape[1:])
        masks.append(torch.where(mask < 0, torch.full_like(mask, game.n_players), mask + off))
        baselines.append(torch.where(mask.expand_as(x) < 0, x, u.baseline).detach())

    def forward(*tensors):
        return game.adapter.forward(dict(zip(mods, tensors)))

    attrs = FeatureAblation(forward).attribute(
        tuple(game.encoded[m].detach() for m in mods),
        baselines=tuple(baselines),
        target=game.target,
        feature_mask=tuple(masks),
        perturbations_per_eval=max(1, game.batch_size // max(len(game.target), 1)),
    )
    game.passes += len(game.target) * (game.n_players + 2)
    # every element of a unit carries the unit's score: read it as the mean over the unit
    per_unit = [game.units[m].pool(a) / game.units[m].pool(torch.ones_like(a)).clamp_min(1) for m, a in zip(mods, attrs)]
    return torch.cat(per_unit, dim=1).detach()


def by_present(game: Game, estimate: Callable[[Game, Compact], Tensor]) -> Tensor:
    """An estimator run on the groups of samples with equal numbers of present players, over
    those players only: absent unit slots (padding positions a sample does not have) get
    exactly 0 and cost no model evaluation. `estimate(sub_game, compact)` returns (b, n), or
    (b, n, T) for a game of T targets."""
    present = game.present
    counts = present.sum(1)
    out = torch.zeros(*present.shape, *game.target.shape[1:], device=present.device)
    for n in counts.unique().tolist():
        rows = (counts == n).nonzero().flatten()
        sub = game.rows(rows)
        compact = Compact(sub, present[rows].nonzero()[:, 1].reshape(len(rows), n))
        out[rows] = out[rows].scatter(1, _along(compact.index, out), estimate(sub, compact).to(out.dtype))
        game.passes += sub.passes
    return out


def _along(index: Tensor, like: Tensor) -> Tensor:
    """index (b, ..., n) expanded over `like`'s trailing target axis, if it has one."""
    extra = like.dim() - index.dim()
    return index.reshape(*index.shape, *(1,) * extra).expand(*index.shape, *like.shape[index.dim() :])


@dataclass
class Compact:
    """A game seen through each sample's present players (index: (b, n) their positions)."""

    game: Game
    index: Tensor

    @property
    def n(self) -> int:
        return self.index.shape[1]

    def value(self, keep: Tensor) -> Tensor:
        """keep (b, K, n) over the present players -> (b, K) values, (b, K, T) for T targets
        (absent slots removed)."""
        b, k, n = keep.shape
        full = torch.zeros(b, k, self.game.n_players, dtype=torch.bool, device=keep.device)
        return self.game.value(full.scatter(2, self.index[:, None, :].expand(b, k, n), keep))

    def ends(self) -> Tensor:
        """(b, 2) or (b, 2, T): v(none), v(all)."""
        b = self.index.shape[0]
        return self.value(torch.stack([torch.zeros(b, self.n, dtype=torch.bool), torch.ones(b, self.n, dtype=torch.bool)], 1).to(self.index.device))


def shapley_sampling(game: Game, pairs: int = 10, generator: torch.Generator | None = None) -> Tensor:
    """Shapley values by antithetic permutation sampling (shap's PermutationExplainer): each of
    `pairs` random orders of the players is walked forward and reversed; a player's value is its
    mean marginal contribution. Every coalition of every walk of every sample goes through the
    model in large batches, and the empty and full coalitions, shared by all walks, are
    evaluated once: 2 pairs (n - 1) + 2 evaluations for n present players. Additivity holds
    exactly: the values sum to f(all) - f(none). A game of T targets per sample gives (B, F, T)
    from the same walks, so each further target costs no evaluation."""
    return by_present(game, lambda sub, c: _permutation_walks(c, pairs, generator))


def _permutation_walks(c: Compact, pairs: int, generator) -> Tensor:
    b, f, device = c.index.shape[0], c.n, c.index.device
    orders = c.game.streams(generator).each(lambda g: torch.stack([torch.randperm(f, generator=g) for _ in range(pairs)])).to(device)
    orders = torch.cat([orders, orders.flip(-1)], dim=1)  # (B, P, F) with P = 2 * pairs
    p = orders.shape[1]
    # rank[b, p, j] = position of player j in walk p; coalition k holds the players of rank < k
    rank = torch.empty_like(orders).scatter_(2, orders, torch.arange(f, device=device).expand(b, p, f))
    inner = torch.arange(1, f, device=device)  # coalitions 1 .. F-1 (0 and F are shared)
    keep = rank[:, :, None, :] < inner[None, None, :, None]  # (B, P, F-1, F)
    values = c.value(keep.reshape(b, p * (f - 1), f))
    t = values.shape[2:]  # the targets, if several
    values = values.reshape(b, p, f - 1, *t)
    ends = c.ends()
    walk = torch.cat([ends[:, None, :1].expand(b, p, 1, *t), values, ends[:, None, 1:].expand(b, p, 1, *t)], dim=2)  # (B, P, F+1, ...)
    marginal = walk.diff(dim=2)  # contribution of the k-th player of each walk
    phi = torch.zeros_like(marginal).scatter_(2, _along(orders, marginal), marginal)
    return phi.mean(dim=1)


def kernel_shapley(game: Game, pairs: int = 10, generator: torch.Generator | None = None) -> Tensor:
    """Shapley values by KernelSHAP regression (Lundberg & Lee 2017) at the cost of
    `shapley_sampling(pairs)`: 2 pairs (n - 1) coalitions besides the empty and full one. The
    coalition sizes are enumerated from the outside in (1 and n-1 first) while the Shapley
    kernel's share of the budget covers every coalition of a size, as shap's KernelExplainer
    does; the rest is sampled from the kernel in complementary pairs (Covert & Lee 2021), each
    weighted by the kernel mass it stands for. The weighted least-squares fit is solved under
    the constraint sum(phi) = f(all) - f(none), so additivity holds exactly. A game of T targets
    fits each target on the same coalitions: (B, F, T)."""
    return by_present(game, lambda sub, c: _kernel_regression(c, 2 * pairs * max(c.n - 1, 1), generator))


@dataclass
class KernelDesign:
    """The coalitions of a KernelSHAP fit over n players: the sizes enumerated whole (shared by
    every sample) with their kernel weights, and what is left of the budget and of the kernel's
    mass for the sampled part."""

    rows: Tensor  # (E, n) bool
    weights: Tensor  # (E,)
    left: int  # evaluations left to sample
    rest: float  # kernel mass the sampled coalitions stand for
    mass: Tensor  # (n - 1,) kernel mass per coalition size still to sample (0 where enumerated)

    @classmethod
    def of(cls, n: int, budget: int) -> KernelDesign:
        sizes = torch.arange(1, n, dtype=torch.float64)
        mass = (n - 1) / (sizes * (n - sizes))
        mass = mass / mass.sum()  # the kernel's weight of each coalition size
        rows, weights, left, rest = [], [], budget, 1.0
        for s in range(1, n // 2 + 1):
            group = [s] if 2 * s == n else [s, n - s]
            count = sum(math.comb(n, g) for g in group)
            share = sum(mass[g - 1].item() for g in group)
            if left * share / max(rest, 1e-12) < count:
                break
            for g in group:
                members = torch.tensor(list(itertools.combinations(range(n), g)))
                rows.append(torch.zeros(len(members), n, dtype=torch.bool).scatter_(1, members, True))
                weights.append(torch.full((len(members),), mass[g - 1].item() / math.comb(n, g), dtype=torch.float64))
            left, rest = left - count, rest - share
            mass[[g - 1 for g in group]] = 0
        empty = (torch.zeros(0, n, dtype=torch.bool), torch.zeros(0, dtype=torch.float64))
        return cls(torch.cat(rows) if rows else empty[0], torch.cat(weights) if weights else empty[1], left, rest, mass)

    def draw(self, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """One sample's coalitions (K, n) and weights (K,): the enumerated ones, then the rest of
        the budget drawn from the kernel in complementary pairs."""
        n = self.rows.shape[1]
        if self.left < 2 or self.rest <= 1e-12:
            return self.rows, self.weights
        draws = self.left // 2
        size = torch.multinomial(self.mass.float(), draws, replacement=True, generator=generator) + 1
        ranks = torch.rand(draws, n, generator=generator).argsort(1).argsort(1)
        sampled = ranks < size[:, None]
        weights = torch.full((2 * draws,), self.rest / (2 * draws), dtype=torch.float64)
        return torch.cat([self.rows, sampled, ~sampled]), torch.cat([self.weights, weights])


def _kernel_regression(c: Compact, budget: int, generator) -> Tensor:
    b, n, device = c.index.shape[0], c.n, c.index.device
    ends = c.ends().double()
    gap = ends[:, 1] - ends[:, 0]  # (b,) or (b, T)
    if n == 1:
        return gap[:, None]
    design = KernelDesign.of(n, budget)
    draws = [design.draw(g) for g in c.game.streams(generator).generators]  # the sampled part differs per sample
    z = torch.stack([d[0] for d in draws]).to(device)  # (b, K, n)
    w = torch.stack([d[1] for d in draws]).to(device)  # (b, K)
    y = c.value(z).double() - ends[:, :1]
    y = y.reshape(b, y.shape[1], -1)  # (b, K, T), T = 1 for one target
    zf = z.double()
    gram = torch.einsum("bk,bki,bkj->bij", w, zf, zf)
    moment = torch.einsum("bk,bki,bkt->bit", w, zf, y)
    # the constrained fit's KKT system: [G 1; 1' 0] [phi; mu] = [m; gap]
    # (a ridge of 1e-9 of the diagonal's scale keeps it solvable when few coalitions were drawn;
    # the constraint row is exact either way)
    ridge = 1e-9 * gram.diagonal(dim1=1, dim2=2).mean(1)[:, None, None] * torch.eye(n, dtype=torch.float64, device=device)
    kkt = torch.zeros(b, n + 1, n + 1, dtype=torch.float64, device=device)
    kkt[:, :n, :n], kkt[:, :n, n], kkt[:, n, :n] = gram + ridge, 1.0, 1.0
    rhs = torch.cat([moment, gap.reshape(b, 1, -1)], 1)
    return torch.linalg.solve(kkt, rhs)[:, :n].reshape(b, n, *gap.shape[1:]).float()


def coalitions(n: int, device: torch.device | str = "cpu") -> Tensor:
    """All 2^n coalitions of n players, (2^n, n) bool, in `itertools.product` order."""
    return torch.tensor(list(itertools.product([False, True], repeat=n)), device=device)


def coalition_index(members: Sequence[int], n: int) -> int:
    """Position in `coalitions(n)` of the coalition of these players (player 0 is the top bit)."""
    return sum(2 ** (n - 1 - j) for j in set(members))


def without(j: int, n: int) -> int:
    """Position in `coalitions(n)` of every player but j."""
    return coalition_index([k for k in range(n) if k != j], n)


def interaction_of(v, n: int):
    """v(all) - sum_j v({j}) + (n - 1) v(none) from the values of every coalition (last axis in
    `coalitions` order); for two players, v(both) - v(first) - v(second) + v(none)."""
    return v[..., -1] - sum(v[..., coalition_index([j], n)] for j in range(n)) + (n - 1) * v[..., 0]


def shapley_from_values(v: Tensor, n: int) -> Tensor:
    """Exact Shapley values (B, n) from the values (B, 2^n) of every coalition."""
    index = {c: i for i, c in enumerate(itertools.product([False, True], repeat=n))}
    phi = torch.zeros(v.shape[0], n, dtype=v.dtype, device=v.device)
    for c, i in index.items():
        s = sum(c)
        for j in (j for j in range(n) if not c[j]):
            weight = math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n)
            phi[:, j] += weight * (v[:, index[c[:j] + (True,) + c[j + 1 :]]] - v[:, i])
    return phi


def pair_interactions(v: Tensor, n: int) -> tuple[Tensor, list[tuple[int, int]]]:
    """Exact Shapley interaction index (Grabisch & Roubens 1999) of every pair of players,
    (B, n(n-1)/2), from the values (B, 2^n) of every coalition:
    I_ij = sum over S without i, j of |S|! (n-|S|-2)! / (n-1)! [v(S+ij) - v(S+i) - v(S+j) + v(S)].
    For two players it is v(both) - v(first) - v(second) + v(none)."""
    pairs = list(itertools.combinations(range(n), 2))
    out = torch.zeros(v.shape[0], len(pairs), dtype=v.dtype, device=v.device)
    for p, (i, j) in enumerate(pairs):
        others = [k for k in range(n) if k not in (i, j)]
        for size in range(n - 1):
            weight = math.factorial(size) * math.factorial(n - size - 2) / math.factorial(n - 1)
            for s in itertools.combinations(others, size):
                at = lambda extra: v[:, coalition_index([*s, *extra], n)]  # noqa: E731
                out[:, p] += weight * (at((i, j)) - at((i,)) - at((j,)) + at(()))
    return out, pairs


def exact_shapley(value: Callable[[Tensor], Tensor], n: int, b: int, device: torch.device | str = "cpu") -> Tensor:
    """Exact Shapley values of an n-player game by enumerating its 2^n coalitions (the
    reference for tests, and the modality-level values with one player per modality).
    `value(keep (B, 2^n, n) bool) -> (B, 2^n)`."""
    c = coalitions(n, device)
    return shapley_from_values(value(c.expand(b, *c.shape)), n)


@dataclass
class BottleneckStats:
    """Per-element mean and standard deviation of each modality's encoded tensor over data."""

    mean: dict[str, Tensor]
    std: dict[str, Tensor]

    @classmethod
    def of(cls, encoded: dict[str, Tensor]) -> BottleneckStats:
        return cls({m: x.mean(0) for m, x in encoded.items()}, {m: x.std(0).clamp_min(0.01) for m, x in encoded.items()})


@dataclass
class IBAConfig:
    beta: float = 10.0
    steps: int = 10
    lr: float = 1.0
    copies: int = 10  # noise draws per step
    init: float = 5.0  # alpha at the start: lambda = sigmoid(5) ~ 0.993 lets nearly all through
    smooth: float = 1.0  # Gaussian sigma on lambda, images only

    def samples_per_step(self, batch_size: int) -> int:
        """Samples optimised together: their copies fill one forward batch. One batch of all the
        samples spills the CPU caches (demo, 2 cores: forward + backward 170 us an input at 120,
        220 at 640)."""
        return max(1, batch_size // self.copies)


class Adam:
    """Adam (Kingma & Ba 2015) on one tensor, the update torch.optim.Adam makes on a CPU (equal
    to the bit, tested). Written out because torch.optim's first use imports torch._dynamo:
    1.2-1.5 s of a cold run, for an optimiser of 10 steps."""

    def __init__(self, param: Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.param, self.lr, self.betas, self.eps, self.t = param, lr, betas, eps, 0
        self.m, self.v = torch.zeros_like(param), torch.zeros_like(param)

    @torch.no_grad()
    def step(self, grad: Tensor) -> None:
        (b1, b2), self.t = self.betas, self.t + 1
        self.m.lerp_(grad, 1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (self.v.sqrt() / (1 - b2**self.t) ** 0.5).add_(self.eps)
        self.param.addcdiv_(self.m, denom, value=-self.lr / (1 - b1**self.t))


def _blur(x: Tensor, sigma: float) -> Tensor:
    if sigma <= 0 or x.dim() != 4:
        return x
    radius = max(1, int(round(2 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = torch.nn.functional.conv2d(x, k.reshape(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, radius), groups=c)
    return torch.nn.functional.conv2d(x, k.reshape(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(radius, 0), groups=c)


def bottleneck_attribution(
    game: Game,
    modality: str,
    stats: BottleneckStats,
    fit: Callable[[dict[str, Tensor]], Tensor],
    config: IBAConfig,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The information bottleneck shared by IBA and M2IB, on one modality's encoded tensor:
    Z = lambda * x + (1 - lambda) * eps, eps ~ N(mu, sigma) per element, lambda = sigmoid(alpha);
    minimise fit(Z) + beta * mean capacity (KL of the normalised representation) over the
    elements that belong to units (special tokens and padding excluded). Every sample of
    the batch is optimised at once: the parameters are per sample and Adam is element-wise, so
    one batched run equals one run per sample. `fit` gets the inputs with `copies` noise draws
    per sample (sample-major) and returns the summed per-sample loss. Returns the capacity per
    unit, in bits, (B, n_modality)."""
    x = game.encoded[modality].detach()
    b = x.shape[0]
    mu, sigma = stats.mean[modality], stats.std[modality]
    inside = game.units[modality].elements.expand_as(x)  # special tokens pass untouched
    alpha = torch.full_like(x, config.init, requires_grad=True)
    opt = Adam(alpha, lr=config.lr)
    others = {m: t.detach().repeat_interleave(config.copies, 0) for m, t in game.encoded.items() if m != modality}
    normalised = (x - mu) / sigma

    def bottleneck():
        lam = torch.where(inside, _blur(torch.sigmoid(alpha), config.smooth), 1.0)
        capacity = -0.5 * (1 + torch.log((1 - lam) ** 2 + 1e-12) - (lam * normalised) ** 2 - (1 - lam) ** 2)
        return lam, capacity * inside  # KL per element, in nats

    streams = game.streams(generator)
    inside_cpu = inside.cpu()[:, None].expand(b, config.copies, *x.shape[1:])
    n_inside = inside.flatten(1).sum(1).clamp_min(1)
    every_element = bool(inside.all())
    for _ in range(config.steps):
        lam, capacity = bottleneck()
        lam_k = lam.repeat_interleave(config.copies, 0)
        # noise only where units are (lambda = 1 elsewhere), drawn in element order: padding
        # after a caption changes neither the draws nor the mean capacity
        # (CPU generators, one per sample: seeded alike on every device and in every batch)
        if every_element:  # images: no indexing to pay for
            draws = streams.each(lambda g: torch.randn((config.copies, *x.shape[1:]), generator=g, dtype=x.dtype))
        else:
            draws = torch.zeros((b, config.copies, *x.shape[1:]), dtype=x.dtype)
            for i, g in enumerate(streams.generators):
                draws[i][inside_cpu[i]] = torch.randn(int(inside_cpu[i].sum()), generator=g, dtype=x.dtype)
        noise = mu + sigma * draws.reshape(lam_k.shape).to(x.device)
        z = lam_k * x.repeat_interleave(config.copies, 0) + (1 - lam_k) * noise
        # the mean capacity over the elements that belong to units, not over padding
        loss = fit({**others, modality: z}) / config.copies + config.beta * (capacity.flatten(1).sum(1) / n_inside).sum()
        opt.step(torch.autograd.grad(loss, [alpha])[0])  # not the model's parameters: cheaper, and leaves them untouched
        game.passes += b * config.copies
        game.backward += b * config.copies
        if game.tick is not None:
            game.tick(b * config.copies)
    with torch.no_grad():
        return game.units[modality].pool(bottleneck()[1]) / math.log(2)


def iba(game: Game, modality: str, stats: BottleneckStats, config: IBAConfig = IBAConfig(), generator: torch.Generator | None = None) -> Tensor:
    """IBA (Schulz et al. 2020): the fit term is the target class's cross-entropy."""

    def one_chunk(part: Game) -> Tensor:
        target = part.target.repeat_interleave(config.copies)

        def fit(z):
            return torch.nn.functional.cross_entropy(part.adapter.forward(z), target, reduction="sum")

        return bottleneck_attribution(part, modality, stats, fit, config, generator)

    return game.in_chunks(config.samples_per_step(game.batch_size), one_chunk)


def m2ib(game: Game, modality: str, stats: BottleneckStats, config: IBAConfig = IBAConfig(beta=0.1, smooth=0.0), generator: torch.Generator | None = None) -> Tensor:
    """M2IB (Wang et al. 2023), for models with a shared embedding space: the fit term is the
    cosine similarity between the bottlenecked modality's embedding and the other modalities'
    clean embeddings (their mean when there are several). Defaults as the paper's code (beta 0.1,
    no smoothing); unlike that code, the noise follows the data's own statistics, as in IBA,
    rather than N(0, I) on an unnormalised representation."""

    def one_chunk(part: Game) -> Tensor:
        clean = part.adapter.shared_embeddings({m: t.detach() for m, t in part.encoded.items()})
        other = torch.stack([e for m, e in clean.items() if m != modality]).mean(0).detach()
        other = other.repeat_interleave(config.copies, 0)

        def fit(z):
            own = part.adapter.shared_embeddings(z)[modality]
            return -torch.nn.functional.cosine_similarity(own, other, dim=-1).sum()

        return bottleneck_attribution(part, modality, stats, fit, config, generator)

    return game.in_chunks(config.samples_per_step(game.batch_size), one_chunk)
