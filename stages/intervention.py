"""Interventions, the diagnosis's evidence of record: what the model does on every analysed
sample when a truth region, a whole modality or a concept is removed or flipped.

- Each truth region: the units it touches are removed (`Units.apply`, the removal every other
  method uses); the null is `null_sets` random sets of as many units of the same modality,
  drawn among the units the region does not touch, so that one token among four and one patch
  among 64 are judged against removals of their own size.
- Each modality: all 2^M coalitions of whole modalities (exact modality Shapley values, the
  pairwise interaction index, each modality's share of the logit change), and what the model
  takes from it against what a readout refitted to the labels could (stages/readout.py: the
  information about the label the model leaves unused).
- Each counterfactual the data supplies (`SampleSet.counterfactuals`): the flipped inputs.

Per sample it records the new prediction and the change of the predicted class's margin and of
the predicted and the true class's logits; `summarise` turns those into flip rates, logit
changes and error-fix rates with 95% intervals, and each region's effect beyond its null.
Cost: (1 + null_sets) model inputs per region, 2^M, and per counterfactual one plus one per draw of
its null, per sample it is in.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from pydantic import Field

from mmdiag.pipeline import stats
from mmdiag.pipeline.device import fit_batch
from mmdiag.pipeline.errors import MmdiagError
from mmdiag.stages import attribution as attr
from mmdiag.stages import readout, summaries
from mmdiag.stages.base import Context, Heartbeat, Stage, StageConfig, StageResult


class InterventionConfig(StageConfig):
    null_sets: int = Field(default=6, gt=0)  # random same-size unit sets per region and sample
    batch_size: int = Field(default=256, gt=0)  # samples intervened on together
    eval_batch: int | None = Field(default=None, gt=0)  # model inputs per forward; None: the device's default
    confidence: float = Field(default=0.95, gt=0, lt=1)  # of every interval in the summary


def null_scores(ids: torch.Tensor, seed: int, salt: int, k: int, n: int) -> torch.Tensor:
    """(B, k, n) uniform draws, a function of each sample's id (and the seed and region) alone, so
    that a sample's null is the same whatever the batch or shard it comes in."""
    return torch.stack([torch.rand(k, n, generator=torch.Generator().manual_seed(((seed * 1_000_003 + salt) * 1_000_033 + int(i)) % 2**63)) for i in ids])


def region_keeps(present: torch.Tensor, span: slice, region: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coalitions over all players (B, 1 + k, F): the region's units removed, then k random sets
    of as many of the modality's other present units (the k lowest `scores` among them); and
    whether each sample's null exists (the region touches a unit and enough others are present)."""
    b, f = present.shape
    k = scores.shape[1]
    own = present[:, span]
    size = region.sum(1)
    candidates = own & ~region
    scores = scores.to(present.device)
    scores = torch.where(candidates[:, None], scores, torch.full_like(scores, 2.0))
    rank = scores.argsort(-1).argsort(-1)
    chosen = rank < size[:, None, None]
    keep = torch.ones(b, 1 + k, f, dtype=torch.bool, device=present.device)
    keep[:, 0, span] = ~region
    keep[:, 1:, span] = ~chosen
    return keep, (size > 0) & (candidates.sum(1) >= size)


def outcome(logits: torch.Tensor, pred: torch.Tensor, label: torch.Tensor, base: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per intervened input (B, K, C): the new prediction, the predicted class's margin over the
    best other class, and the change of the predicted and the true class's logits."""
    k = logits.shape[1]
    at = lambda z, c: z.gather(-1, c[:, None, None].expand(-1, z.shape[1], 1)).squeeze(-1)  # noqa: E731
    others = logits.scatter(-1, pred[:, None, None].expand(-1, k, 1), -torch.inf)
    return {
        "pred_after": logits.argmax(-1),
        "margin_after": at(logits, pred) - others.max(-1).values,
        "d_pred": at(logits, pred) - base.gather(1, pred[:, None]),
        "d_true": at(logits, label) - base.gather(1, label[:, None]),
    }


def margin(logits: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    others = logits.scatter(1, pred[:, None], -torch.inf)
    return logits.gather(1, pred[:, None]).squeeze(1) - others.max(1).values


def run(ctx: Context, config: InterventionConfig, upstream: dict) -> StageResult:
    adapter, data, device = ctx.adapter.eval(), ctx.data, ctx.device
    if ctx.logits is None:
        raise MmdiagError("stages.intervention: needs the model's logits on the data (run it through the flow or pass Context.logits)")
    unknown = [m for m in data.truth if m not in adapter.modalities]
    if unknown:
        raise MmdiagError(f"data.truth: modality {unknown[0]!r} is not one of the model's ({', '.join(adapter.modalities)}); rename or drop those masks")
    base_logits = ctx.logits.float()
    pred, labels = base_logits.argmax(1), data.labels
    regions = [(m, r) for m, rs in data.truth.items() for r in rs]
    eval_batch = config.eval_batch or attr.default_batch(device)
    parts: dict[str, list[torch.Tensor]] = {}
    passes = 0

    def add(key: str, value: torch.Tensor) -> None:
        parts.setdefault(key, []).append(value.detach().cpu())

    batch = fit_batch(config.batch_size, data.inputs)
    n_batches = -(-len(data) // batch)
    beat = Heartbeat(ctx.progress)
    for b, (rows, inputs) in enumerate(data.batches(batch, device)):
        ctx.progress(f"batch {b + 1}/{n_batches}", b / n_batches)
        beat.step(f"batch {b + 1}/{n_batches}", b / n_batches)
        with torch.no_grad():
            encoded = {m: t.detach() for m, t in adapter.encode(inputs).items()}
        units = adapter.units(inputs, encoded)
        p, y, base = pred[rows].to(device), labels[rows].to(device), base_logits[rows].to(device)
        game = attr.Game(adapter, encoded, units, p, eval_batch, tick=beat)
        present = game.present
        offsets = dict(zip(game.modalities, itertools.accumulate([0, *game.sizes])))
        unchanged = outcome(base[:, None].expand(-1, 1 + config.null_sets, -1), p, y, base)
        for m, r in regions:
            span = slice(offsets[m], offsets[m] + units[m].n)
            region = (units[m].coverage(data.truth[m][r][rows].to(device)) > 0) & units[m].present
            has = region.any(1)
            at = has.nonzero().flatten()  # only samples the region is in cost model inputs
            found = {k: v.clone() for k, v in unchanged.items()}
            valid = torch.zeros_like(has)
            if len(at):
                sub = attr.Game(adapter, {k: t[at] for k, t in encoded.items()}, {k: u.take(at) for k, u in units.items()}, p[at], eval_batch, tick=beat)
                scores = null_scores(data.ids[rows][at.cpu()], ctx.seed, regions.index((m, r)), config.null_sets, units[m].n)
                keep, valid[at] = region_keeps(present[at], span, region[at], scores)
                for k, v in outcome(sub.logits(keep), p[at], y[at], base[at]).items():
                    found[k][at] = v
                passes += sub.passes
            for name, value in found.items():
                add(f"region.{m}.{r}.{name}", value[:, 0])
                add(f"region.{m}.{r}.null.{name}", value[:, 1:])
            add(f"region.{m}.{r}.size", region.sum(1))
            add(f"region.{m}.{r}.has", has)
            add(f"region.{m}.{r}.null_valid", valid)
        owner = torch.repeat_interleave(torch.arange(len(game.modalities), device=device), torch.tensor(game.sizes, device=device))
        coalitions = attr.coalitions(len(game.modalities), device)
        values = game.logits(coalitions[:, owner].expand(len(p), -1, -1))  # (B, 2^M, C)
        add("modality.pred", values.gather(2, p[:, None, None].expand(-1, values.shape[1], 1)).squeeze(2))
        add("modality.true", values.gather(2, y[:, None, None].expand(-1, values.shape[1], 1)).squeeze(2))
        add("modality.pred_after", values.argmax(2))
        add("modality.logits", values)
        for m in game.modalities:
            add(f"modality.features.{m}", readout.features(encoded[m], units[m]))
        for concept, cf in data.counterfactuals.items():
            valid = torch.ones(len(p), dtype=torch.bool) if cf.valid is None else cf.valid[rows].bool()
            at = valid.nonzero().flatten().to(device)  # only the rows that have a counterfactual cost model inputs
            for part, draws in (("", [cf.inputs]), (".null", cf.null or [])):
                if not draws:
                    continue
                found = outcome(base[:, None].expand(-1, len(draws), -1), p, y, base)
                if len(at):
                    logits = []
                    for changed in draws:
                        flipped = {**{m: x[at] for m, x in inputs.items()}, **{m: x[rows].to(device)[at] for m, x in changed.items()}}
                        with torch.no_grad():
                            logits.append(torch.cat([adapter(_rows(flipped, s, eval_batch)).float() for s in range(0, len(at), eval_batch)]))
                        passes += len(at)
                    for k, v in outcome(torch.stack(logits, 1), p[at], y[at], base[at]).items():
                        found[k][at] = v
                for name, value in found.items():
                    add(f"counterfactual.{concept}{part}.{name}", value if part else value[:, 0])  # a null: (B, draws)
            add(f"counterfactual.{concept}.valid", valid)
            add(f"counterfactual.{concept}.label", torch.full((len(p),), -1) if cf.labels is None else cf.labels[rows].long())
        passes += game.passes
    arrays = {k: torch.cat(v).numpy() for k, v in parts.items()}
    arrays.update(ids=data.ids.numpy(), pred=pred.numpy(), label=labels.numpy(), margin=margin(base_logits, pred).numpy())
    details = {
        "modalities": list(adapter.modalities),
        "regions": [{"key": f"{m}.{r}", "modality": m, "region": r, "concept": data.concept_of(m, r)} for m, r in regions],
        "counterfactuals": list(data.counterfactuals),
        "null_sets": config.null_sets,
        "confidence": config.confidence,
        "forward_passes": passes,  # model inputs evaluated (the flow records the stage's seconds)
    }
    return StageResult(summarise(arrays, details), arrays, details)


def _rows(inputs: dict[str, torch.Tensor], start: int, size: int) -> dict[str, torch.Tensor]:
    return {m: x[start : start + size] for m, x in inputs.items()}


def summarise(arrays: dict[str, np.ndarray], details: dict) -> dict:
    """The stage's headline figures, from its per-sample arrays alone (so shards merge exactly)."""
    n = len(arrays["ids"])
    z = stats.z_value(details["confidence"])
    errors = arrays["pred"] != arrays["label"]
    out: dict = {"n": n, "null_sets": details["null_sets"], "confidence": details["confidence"], "regions": {}, "modalities": {}, "counterfactuals": {}}
    for reg in details["regions"]:
        a = {k[len(f"region.{reg['key']}.") :]: v for k, v in arrays.items() if k.startswith(f"region.{reg['key']}.")}
        has, valid = a["has"].astype(bool), a["null_valid"].astype(bool)
        flips = a["pred_after"] != arrays["pred"]
        null_flips = (a["null.pred_after"] != arrays["pred"][:, None]).mean(1)
        drop = arrays["margin"] - a["margin_after"]  # how much the region supported the prediction
        null_drop = (arrays["margin"][:, None] - a["null.margin_after"]).mean(1)
        fixes = a["pred_after"] == arrays["label"]
        null_fixes = (a["null.pred_after"] == arrays["label"][:, None]).mean(1)
        both, wrong = has & valid, has & errors
        out["regions"][reg["key"]] = {
            **{k: reg[k] for k in ("modality", "region", "concept")},
            "n": int(has.sum()),
            "units": round(float(a["size"][has].mean()), 3) if has.any() else None,
            "flip_rate": stats.rate(int(flips[has].sum()), int(has.sum()), z),
            "null_flip_rate": stats.interval(null_flips[both], z),
            # per sample: the region's flip minus the mean flip of its null sets
            "flip_effect": stats.interval(flips[both] - null_flips[both], z),
            "margin_drop": stats.interval(drop[has], z),
            "margin_effect": stats.interval(drop[both] - null_drop[both], z),
            "logit_change": {"pred": _round(a["d_pred"][has].mean()) if has.any() else None, "true": _round(a["d_true"][has].mean()) if has.any() else None},
            "fixes_error_rate": stats.rate(int(fixes[wrong].sum()), int(wrong.sum()), z),
            "null_fixes_error_rate": stats.interval(null_fixes[wrong & valid], z),
        }
    mods = details["modalities"]
    m = len(mods)
    v = torch.from_numpy(arrays["modality.pred"]).double()
    phi = attr.shapley_from_values(v, m).numpy()
    share = np.abs(phi) / np.clip(np.abs(phi).sum(1, keepdims=True), 1e-12, None)
    for j, name in enumerate(mods):
        after = arrays["modality.pred_after"][:, attr.without(j, m)]
        flips = after != arrays["pred"]
        out["modalities"][name] = {
            "shapley": _round(phi[:, j].mean()),
            "abs_shapley": _round(np.abs(phi[:, j]).mean()),
            "share": stats.interval(share[:, j], z),  # of the |modality Shapley values|: reliance in absolute terms
            "removal_flip_rate": stats.rate(int(flips.sum()), n, z),
            "removal_fixes_error_rate": stats.rate(int((after == arrays["label"])[errors].sum()), int(errors.sum()), z),
        }
    # the information each modality shows of the label that the model leaves unused, Bonferroni
    # over the modalities (stages/readout.py)
    blocks = {name: arrays[f"modality.features.{name}"] for name in mods}
    unused = readout.unused(arrays["modality.logits"], blocks, arrays["label"], stats.z_value(details["confidence"], m))
    for name, figures in (unused or {}).items():
        out["modalities"][name].update(figures)
    pairs, names = attr.pair_interactions(v, m)
    scale = np.abs(phi).sum(1).mean()
    out["pairs"] = {
        f"{mods[i]}×{mods[j]}": {"mean": _round(pairs[:, k].mean()), "abs_mean": _round(pairs[:, k].abs().mean()), "abs_share": _round(float(pairs[:, k].abs().mean()) / max(scale, 1e-12))}
        for k, (i, j) in enumerate(names)
    }
    for concept in details["counterfactuals"]:
        a = {k[len(f"counterfactual.{concept}.") :]: val for k, val in arrays.items() if k.startswith(f"counterfactual.{concept}.")}
        valid = a["valid"].astype(bool)
        known = valid & (a["label"] >= 0)
        kept = known & (a["label"] == arrays["label"])  # the flip leaves the label as it is
        flips = a["pred_after"] != arrays["pred"]
        out["counterfactuals"][concept] = {
            "n": int(valid.sum()),
            "flip_rate": stats.rate(int(flips[valid].sum()), int(valid.sum()), z),
            **(_against_null(a, arrays, valid, errors, z) if "null.pred_after" in a else {}),
            "label_changed_rate": stats.rate(int((known & ~kept).sum()), int(known.sum()), z),
            "flip_rate_label_kept": stats.rate(int(flips[kept].sum()), int(kept.sum()), z),
            "fixes_error_rate": stats.rate(int(((a["pred_after"] == arrays["label"]) & valid & errors & (kept | ~known)).sum()), int((valid & errors & (kept | ~known)).sum()), z),
            "logit_change": {"pred": _round(a["d_pred"][valid].mean()) if valid.any() else None},
        }
    out["forward_passes_per_sample"] = round(details["forward_passes"] / max(n, 1), 1)
    return out


def _against_null(a: dict, arrays: dict, valid: np.ndarray, errors: np.ndarray, z: float) -> dict:
    """A counterfactual with a null (the same rows changed as much at random, a few draws): its
    flips beyond the mean flip of its draws, per sample, and the errors the draws make right."""
    flips = (a["pred_after"] != arrays["pred"]).astype(float)
    null_flips = (a["null.pred_after"] != arrays["pred"][:, None]).mean(1)
    null_fixes = (a["null.pred_after"] == arrays["label"][:, None]).mean(1)
    return {
        "null_flip_rate": stats.interval(null_flips[valid], z),
        "flip_effect": stats.interval(flips[valid] - null_flips[valid], z),
        "null_fixes_error_rate": stats.interval(null_fixes[valid & errors], z),
    }


def _round(x, digits: int = 4) -> float:
    return round(float(x), digits)


def merge(parts: list[StageResult]) -> StageResult:
    arrays = {k: np.concatenate([p.arrays[k] for p in parts]) for k in parts[0].arrays}
    details = {**parts[0].details, "forward_passes": sum(p.details["forward_passes"] for p in parts)}
    return StageResult(summarise(arrays, details), arrays, details)


STAGE = Stage(
    "intervention",
    run,
    InterventionConfig,
    writes=("intervention.regions.<modality.region>", "intervention.modalities.<modality>", "intervention.pairs", "intervention.counterfactuals.<concept>"),
    modules=("mmdiag.stages.intervention", "mmdiag.stages.attribution", "mmdiag.stages.readout", "mmdiag.pipeline.stats"),
    merge=merge,
    summary=summaries.InterventionSummary,
)
