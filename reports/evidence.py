"""Per-error evidence cards and their categories.

A card gathers, for one error, what each stage says about it: where each modality's attribution
pointed (and how much of it fell on the truth regions), the strongest cross-modal unit pairs, the
concepts the error's slices involve and whether the decision layer reads them, and the features
(with their concepts) that pushed the prediction to the wrong class.

The category is the first of four rules that fires, in the order of the pipeline (an earlier
failure makes later evidence moot); each rule is a function of the card and the thresholds:

- perception: in some modality, the attribution on the relevant truth regions is no higher than
  their share of the units (enrichment <= `perception_enrichment`);
- interaction: the modalities hardly combine for this sample (stage 1's exact modality-level
  interaction <= `interaction_share` of the logit change), or the needed cross-modal pairs
  (relevant units of one modality x relevant units of the other) carry no more than their share
  of the |mixed interaction| (`interaction_enrichment`);
- representation: a concept defining an error slice that holds this error is not decodable at
  the decision layer (probe selectivity < `representation_selectivity`) or its features read
  the wrong value for this sample;
- composition: one concept's features give >= `composition_push_share` of the push towards the
  wrong class.

"Relevant" truth regions are all of a sample's regions except the shortcuts the findings name.
A rule whose evidence is missing (its stage did not run or did not cover this error) is skipped
and the card says so; an error no rule explains is "undetermined".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from reports import samples as sp
from reports.findings import decision_selectivity
from reports.slices import Slice
from reports.thresholds import DEFAULT, Thresholds
from stages.base import StageResult

CATEGORIES = ("perception", "interaction", "representation", "composition")


@dataclass
class Sources:
    """What the cards read, prepared once per analysis."""

    ev: sp.Evaluated
    summary: dict
    results: dict[str, StageResult]
    slices: list[tuple[str, Slice]]  # (slice id, slice)
    shortcut_regions: set[str]
    readings: dict[str, np.ndarray]  # concept -> value the decision features read, per data row
    pooled: dict = field(default_factory=dict)  # (modality, region, units) -> coverage of every sample

    def coverage(self, modality: str, region: str, row: int, n_units: int) -> np.ndarray | None:
        """A truth region pooled to units for one sample (pooled once for all samples)."""
        key = (modality, region, n_units)
        if key not in self.pooled:
            self.pooled[key] = sp.coverage(self.ev.data, modality, region, n_units)
        pooled = self.pooled[key]
        return None if pooled is None else pooled[row]

    def index(self, stage: str) -> dict[int, int]:
        """Sample id -> position in a stage's per-sample arrays."""
        result = self.results.get(stage)
        return {} if result is None or "ids" not in result.arrays else {int(i): k for k, i in enumerate(result.arrays["ids"])}


def _r(x) -> float:
    return round(float(x), 4)


def relevant_coverage(src: Sources, modality: str, row: int, n_units: int) -> tuple[np.ndarray | None, list[str]]:
    """Union of the sample's non-shortcut truth regions in a modality, pooled to units."""
    union, names = np.zeros(n_units, np.float32), []
    for region in src.ev.data.truth.get(modality, {}):
        if region in src.shortcut_regions:
            continue
        cov = src.coverage(modality, region, row, n_units)
        if cov is not None and cov.sum() > 0:
            union, names = np.maximum(union, cov), [*names, region]
    return (union if names else None), names


def enrichment(weights: np.ndarray, cover: np.ndarray, present: np.ndarray) -> dict | None:
    """Share of |weights| inside a (soft) region, over the region's share of the present units."""
    w, c = np.abs(weights) * present, cover * present
    if w.sum() <= 0 or c.sum() <= 0:
        return None
    mass, area = (w * c).sum() / w.sum(), c.sum() / present.sum()
    return {"mass": _r(mass), "area": _r(area), "enrichment": _r(mass / area)}


def perception_evidence(src: Sources, row: int, at: int) -> dict | None:
    """Per modality: the top units towards the prediction and the true class, the mass on each
    truth region, and on the relevant regions together. None where stage 1 skipped the sample
    (non-finite attributions)."""
    uni = src.results["unimodal"].arrays
    method = next(m for m in sp.METHODS if f"attr.{m}.pred" in uni)
    if not (np.isfinite(uni[f"attr.{method}.pred"][at]).all() and np.isfinite(uni[f"attr.{method}.true"][at]).all()):
        return None
    out = {"method": method, "modalities": {}}
    for modality, cols in sp.spans(src.ev.data, src.results).items():
        pred, true = uni[f"attr.{method}.pred"][at, cols], uni[f"attr.{method}.true"][at, cols]
        present = uni["present"][at, cols].astype(np.float32)
        n_units = len(pred)
        labels = sp.unit_labels(src.ev.data, modality, row, n_units)
        regions = {}
        for region in src.ev.data.truth.get(modality, {}):
            cov = src.coverage(modality, region, row, n_units)
            found = None if cov is None else enrichment(pred, cov, present)
            if found:
                regions[region] = found
        cover, names = relevant_coverage(src, modality, row, n_units)
        relevant = None if cover is None else enrichment(pred, cover, present)
        out["modalities"][modality] = {
            "top_pred": _top(pred, present, labels),
            "top_true": _top(true, present, labels),
            "regions": regions,
            "relevant": None if relevant is None else {"regions": names, **relevant},
        }
    return out


def _top(scores: np.ndarray, present: np.ndarray, labels: list[str], k: int = 3) -> list[dict]:
    order = [i for i in np.argsort(-scores) if present[i]][:k]
    return [{"unit": labels[i], "value": _r(scores[i])} for i in order]


def modality_interaction(src: Sources, at: int) -> dict | None:
    """Stage 1's exact modality-level interaction of this sample, as a share of what all its
    modalities together change in the logit (f(all) - f(none) = the modality Shapley values' sum)."""
    uni = src.results["unimodal"].arrays
    if not {"interaction", "modality_shapley"} <= set(uni):
        return None
    value, gap = float(uni["interaction"][at]), float(np.sum(uni["modality_shapley"][at]))
    if not (np.isfinite(value) and np.isfinite(gap)):
        return None
    return {"value": _r(value), "gap": _r(gap), "share": _r(abs(value) / max(abs(gap), 1e-12))}


def interaction_evidence(src: Sources, row: int, at: int, at_unimodal: int | None) -> dict:
    """The strongest cross-modal unit pairs, how much of the |mixed interaction| falls on the
    needed pairs (relevant units of both modalities), and the sample's modality-level interaction."""
    cross = src.results["crossmodal"].arrays
    out = {"pairs": [], "needed": {}}
    if at_unimodal is not None and "unimodal" in src.results:
        out["modality"] = modality_interaction(src, at_unimodal)
    for key in (k for k in cross if k.startswith("mixed.")):
        _, a, b = key.split(".")
        m = np.asarray(cross[key][at], np.float64)
        if not np.isfinite(m).all():
            continue
        la, lb = sp.unit_labels(src.ev.data, a, row, m.shape[0]), sp.unit_labels(src.ev.data, b, row, m.shape[1])
        for flat in np.argsort(-np.abs(m), axis=None)[:5]:
            i, j = np.unravel_index(flat, m.shape)
            if m[i, j] != 0:
                out["pairs"].append({"units": [la[i], lb[j]], "modalities": [a, b], "weight": _r(m[i, j])})
        ca, na = relevant_coverage(src, a, row, m.shape[0])
        cb, nb = relevant_coverage(src, b, row, m.shape[1])
        if ca is not None and cb is not None:
            # a unit with no interaction at all is absent (padding, special tokens)
            present = np.outer(np.abs(m).sum(1) > 0, np.abs(m).sum(0) > 0).astype(np.float64)
            found = enrichment(m, np.outer(ca, cb), present)
            if found:
                out["needed"][f"{a}×{b}"] = {"regions": [f"{a}:{r}" for r in na] + [f"{b}:{r}" for r in nb], **found}
    out["pairs"].sort(key=lambda p: -abs(p["weight"]))
    return out


def representation_evidence(src: Sources, row: int) -> dict:
    """The concepts of the error slices holding this error (not the label, clusters or shortcuts):
    their decision-layer selectivity and what the decision features read for this sample."""
    concepts = []
    for _, s in src.slices:
        if s.kind != "concept" or not s.mask[row]:
            continue
        for concept, _ in s.conditions:
            if concept == "label" or concept in src.shortcut_regions or any(c["concept"] == concept for c in concepts):
                continue
            value = int(src.ev.data.meta[concept][row])
            read = int(src.readings[concept][row]) if concept in src.readings else None
            concepts.append({"concept": concept, "value": value, "read": read, "selectivity": decision_selectivity(src.summary, concept)})
    return {"concepts": concepts}


def composition_evidence(src: Sources, row: int) -> dict | None:
    """The features pushing this error towards the predicted class over the true one (stage 4's
    `error.push` over the surrogate's support: contribution to the predicted class minus to the
    true class), grouped by concept."""
    comp = src.results["composition"].arrays
    if not {"error.ids", "error.push", "support"} <= set(comp):
        return None
    where = np.nonzero(np.asarray(comp["error.ids"]) == int(src.ev.data.ids[row]))[0]
    if not len(where):
        return None
    push = np.asarray(comp["error.push"][where[0]], np.float64)
    support = np.asarray(comp["support"]).astype(int)
    if not np.isfinite(push).all():
        return None
    concepts = sp.feature_concepts(src.summary)
    positive = np.clip(push, 0, None)
    if positive.sum() <= 0:
        return {"top": [], "by_concept": []}
    shares: dict[str | None, float] = {}
    for k in np.nonzero(positive)[0]:
        c = concepts.get(int(support[k]))
        shares[c] = shares.get(c, 0.0) + positive[k] / positive.sum()
    top = [{"feature": int(support[k]), "concept": concepts.get(int(support[k])), "push": _r(push[k])} for k in np.argsort(-push)[:5] if push[k] > 0]
    by_concept = sorted(({"concept": c, "share": _r(v)} for c, v in shares.items()), key=lambda x: -x["share"])
    return {"top": top, "by_concept": by_concept}


# --- the category rules: each returns (fired, figures), or None when its evidence is missing ---


def perception_rule(card: dict, t: Thresholds) -> tuple[bool, dict] | None:
    seen = card.get("perception")
    checked = [(m, e["relevant"]) for m, e in (seen or {}).get("modalities", {}).items() if e["relevant"]]
    if not checked:
        return None
    modality, worst = min(checked, key=lambda me: me[1]["enrichment"])
    figures = {"modality": modality, "method": seen["method"], **worst, "threshold": t.perception_enrichment}
    return worst["enrichment"] <= t.perception_enrichment, figures


def interaction_rule(card: dict, t: Thresholds) -> tuple[bool, dict] | None:
    """Fires when the modalities hardly combine at all for this sample (modality-level
    interaction <= `interaction_share` of the logit change), or when they do but not on the
    needed unit pairs. The first test matters for piecewise-linear (ReLU) models, whose mixed
    second derivatives are zero almost everywhere: no mixed interaction is no evidence there."""
    found = card.get("interaction") or {}
    modality, needed = found.get("modality"), found.get("needed")
    if modality is not None and modality["share"] <= t.interaction_share:
        return True, {"modality_interaction": modality, "threshold": t.interaction_share}
    if not needed:
        return None if modality is None else (False, {"modality_interaction": modality, "threshold": t.interaction_share})
    pair, worst = min(needed.items(), key=lambda kv: kv[1]["enrichment"])
    return worst["enrichment"] <= t.interaction_enrichment, {"pair": pair, **worst, "threshold": t.interaction_enrichment}


def representation_rule(card: dict, t: Thresholds) -> tuple[bool, dict] | None:
    concepts = (card.get("representation") or {}).get("concepts")
    if not concepts:
        return None
    for c in concepts:
        weak = c["selectivity"] is not None and c["selectivity"] < t.representation_selectivity
        if weak or (c["read"] is not None and c["read"] != c["value"]):
            return True, {**c, "threshold": t.representation_selectivity}
    return False, {"concepts": [c["concept"] for c in concepts], "threshold": t.representation_selectivity}


def composition_rule(card: dict, t: Thresholds) -> tuple[bool, dict] | None:
    comp = card.get("composition")
    if not comp or not comp["by_concept"]:
        return None
    named = [c for c in comp["by_concept"] if c["concept"] is not None]
    if not named:
        return False, {"concept": None, "threshold": t.composition_push_share}
    top = named[0]
    features = [f["feature"] for f in comp["top"] if f["concept"] == top["concept"]]
    return top["share"] >= t.composition_push_share, {**top, "features": features, "threshold": t.composition_push_share}


RULES = {"perception": perception_rule, "interaction": interaction_rule, "representation": representation_rule, "composition": composition_rule}
STAGE_OF = {"perception": "unimodal", "interaction": "crossmodal", "representation": "representation", "composition": "composition"}


def categorise(card: dict, t: Thresholds = DEFAULT) -> dict:
    """Sets card["category"], card["rule"] (the one that fired, with its figures) and
    card["checked"] (every rule: fired, not fired, or skipped and why)."""
    card["checked"], card["category"], card["rule"] = [], "undetermined", None
    for name, rule in RULES.items():
        verdict = rule(card, t)
        if verdict is None:
            card["checked"].append({"rule": name, "skipped": f"no {STAGE_OF[name]} evidence for this error"})
            continue
        fired, figures = verdict
        card["checked"].append({"rule": name, "fired": fired, "figures": figures})
        if fired:
            card["category"], card["rule"] = name, {"name": name, "figures": figures}
            break
    return card


def readings(summary: dict, results: dict[str, StageResult], ev: sp.Evaluated) -> dict[str, np.ndarray]:
    """Per binary concept with features assigned by stage 3: the value its features read for
    every sample (sign-aligned mean of the standardised feature activations, split at the
    midpoint of the two values' mean scores)."""
    rep = results.get("representation")
    decision = ev.in_data_order(rep, "decision") if rep is not None and "decision" in rep.arrays else None
    if decision is None:
        return {}
    decision = decision.astype(np.float64)
    z = (decision - decision.mean(0)) / (decision.std(0) + 1e-8)
    out = {}
    features = (summary.get("representation") or {}).get("features", [])
    for concept, values in sp.binary_concepts(ev.data).items():
        mine = [(int(f["feature"]), 1.0 if f["auroc"] >= 0.5 else -1.0) for f in features if f.get("concept") == concept and int(f["feature"]) < z.shape[1]]
        known = values >= 0
        if not mine or not (values[known] == 1).any() or not (values[known] == 0).any():
            continue
        score = np.mean([sign * z[:, f] for f, sign in mine], axis=0)
        cut = (score[values == 1].mean() + score[values == 0].mean()) / 2
        high = score[values == 1].mean() >= score[values == 0].mean()
        out[concept] = ((score > cut) == high).astype(int)
    return out


def card(src: Sources, row: int, at: dict[str, dict[int, int]], t: Thresholds = DEFAULT) -> dict:
    ev, sid = src.ev, int(src.ev.data.ids[row])
    out = {
        "id": sid,
        "row": int(row),
        "label": ev.class_name(int(ev.labels[row])),
        "pred": ev.class_name(int(ev.pred[row])),
        "confidence": _r(ev.probs[row, ev.pred[row]]),
        "slices": [i for i, s in src.slices if s.mask[row]],
    }
    found = {
        "perception": perception_evidence(src, row, at["unimodal"][sid]) if sid in at["unimodal"] else None,
        "interaction": interaction_evidence(src, row, at["crossmodal"][sid], at["unimodal"].get(sid)) if sid in at["crossmodal"] else None,
        "representation": representation_evidence(src, row) if "representation" in src.results else None,
        "composition": composition_evidence(src, row) if "composition" in src.results else None,
    }
    out.update({k: v for k, v in found.items() if v is not None})
    return categorise(out, t)


def cards(src: Sources, t: Thresholds = DEFAULT) -> list[dict]:
    """A categorised card for every error, most confident errors first."""
    at = {stage: src.index(stage) for stage in ("unimodal", "crossmodal")}
    rows = np.nonzero(src.ev.errors)[0]
    rows = rows[np.argsort(-src.ev.probs[rows, src.ev.pred[rows]], kind="stable")]
    return [card(src, int(r), at, t) for r in rows]
