"""Does the model rely on a concept? Each test compares what the concept's evidence shows with a
null of the same size, so that one token among four and one patch among 64 are judged alike:

- intervention: removing the concept's truth region flips more predictions (or lowers the
  predicted class's margin more) than removing as many random units of the same modality
  (stage `intervention`, every analysed sample);
- counterfactual: flipping the concept while the label stays flips predictions;
- attribution: the region's share of |attribution| ranks above random unit sets of its size
  (per sample: the share of random same-size sets it beats; 0.5 under the null);
- composition: the concept's features carry more of the surrogate's |weights| than random
  feature sets of their number.

And is the concept a cause of the label at all? `causal` asks the data: the few concepts that
predict the label best on a held-out half include it, whatever the label noise.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

from mmdiag.pipeline import stats
from mmdiag.reports import samples as sp
from mmdiag.stages.base import StageResult

NULL_DRAWS = 200  # random unit or feature sets per sample for the attribution and weight nulls


def _r(x, digits: int = 4):
    return None if x is None else round(float(x), digits)


def linked_regions(ev: sp.Evaluated, concept: str) -> list[tuple[str, str]]:
    """The (modality, region) truth regions that show a concept."""
    return [(m, r) for m, regions in ev.data.truth.items() for r in regions if ev.data.concept_of(m, r) == concept]


def _low(effect: dict, stage_z: float, z: float) -> float:
    """The lower end of a stage's normal interval of a mean, re-drawn at `z` (the rule's level,
    corrected for the number of things it tests) from the stage's own half-width."""
    if effect["value"] is None or effect["high"] is None:
        return float("-inf")
    return effect["value"] - (effect["high"] - effect["value"]) / stage_z * z


def intervention(summary: dict, regions: list[tuple[str, str]], z: float | None = None) -> dict | None:
    """The strongest linked region's intervention figures, and whether they beat the null: the
    lower end of the flip or margin effect's interval above 0, at `z` (the caller's level,
    Bonferroni over every concept and region it tests; None: the stage's own level)."""
    stage = summary.get("intervention") or {}
    found = stage.get("regions") or {}
    stage_z = stats.z_value(stage.get("confidence", 0.95))
    z = stage_z if z is None else z
    best = None
    for m, r in regions:
        g = found.get(f"{m}.{r}")
        if not g or not g["n"] or g["flip_effect"]["value"] is None:
            continue
        record = {
            "region": f"{m}.{r}",
            "n": g["n"],
            "units": g["units"],
            "flip_rate": g["flip_rate"]["value"],
            "null_flip_rate": g["null_flip_rate"]["value"],
            "flip_effect": g["flip_effect"],
            "margin_effect": g["margin_effect"],
            "fixes_error_rate": g["fixes_error_rate"]["value"],
            "null_fixes_error_rate": g["null_fixes_error_rate"]["value"],
            "tested_at_z": _r(z),
        }
        record["beyond_null"] = bool(_low(g["flip_effect"], stage_z, z) > 0 or _low(g["margin_effect"], stage_z, z) > 0)
        if best is None or record["flip_effect"]["value"] > best["flip_effect"]["value"]:
            best = record
    return best


def counterfactual(summary: dict, concept: str, z: float | None = None) -> dict | None:
    """Flipping the concept while the label stays: how often the prediction flips (the lower end
    of its Wilson interval at `z` above 0 means the model follows the concept where it should
    not); where the label is unknown and the data gives a null change, how many more
    predictions the flip changes than the null does (the lower end at `z` above 0)."""
    stage = summary.get("intervention") or {}
    g = (stage.get("counterfactuals") or {}).get(concept)
    if not g:
        return None
    stage_z = stats.z_value(stage.get("confidence", 0.95))
    z = stage_z if z is None else z
    kept = g["flip_rate_label_kept"]
    if kept["n"]:
        low, _ = stats.wilson(round(kept["value"] * kept["n"]), kept["n"], z)
        return {"flip_rate_label_kept": kept, "fixes_error_rate": g["fixes_error_rate"]["value"], "tested_at_z": _r(z), "beyond_null": bool(low > 0)}
    effect = g.get("flip_effect")
    if effect and effect["n"]:  # the label unknown, a null beside it (a transform discovery found): flips beyond a random change as large
        return {
            "flip_rate": g["flip_rate"]["value"],
            "null_flip_rate": g["null_flip_rate"]["value"],
            "flip_effect": effect,
            "n": effect["n"],
            "fixes_error_rate": g["fixes_error_rate"]["value"],
            "null_fixes_error_rate": g["null_fixes_error_rate"]["value"],
            "tested_at_z": _r(z),
            "beyond_null": bool(_low(effect, stage_z, z) > 0),
        }
    return None


def attribution_rank(mass_of: np.ndarray, region: np.ndarray, present: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per sample: the share of random unit sets of the region's size (among the present units
    outside it) whose |attribution| mass the region's exceeds (ties count half); NaN where the
    region is absent or fills the modality."""
    out = np.full(len(mass_of), np.nan)
    for i in range(len(mass_of)):
        inside = region[i] & present[i]
        outside = np.flatnonzero(present[i] & ~inside)
        k = int(inside.sum())
        if k == 0 or len(outside) < k:
            continue
        own = mass_of[i, inside].sum()
        draws = np.argsort(rng.random((NULL_DRAWS, len(outside))), axis=1)[:, :k]
        null = mass_of[i, outside[draws]].sum(1)
        out[i] = (null < own).mean() + 0.5 * (null == own).mean()
    return out


def attribution(results: dict[str, StageResult], ev: sp.Evaluated, regions: list[tuple[str, str]], z: float, seed: int = 0) -> dict | None:
    """Stage 1's attribution on the concept's best linked region against random same-size unit
    sets: the mean per-sample rank (0.5 under the null) with its interval."""
    uni = results.get("unimodal")
    if uni is None or not regions:
        return None
    method = sp.card_method(uni)
    if method is None:
        return None
    spans = sp.spans(ev.data, results)
    rows = ev.rows(uni.arrays["ids"])
    rng = np.random.default_rng(seed)
    best = None
    for m, r in regions:
        cols = spans[m]
        scores = np.abs(np.asarray(uni.arrays[f"attr.{method}.pred"])[:, cols])
        present = np.asarray(uni.arrays["present"])[:, cols].astype(bool)
        cover = sp.coverage(ev.data, m, r, cols.stop - cols.start)
        if cover is None:
            continue
        ranks = attribution_rank(np.where(np.isfinite(scores), scores, 0.0), cover[rows] > 0, present, rng)
        found = stats.interval(ranks, z)
        if not found["n"]:
            continue
        record = {"region": f"{m}.{r}", "method": method, "rank": found, "beyond_null": bool(found["low"] > 0.5)}
        if best is None or found["value"] > best["rank"]["value"]:
            best = record
    return best


def composition(summary: dict, results: dict[str, StageResult], concept: str, tests: int, seed: int = 0) -> dict | None:
    """Share of the composition's |weights| on the concept's features against random feature sets
    of the same number from the surrogate's support (one-sided p-value, Bonferroni over `tests`)."""
    comp = results.get("composition")
    if comp is None or not {"weights", "support"} <= set(comp.arrays):
        return None
    support = np.asarray(comp.arrays["support"]).astype(int)
    w = np.abs(np.asarray(comp.arrays["weights"], np.float64)).sum(0)[support]  # (C, all features) -> the support's
    concepts = sp.feature_concepts(summary)
    mine = np.array([concepts.get(int(f)) == concept for f in support])
    if not mine.any() or w.sum() <= 0 or mine.all():
        return None
    share = w[mine].sum() / w.sum()
    rng = np.random.default_rng(seed)
    draws = np.argsort(rng.random((NULL_DRAWS * 10, len(w))), axis=1)[:, : mine.sum()]
    null = w[draws].sum(1) / w.sum()
    p = (1 + (null >= share).sum()) / (1 + len(null))
    return {"weight_share": _r(share), "null_weight_share": _r(null.mean()), "p_value": _r(p), "beyond_null": bool(p * max(tests, 1) < 0.05)}


def _cells(meta: dict[str, np.ndarray], combo: tuple[str, ...], rows: np.ndarray) -> np.ndarray:
    """One integer per sample for the combination of the concepts' values (unknown, -1, is a value
    of its own)."""
    cells = np.zeros(len(rows), np.int64)
    for c in combo:
        v = meta[c][rows] + 1
        cells = cells * (int(meta[c].max()) + 2) + v
    return cells


def _held_out_hits(meta: dict[str, np.ndarray], combo: tuple[str, ...], labels: np.ndarray, fit: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Per test sample: whether the majority label of its cell among the fit samples (the fit
    samples' majority where the cell is new) is its label."""
    fit_cells, test_cells = _cells(meta, combo, fit), _cells(meta, combo, test)
    k = int(labels.max()) + 1
    keys, inverse = np.unique(np.concatenate([fit_cells, test_cells]), return_inverse=True)
    counts = np.zeros((len(keys), k))
    np.add.at(counts, (inverse[: len(fit)], labels[fit]), 1)
    majority = np.where(counts.sum(1) > 0, counts.argmax(1), np.bincount(labels[fit], minlength=k).argmax())
    return majority[inverse[len(fit) :]] == labels[test]


def determining_sets(meta: dict[str, np.ndarray], labels: np.ndarray, size: int = 3, confidence: float = 0.95, per_cell: int = 5, seed: int = 0) -> list[tuple[str, ...]]:
    """The smallest sets of at most `size` concepts that predict the label as well as any such set
    does, judged on a held-out half: the majority label of each cell of their values, learnt on one
    half of the samples, is right on the other half not significantly less often than the best
    set's (one-sided sign test on the samples where the two disagree, Bonferroni over the sets
    compared), best first. Label mistakes lower every set's held-out accuracy alike, so the
    label's causes still win with noisy labels, where asking for a (nearly) pure function of them
    would find nothing. The empty set (the majority label) is a set too: `[()]` where it is the
    best, no concept telling the label; `[]` (cannot tell) where a concept set does best but not
    significantly better than the empty set, as on a few dozen samples. Sets that split the fit
    half into cells of fewer than `per_cell` samples on average are not tried."""
    from scipy.stats import binom

    names = sorted(meta)
    order = np.random.default_rng(seed).permutation(len(labels))
    fit, test = np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2 :])
    hits = {}
    for k in range(size + 1):
        for combo in combinations(names, k):
            if int(np.prod([len(np.unique(meta[c])) for c in combo])) * per_cell <= len(fit):
                hits[combo] = _held_out_hits(meta, combo, labels, fit, test)
    if not hits:
        return []
    best = max(hits, key=lambda c: (hits[c].sum(), -len(c)))
    alpha = (1 - confidence) / max(len(hits) - 1, 1)
    out = []
    for combo, h in hits.items():  # smallest first
        if any(set(s) <= set(combo) for s in out):
            continue
        worse, better = int((hits[best] & ~h).sum()), int((h & ~hits[best]).sum())
        if worse == 0 or binom.sf(worse - 1, worse + better, 0.5) >= alpha:
            out.append(combo)
    if out == [()] and best != ():
        return []  # a concept set does best, but not demonstrably: the data cannot tell
    return sorted(out, key=lambda c: (-hits[c].sum(), len(c)))


def consensus(meta: dict, labels: np.ndarray, sets: list[tuple[str, ...]], confidence: float = 0.95) -> np.ndarray | None:
    """Per sample, the label the concepts of the best determining set (`determining_sets` lists
    it first) give it: its cell's majority label, where that majority is significant (one-sided
    binomial test against one half); -1 elsewhere. None when no concept determines the label."""
    from scipy.stats import binom

    if not sets or not sets[0]:
        return None
    values = {c: np.asarray(meta[c]) for c in sets[0]}
    cells = _cells(values, sets[0], np.arange(len(labels)))
    out = np.full(len(labels), -1)
    for cell in np.unique(cells):
        rows = cells == cell
        counts = np.bincount(labels[rows])
        top = int(counts.argmax())
        if binom.sf(counts[top] - 1, rows.sum(), 0.5) < 1 - confidence:
            out[rows] = top
    return out


def causal(concept: str, sets: list[tuple[str, ...]], counterfactual_figures: dict | None) -> bool | None:
    """True when the concept is a cause of the label: a counterfactual that flips it changes the
    label for most samples, or every set that predicts the label best (`determining_sets`) holds
    it. False when one of those sets leaves it out (`[()]`: no concept tells the label), or the
    counterfactual keeps the label; None when the data cannot tell (`[]`)."""
    if counterfactual_figures is not None and counterfactual_figures.get("label_changed_rate", {}).get("value") is not None:
        return counterfactual_figures["label_changed_rate"]["value"] > 0.5
    if not sets:
        return None
    return all(concept in s for s in sets)
