"""Stage 1, unimodal importance: what each modality, and each unit of it, contributes.

For the samples it explains (every error, up to a cap, and a random sample of correct
predictions) it computes unit attributions by several methods towards the predicted and the true
class, the modalities' contributions (MM-SHAP shares, exact modality-level Shapley values and
their interaction) and how good each method's maps are (deletion and insertion AUC, completeness,
a weight-randomisation sanity check, and localisation of ground-truth regions).
"""

from __future__ import annotations

import copy
import itertools
import time
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import AfterValidator, Field, model_validator

from mmdiag.pipeline.errors import MmdiagError
from mmdiag.stages import attribution as attr
from mmdiag.stages import methods as registered
from mmdiag.stages import summaries
from mmdiag.stages.base import Context, Heartbeat, Stage, StageConfig, StageResult
from mmdiag.stages.methods import Call


def _registered(name: str) -> str:
    if name not in registered.METHODS:
        raise ValueError(f"unknown method {name!r}; the methods are: {', '.join(registered.names())} (or register your own: docs, Extending)")
    return name


class UnimodalConfig(StageConfig):
    methods: list[Annotated[str, AfterValidator(_registered)]] = Field(default=["grad_x_input", "integrated_gradients", "occlusion", "shapley", "iba"], min_length=1)  # registered: stages/methods.py
    options: dict[str, dict[str, Any]] = Field(default_factory=dict)  # {method: its own settings} for registered methods that declare some
    n_correct: int = Field(default=50, ge=0)  # correct predictions explained beside the errors
    max_errors: int | None = Field(default=120, gt=0)  # a random subset when there are more errors (every error gets interventions)
    batch_size: int = Field(default=64, gt=0)  # samples attributed together
    eval_batch: int | None = Field(default=None, gt=0)  # model inputs per forward; None: 128 on CPU, 8192 on CUDA
    ig_steps: int = Field(default=32, gt=1)
    shapley_pairs: int = Field(default=5, gt=0)  # antithetic permutation pairs per sample (shapley_kernel: the same budget)
    surrogate_samples: int | None = Field(default=None, gt=1)  # lime, kernel_shap perturbations; None: what shapley spends on that sample
    deeplift_references: int = Field(default=8, ge=2)  # deeplift_shap: the removed input and 7 other samples
    gradcam_layer: str | None = None  # a layer of the adapter's `layers`; None: the last one with an image map (B, C, h, w)
    smoothgrad_samples: int = Field(default=16, gt=0)
    smoothgrad_noise: float = Field(default=0.15, gt=0)  # noise sd as a share of the input's range (Smilkov et al.)
    iba_beta: float = 10.0
    m2ib_beta: float = 0.1
    # m2ib's bottleneck: None on the encoded inputs; "auto" after the adapter's default hidden
    # layer of each tower (CLIP: layer 9 of 12, as the paper); or {modality: layer name}
    m2ib_layers: dict[str, str] | Literal["auto"] | None = None
    iba_steps: int = Field(default=10, gt=0)
    iba_copies: int = Field(default=10, gt=0)
    curve_points: int = Field(default=10, gt=1)  # deletion / insertion curve resolution
    sanity_samples: int = Field(default=32, ge=0)  # 0 skips the weight-randomisation check

    @model_validator(mode="after")
    def _options(self) -> UnimodalConfig:
        for name in self.options:
            registered.own_settings(name, self.options)
        return self


def check(ctx: Context, config: UnimodalConfig) -> None:
    """What each chosen method needs of the model (M2IB: a shared embedding space)."""
    for name in config.methods:
        method = registered.get(name)
        complaint = method.check(ctx.adapter, config) if method.check else None
        if complaint:
            raise MmdiagError(complaint)


def select(ctx: Context, config: UnimodalConfig) -> torch.Tensor:
    """Row indices of the samples to explain: errors (a seeded subset above the cap) and a
    seeded random sample of correct predictions."""
    g = torch.Generator().manual_seed(ctx.seed)
    wrong = (ctx.logits.argmax(1) != ctx.data.labels).nonzero().flatten()
    right = (ctx.logits.argmax(1) == ctx.data.labels).nonzero().flatten()
    if config.max_errors is not None and len(wrong) > config.max_errors:
        wrong = wrong[torch.randperm(len(wrong), generator=g)[: config.max_errors]]
    right = right[torch.randperm(len(right), generator=g)[: config.n_correct]]
    return torch.cat([wrong, right]).sort().values


def _randomised(adapter, seed: int):
    """A copy of the model with every parameter drawn afresh (Adebayo et al. 2018)."""
    clone = copy.deepcopy(adapter)
    torch.manual_seed(seed)
    for module in clone.module.modules():
        # nn.MultiheadAttention names its reset `_reset_parameters`
        reset = getattr(module, "reset_parameters", None) or getattr(module, "_reset_parameters", None)
        if callable(reset):
            reset()
    return clone


def _spearman(a: torch.Tensor, b: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Rank correlation per row over the present players."""
    out = []
    for x, y, keep in zip(a, b, present):
        x, y = x[keep], y[keep]
        rx, ry = x.argsort().argsort().float(), y.argsort().argsort().float()
        rx, ry = rx - rx.mean(), ry - ry.mean()
        out.append((rx * ry).sum() / (rx.norm() * ry.norm()).clamp_min(1e-12))
    return torch.stack(out)


def curves(game: attr.Game, scores: torch.Tensor, points: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deletion and insertion AUC per sample: remove (or add) the players in order of
    attribution and follow the target's probability; the area is over the fraction removed."""
    present = game.present
    order = torch.where(present, scores, torch.full_like(scores, -torch.inf)).argsort(dim=1, descending=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    n = present.sum(1, keepdim=True)
    fractions = torch.linspace(0, 1, points + 1, device=scores.device)
    cut = (fractions[None, :] * n).round()  # (B, K) players taken at each point
    top = rank[:, None, :] < cut[:, :, None]  # (B, K, F)
    deletion = game.value(~top & present[:, None], output="prob")
    insertion = game.value(top & present[:, None] | ~present[:, None], output="prob")
    auc = lambda y: torch.trapezoid(y, fractions, dim=1)  # noqa: E731
    return auc(deletion), auc(insertion)


def modality_games(game: attr.Game) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The game with the modalities as players, from its 2^M coalitions' values: exact Shapley
    values (B, M), the interaction v(all) - sum_m v({m}) + (M - 1) v(none) (for two modalities
    f(both) - f(image only) - f(text only) + f(neither)), and the Shapley interaction index of
    every pair of modalities (B, M(M-1)/2, in `itertools.combinations` order)."""
    m, device = len(game.modalities), game.target.device
    owner = torch.repeat_interleave(torch.arange(m, device=device), torch.tensor(game.sizes, device=device))
    c = attr.coalitions(m, device)
    v = game.value(c[:, owner].expand(len(game.target), -1, -1))  # each modality kept or removed whole
    phi = attr.shapley_from_values(v, m)
    return phi, attr.interaction_of(v, m), attr.pair_interactions(v, m)[0]


class _Gathered:
    """Per-sample tensors gathered batch by batch, joined at the end."""

    def __init__(self):
        self.parts: dict = {}

    def add(self, key, value: torch.Tensor) -> None:
        self.parts.setdefault(key, []).append(value.detach().cpu())

    def __getitem__(self, key) -> torch.Tensor:
        return torch.cat(self.parts[key])

    def __contains__(self, key) -> bool:
        return key in self.parts


def _batches(ctx: Context, data, batch_size: int, adapter):
    for rows, inputs in data.batches(batch_size, ctx.device):
        with torch.no_grad():
            encoded = {m: t.detach() for m, t in adapter.encode(inputs).items()}
        units = adapter.units(inputs, encoded)
        for m, u in units.items():
            empty = ~u.present.any(1)
            if empty.any():
                sid = int(data.ids[rows][empty.cpu()][0])
                raise MmdiagError(f"data: sample {sid} has no units in modality {m!r}; drop it or fix its {m} input")
        yield rows, encoded, units


def run(ctx: Context, config: UnimodalConfig, upstream: dict) -> StageResult:
    adapter = ctx.adapter.eval()
    rows = select(ctx, config)
    if len(rows) == 0:
        raise MmdiagError("stages.unimodal: no samples to explain; raise n_correct or check the data")
    data = ctx.data.subset(rows)
    pred = ctx.logits[rows].argmax(1)
    unknown = [m for m in data.truth if m not in adapter.modalities]
    if unknown:
        raise MmdiagError(f"data.truth: modality {unknown[0]!r} is not one of the model's ({', '.join(adapter.modalities)}); rename or drop those masks")
    regions = [(m, r) for m, rs in data.truth.items() for r in rs]
    check(ctx, config)
    chosen = {name: registered.get(name) for name in config.methods}
    stats = _stats(ctx, data, adapter) if any(m.needs_stats for m in chosen.values()) else None
    generator = torch.Generator().manual_seed(ctx.seed)  # deeplift_shap's choice of references alone
    call = {name: Call(config, generator, stats, registered.own_settings(name, config.options)) for name in chosen}
    got, cost = _Gathered(), {meth: {"seconds": 0.0, "passes": 0} for meth in config.methods}
    n_batches = -(-len(data) // config.batch_size)
    steps = n_batches * len(config.methods) + bool(config.sanity_samples)  # the sanity check: one more
    beat = Heartbeat(ctx.progress)
    for b, (batch, encoded, units) in enumerate(_batches(ctx, data, config.batch_size, adapter)):
        draws = attr.Draws.seeded(ctx.seed, data.ids[batch])  # a sample's draws, whatever its batch
        game = attr.Game(adapter, encoded, units, pred[batch].to(ctx.device), _eval_batch(ctx, config), draws=draws, tick=beat)
        wrong = (pred[batch] != data.labels[batch]).to(ctx.device)
        # towards the true class: only errors need it (elsewhere it is the predicted class)
        towards_truth = attr.Game(
            adapter,
            {m: t[wrong] for m, t in encoded.items()},
            {m: u.take(wrong) for m, u in units.items()},
            data.labels[batch].to(ctx.device)[wrong],
            game.batch_size,
            draws=draws.take(wrong),
            tick=beat,
        )
        # both classes scored from one set of coalitions, for the methods that can
        both = attr.Game(adapter, encoded, units, torch.stack([pred[batch], data.labels[batch]], 1).to(ctx.device), game.batch_size, draws=draws, tick=beat)
        for meth in config.methods:
            beat.step(f"{meth}, batch {b + 1}/{n_batches}", (b * len(config.methods) + config.methods.index(meth)) / steps)
            start, before = time.perf_counter(), game.passes + towards_truth.passes + both.passes
            method = chosen[meth]
            if method.shared_targets:
                scores, residual = method.attribute(both, call[meth])
                (scores, true_scores), residual = scores.unbind(-1), residual[:, 0] if residual is not None else None
            else:
                scores, residual = method.attribute(game, call[meth])
                true_scores = scores.clone()
                if wrong.any():
                    true_scores[wrong] = method.attribute(towards_truth, call[meth])[0]
            if method.complete and residual is None:
                raise MmdiagError(f"stages.unimodal.methods: the method {meth!r} is registered as complete but returned no completeness residual")
            cost[meth]["seconds"] += time.perf_counter() - start
            cost[meth]["passes"] += game.passes + towards_truth.passes + both.passes - before
            got.add(("map", meth, "pred"), scores)
            got.add(("map", meth, "true"), true_scores)
            deletion, insertion = curves(game, scores, config.curve_points)
            got.add(("deletion", meth), deletion)
            got.add(("insertion", meth), insertion)
            if residual is not None:
                got.add(("residual", meth), residual)
            ctx.progress(f"{meth}, batch {b + 1}/{n_batches}", (b * len(config.methods) + config.methods.index(meth) + 1) / steps)
        got.add("present", game.present)
        got.add("gap", registered.gap(game))
        phi, interaction, pairs = modality_games(game)
        got.add("modality_phi", phi)
        got.add("interaction", interaction)
        got.add("modality_pairs", pairs)
        for m, r in regions:
            got.add(("coverage", m, r), units[m].coverage(data.truth[m][r][batch].to(ctx.device)))
        sizes = [u.n for u in units.values()]
    n_maps = len(rows) + int((pred != data.labels).sum())  # maps computed per method
    sanity = {}
    if config.sanity_samples:
        beat.step("sanity check on a randomised model", 1 - 1 / steps)
        ctx.progress(beat.what, beat.at)
        sanity = _sanity(ctx, config, data, pred, got, beat)
    ctx.progress("sanity check", 1.0)
    return _result(config, adapter.modalities, sizes, data, rows, pred, got, cost, regions, sanity, n_maps)


def _eval_batch(ctx: Context, config: UnimodalConfig) -> int:
    return config.eval_batch or attr.default_batch(ctx.device)


def _stats(ctx, data, adapter) -> attr.BottleneckStats:
    """Per-element mean and std of the encoded inputs over the explained samples (IBA's noise)."""
    with torch.no_grad():
        encoded = [adapter.encode(inputs) for _, inputs in data.batches(256, ctx.device)]
    return attr.BottleneckStats.of({m: torch.cat([e[m] for e in encoded]) for m in adapter.modalities})


def _sanity(ctx, config, data, pred, got, beat: Heartbeat) -> dict[str, float]:
    """Mean rank correlation between each method's maps and the maps of a randomised model,
    over the first `sanity_samples` samples: near 1 means the map does not depend on what the
    model learnt."""
    random = _randomised(ctx.adapter, ctx.seed)
    subset = data.subset(torch.arange(min(config.sanity_samples, len(data))))
    stats = _stats(ctx, subset, random) if any(registered.get(m).needs_stats for m in config.methods) else None
    generator = torch.Generator().manual_seed(ctx.seed + 1)  # deeplift_shap's choice of references alone
    call = {m: Call(config, generator, stats, registered.own_settings(m, config.options)) for m in config.methods}
    corr = {meth: [] for meth in config.methods}
    for batch, encoded, units in _batches(ctx, subset, config.batch_size, random):
        game = attr.Game(random, encoded, units, pred[batch].to(ctx.device), _eval_batch(ctx, config), draws=attr.Draws.seeded(ctx.seed, subset.ids[batch], salt=1), tick=beat)
        for meth in config.methods:
            scores, _ = registered.get(meth).attribute(game, call[meth])
            original = got[("map", meth, "pred")][batch]
            corr[meth].append(_spearman(original, scores.cpu(), game.present.cpu()))
    return {meth: round(float(torch.cat(c).nanmean()), 4) for meth, c in corr.items()}


def localisation(scores: torch.Tensor, coverage: torch.Tensor, present: torch.Tensor) -> dict | None:
    """How much of the attribution a ground-truth region gets, over the samples where the
    region exists: mass (share of |attribution|), enrichment (mass / the region's share of
    the units) and top1_rate (how often the top unit lies mostly inside the region)."""
    has = coverage.sum(1) > 0
    if not has.any():
        return None
    a, c, p = scores[has].abs() * present[has], coverage[has], present[has]
    mass = (a * c).sum(1) / a.sum(1).clamp_min(1e-12)
    area = c.sum(1) / p.sum(1)
    top = c.gather(1, a.argmax(1, keepdim=True)).squeeze(1) > 0.5
    return {"n": int(has.sum()), "mass": round(float(mass.mean()), 4), "enrichment": round(float(mass.mean() / area.mean()), 3), "top1_rate": round(float(top.float().mean()), 4)}


def _mean(t: torch.Tensor, digits: int = 4) -> float | None:
    """Mean for the summary; None over no samples (all skipped), never NaN."""
    return round(float(t.float().mean()), digits) if t.numel() else None


def _std(t: torch.Tensor) -> float | None:
    return round(float(t.float().std()), 4) if t.numel() > 1 else None


def _result(config, modalities, sizes, data, rows, pred, got, cost, regions, sanity, n_maps) -> StageResult:
    n = len(rows)
    spans = dict(zip(modalities, torch.arange(sum(sizes)).split(sizes)))
    present = got["present"]
    finite = torch.stack([torch.isfinite(got[("map", meth, t)]).all(1) for meth in config.methods for t in ("pred", "true")]).all(0)
    finite &= torch.isfinite(got["modality_phi"]).all(1)
    skipped = [{"id": int(data.ids[i]), "reason": "non-finite attribution or model output"} for i in (~finite).nonzero().flatten().tolist()]
    phi, interaction, gap = got["modality_phi"][finite], got["interaction"][finite], got["gap"][finite]
    summary: dict = {"n_explained": n, "n_errors_explained": int((pred != data.labels).sum()), "skipped": skipped}
    if "shapley" in config.methods:
        shap = got[("map", "shapley", "pred")][finite].abs()
        total = shap.sum(1).clamp_min(1e-12)
        summary["modality_share"] = {m: {"mean": _mean(share), "std": _std(share)} for m, share in ((m, shap[:, spans[m]].sum(1) / total) for m in modalities)}
    pairs = got["modality_pairs"][finite]
    # each modality's share of what the modalities change in the logit, in absolute terms
    reliance = phi.abs() / phi.abs().sum(1, keepdim=True).clamp_min(1e-12)
    summary["modality_ablation"] = {
        **{m: {"shapley": _mean(phi[:, j]), "abs_shapley": _mean(phi[:, j].abs()), "share": _mean(reliance[:, j])} for j, m in enumerate(modalities)},
        "interaction": {"mean": _mean(interaction), "abs_mean": _mean(interaction.abs())},
        "pairs": {f"{modalities[i]}×{modalities[j]}": {"mean": _mean(pairs[:, k]), "abs_mean": _mean(pairs[:, k].abs())} for k, (i, j) in enumerate(itertools.combinations(range(len(modalities)), 2))},
    }
    methods = {}
    for meth in config.methods:
        scores = got[("map", meth, "pred")][finite]
        residual = got[("residual", meth)][finite] if ("residual", meth) in got else None
        truth = {}
        for m, r in regions:
            found = localisation(scores[:, spans[m]], got[("coverage", m, r)][finite], present[finite][:, spans[m]])
            if found is not None:
                truth[r if sum(rr == r for _, rr in regions) == 1 else f"{m}.{r}"] = found
        methods[meth] = {
            "deletion_auc": _mean(got[("deletion", meth)][finite]),
            "insertion_auc": _mean(got[("insertion", meth)][finite]),
            # relative: mean |sum(attr) - (f(x) - f(baseline))| / mean |f(x) - f(baseline)|
            "completeness_error": None if residual is None or not len(residual) else round(float(residual.abs().mean() / gap.abs().mean().clamp_min(1e-12)), 6),
            "sanity_rank_corr": sanity.get(meth),
            "forward_passes": round(cost[meth]["passes"] / n_maps, 1),  # model inputs per map
            "truth": truth,
        }
    summary["methods"] = methods
    arrays = {
        "rows": rows.numpy(),
        "ids": data.ids.numpy(),
        "pred": pred.numpy(),
        "label": data.labels.numpy(),
        "present": present.numpy(),
        "sizes": np.array(sizes),
        "modality_shapley": got["modality_phi"].numpy(),
        "interaction": got["interaction"].numpy(),
    }
    for meth in config.methods:
        for tgt in ("pred", "true"):
            arrays[f"attr.{meth}.{tgt}"] = got[("map", meth, tgt)].numpy()
    timings = {"methods": {meth: {"seconds": round(cost[meth]["seconds"], 3)} for meth in config.methods}}
    return StageResult(summary, arrays, {"modalities": list(modalities)}, timings)


STAGE = Stage(
    "unimodal",
    run,
    UnimodalConfig,
    writes=("unimodal.modality_share", "unimodal.modality_ablation", "unimodal.methods.<method>"),
    check=check,
    modules=("mmdiag.stages.unimodal", "mmdiag.stages.methods", "mmdiag.stages.attribution", "mmdiag.stages.captum_methods", "mmdiag.stages.m2ib_layer"),
    summary=summaries.UnimodalSummary,
    extensions=lambda settings: registered.METHODS.fingerprint(settings["methods"]),
)
