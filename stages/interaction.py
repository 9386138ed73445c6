"""Cross-modal interaction methods: EMAP / DIME, mixed-gradient unit interactions, and Shapley
interaction indices.

Hand-written: no maintained library does EMAP for M modalities, batched second-order cross-modal
derivatives over units, or batched Shapley interaction sampling over the units of a `Game`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from mmdiag.stages.attribution import Game

# --- EMAP (Hessel & Lee 2020) and DIME (Lyu et al. 2022) -------------------------------------


def additive_projection(full: Tensor) -> Tensor:
    """EMAP of a recombination table `full` shaped (N,) * M + (C,): entry [i1..iM] holds the
    logits with modality m taken from reference sample i_m. The projection of sample k is
    sum_m mean_{others} full[.., i_m = k, ..] - (M - 1) * grand mean, (N, C). (MultiViz's own
    M-modality code subtracts the grand mean once: right only for M = 2.)"""
    m = full.dim() - 1
    axes = tuple(range(m))
    marginals = [full.mean(dim=tuple(a for a in axes if a != j)) for j in axes]
    return torch.stack(marginals).sum(0) - (m - 1) * full.mean(dim=axes)


def recombination_table(forward: Callable[[dict[str, Tensor]], Tensor], encoded: dict[str, Tensor], batch_size: int, tick: Callable[[int], None] | None = None) -> tuple[Tensor, int]:
    """All N^M inputs that take each modality from any reference sample, through the model in
    batches of `batch_size` (`tick` told each batch's size); returns the (N,) * M + (C,) logits
    and the number of inputs."""
    mods = list(encoded)
    n = len(next(iter(encoded.values())))
    total = n ** len(mods)
    logits = None  # preallocated once the class count is known: many small chunks joined at the end fragment the heap
    for start in range(0, total, batch_size):
        flat = torch.arange(start, min(start + batch_size, total))
        index = torch.stack(torch.unravel_index(flat, (n,) * len(mods)))  # (M, chunk)
        with torch.no_grad():
            chunk = forward({m: encoded[m][index[j].to(encoded[m].device)] for j, m in enumerate(mods)})
        if logits is None:
            logits = torch.empty(total, chunk.shape[-1], dtype=torch.float32, device=chunk.device)
        logits[start : start + len(flat)] = chunk.float()
        if tick is not None:
            tick(len(flat))
    return logits.reshape(*(n,) * len(mods), logits.shape[-1]), total


def diagonal(full: Tensor) -> Tensor:
    """full[k, k, ..., k]: the model's own logits of each reference sample, (N, C)."""
    n, m = full.shape[0], full.dim() - 1
    k = torch.arange(n, device=full.device)
    return full[(k,) * m]


def interaction_share(full_logits: Tensor, additive: Tensor) -> float:
    """The share of the logits' variation over the reference set that the additive projection
    misses: sum ||f - a||^2 / sum ||f - mean f||^2, on logits centred across classes (a shift
    common to all classes changes no prediction)."""
    centre = lambda x: x - x.mean(-1, keepdim=True)  # noqa: E731
    f, a = centre(full_logits), centre(additive)
    return float(((f - a) ** 2).sum() / ((f - f.mean(0)) ** 2).sum().clamp_min(1e-12))


# --- mixed-gradient interactions --------------------------------------------------------------


def gated_value(game: Game) -> Callable[[dict[str, Tensor]], Tensor]:
    """The target logit as a function of a continuous gate per unit ({modality: (B, n_m)}):
    a unit's elements are baseline + gate * (x - baseline), so gate 1 is the input itself."""

    def value(gates: dict[str, Tensor]) -> Tensor:
        inputs = {m: game.units[m].apply(game.encoded[m], gates[m][:, None]) for m in game.modalities}
        return game.target_logit(inputs)

    return value


TANGENT_ELEMENTS = 1 << 24  # input elements (tangents x samples x elements) one vmap chunk may carry

PATHS = ("forward-over-reverse", "forward-over-reverse, math attention", "reverse-over-reverse, math attention")


def mixed_block(game: Game, a: str, b: str) -> tuple[Tensor, str, str | None]:
    """`mixed_gradients` by the fastest path the model allows: (block, path, why the faster
    ones did not run). Forward-mode AD is missing for PyTorch's fused attention kernels (what
    `nn.MultiheadAttention`, `nn.TransformerEncoderLayer` and Hugging Face's "sdpa" attention
    run), and so are their second derivatives: the same jvp then runs with the math attention
    backend, made of ordinary differentiable ops. An op with no forward derivative at all (a
    custom autograd Function without `jvp`) falls back to a loop of double backward passes,
    also with math attention. All three give the same block (tested)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        return mixed_gradients(game, a, b), PATHS[0], None
    except (NotImplementedError, RuntimeError) as e:
        why = _first_line(e)
    with sdpa_kernel(SDPBackend.MATH):
        try:
            return mixed_gradients(game, a, b), PATHS[1], why
        except (NotImplementedError, RuntimeError) as e:
            why = _first_line(e)
        return mixed_gradients_looped(game, a, b), PATHS[2], why


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:200]


def mixed_gradients(game: Game, a: str, b: str) -> Tensor:
    """d^2 f / dg_u dg_v for every unit u of modality `a` and v of `b`, at the input (all gates
    1), (B, n_a, n_b): the cross-modal block of the Hessian over the unit gates, which is the
    input Hessian's block summed over the units' elements and weighted by (x - baseline) on both
    sides. Forward-over-reverse: one batched gradient over `a`, pushed forward along every unit
    of `b` at once (vmap over the tangents), so the cost is one pass per unit of `b` in a single
    call, not one double backward per unit pair. Samples must not affect each other's outputs
    (checked by the stage). Needs forward-mode AD for every op: `mixed_block` chooses."""
    dtype = next(iter(game.encoded.values())).dtype
    ones = {m: torch.ones(len(game.target), u.n, device=game.target.device, dtype=dtype) for m, u in game.units.items()}
    value = gated_value(game)

    def grad_a(gate_b: Tensor) -> Tensor:
        # the batch's summed logit: sample i's gradient is its own (samples are independent)
        return grad(lambda ga: value({**ones, a: ga, b: gate_b}).sum())(ones[a])

    n_b = game.units[b].n
    tangents = torch.eye(n_b, device=game.target.device, dtype=dtype)[:, None, :].expand(n_b, len(game.target), n_b)
    # tangents pushed together: all of them for small inputs, fewer where each one carries a
    # batch of large inputs (a 224 px image: 150k elements a sample), so memory stays bounded
    per_tangent = len(game.target) * sum(t[0].numel() for t in game.encoded.values())
    chunk = max(1, min(n_b, TANGENT_ELEMENTS // max(per_tangent, 1)))
    # no_grad: the transforms still differentiate, but no graph to the model's parameters is kept
    # (it held every chunk's activations until the end: 5-9 GB for a 224 px CLIP)
    with torch.no_grad():
        columns = vmap(lambda t: jvp(grad_a, (ones[b],), (t,))[1], chunk_size=chunk)(tangents)  # (n_b, B, n_a)
    game.passes += len(game.target) * n_b
    game.backward += len(game.target) * n_b
    return columns.permute(1, 2, 0).detach()


def mixed_gradients_looped(game: Game, a: str, b: str) -> Tensor:
    """The same block by a Python loop of double backward passes, one per unit of `a` (as
    MultiViz computes second-order gradients): the benchmark's and the tests' reference."""
    dtype = next(iter(game.encoded.values())).dtype
    gates = {m: torch.ones(len(game.target), u.n, device=game.target.device, dtype=dtype, requires_grad=True) for m, u in game.units.items()}
    first = torch.autograd.grad(gated_value(game)(gates).sum(), gates[a], create_graph=True)[0]
    rows = [torch.autograd.grad(first[:, u].sum(), gates[b], retain_graph=True)[0] for u in range(game.units[a].n)]
    game.passes += len(game.target)
    game.backward += len(game.target) * (1 + game.units[a].n)
    return torch.stack(rows, dim=1).detach()


# --- Shapley interaction index (Grabisch & Roubens 1999) -------------------------------------


def shapley_interaction(game: Game, pairs: Tensor, draws: int, generator: torch.Generator | None = None) -> Tensor:
    """Sampled Shapley interaction index of player pairs: the mean over coalitions S of the
    other players of f(S+i+j) - f(S+i) - f(S+j) + f(S), with S weighted |S|!(n-|S|-2)!/(n-1)!,
    which is: a size uniform in 0..n-2, then a uniform subset of that size. `pairs` (B, P, 2)
    holds player indices per sample; returns (B, P). All 4 x draws coalitions of every pair of
    every sample go through the model in large batches."""
    b, p, _ = pairs.shape
    f = game.n_players
    device = game.target.device
    # a random order of the players, and a size: S = the first `size` players other than i, j
    streams = game.streams(generator)
    order = streams.each(lambda g: torch.rand(p, draws, f, generator=g)).argsort(-1).to(device)
    rank = torch.empty_like(order).scatter_(3, order, torch.arange(f, device=device).expand_as(order))
    i, j = pairs[..., 0][..., None, None], pairs[..., 1][..., None, None]
    rank_i, rank_j = rank.gather(3, i.expand(b, p, draws, 1)), rank.gather(3, j.expand(b, p, draws, 1))
    # ranks among the other players: skip i and j
    rank_wo = rank - (rank > rank_i).long() - (rank > rank_j).long()
    size = (streams.each(lambda g: torch.rand(p, draws, 1, generator=g)) * (f - 1)).floor().long().to(device)
    s = rank_wo < size
    players = torch.arange(f, device=device)
    is_i, is_j = players == i, players == j
    s = s & ~is_i & ~is_j
    keep = torch.stack([s | is_i | is_j, s | is_i, s | is_j, s], dim=3)  # (B, P, D, 4, F)
    v = game.value(keep.reshape(b, p * draws * 4, f)).reshape(b, p, draws, 4)
    return (v[..., 0] - v[..., 1] - v[..., 2] + v[..., 3]).mean(2)


def exact_shapley_interaction(value: Callable[[Tensor], Tensor], n: int, i: int, j: int, b: int) -> Tensor:
    """The exact index of pair (i, j) by enumerating every coalition of the other n - 2
    players (tests' reference). `value(keep (B, K, n) bool) -> (B, K)`."""
    others = [k for k in range(n) if k not in (i, j)]
    total = torch.zeros(b)
    for size in range(n - 1):
        weight = math.factorial(size) * math.factorial(n - size - 2) / math.factorial(n - 1)
        for subset in itertools.combinations(others, size):
            keep = torch.zeros(4, n, dtype=torch.bool)
            keep[:, list(subset)] = True
            keep[0, [i, j]] = True
            keep[1, i] = True
            keep[2, j] = True
            v = value(keep.expand(b, 4, n))
            total += weight * (v[:, 0] - v[:, 1] - v[:, 2] + v[:, 3])
    return total
