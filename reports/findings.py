"""The findings that trigger debugging suggestions: one small rule per kind of bug.

Each rule reads stage summaries, stage arrays and the data's concepts, compares them with the
thresholds (reports/thresholds.py) and returns `Finding`s that record every figure it used.
A finding's `strength` is the share of the analysed samples at stake (roughly: the accuracy a
successful fix could regain), so strengths of different rules can be ranked together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

from reports import slices as sl
from reports.samples import Evaluated, binary_concepts, feature_concepts
from reports.thresholds import DEFAULT, Thresholds
from stages.base import StageResult


@dataclass
class Finding:
    rule: str  # shortcut | ignored_modality | missing_interaction | concept_not_encoded
    subject: str  # the concept, region or modality it is about
    strength: float  # share of the samples at stake, in [0, 1]
    figures: dict = field(default_factory=dict)
    action: dict = field(default_factory=dict)


def _round(x: float, digits: int = 4) -> float:
    return round(float(x), digits)


def region_enrichment(summary: dict, region: str) -> tuple[float, str | None, str | None]:
    """(best enrichment over stage 1's methods, that method, the truth key) of a truth region
    named `region` (stage 1 keys a region by its name, or `modality.name` when two modalities
    share it)."""
    best, method, key = 0.0, None, None
    for name, m in (summary.get("unimodal") or {}).get("methods", {}).items():
        for k, t in (m.get("truth") or {}).items():
            if (k == region or k.endswith(f".{region}")) and t.get("enrichment") is not None and t["enrichment"] > best:
                best, method, key = float(t["enrichment"]), name, k
    return best, method, key


def weight_share(summary: dict, results: dict[str, StageResult], concept: str) -> float | None:
    """Share of the composition's |weights| (all classes) on the features assigned to a concept."""
    comp = results.get("composition")
    if comp is None or not {"weights", "support"} <= set(comp.arrays):
        return None
    # the chosen surrogate's weights (C, S) over its support (S feature ids)
    w = np.abs(np.asarray(comp.arrays["weights"], np.float64)).sum(0)
    support = np.asarray(comp.arrays["support"]).astype(int)
    concepts = feature_concepts(summary)
    mine = [k for k, f in enumerate(support) if concepts.get(int(f)) == concept]
    return float(w[mine].sum() / w.sum()) if mine and w.sum() > 0 else None


def shortcuts(summary: dict, results: dict[str, StageResult], ev: Evaluated, t: Thresholds = DEFAULT) -> list[Finding]:
    """A binary concept the model follows against the label: where the concept disagrees with the
    label the error rate is clearly higher (Wilson lower bound above the base rate, and at least
    `shortcut_gap` above where it agrees), and the model's attribution piles on it (its truth
    region's enrichment >= `shortcut_enrichment`, or its features carry >= `shortcut_weight_share`
    of the composition's weights). Needs two classes."""
    if len(np.unique(ev.labels)) != 2:
        return []
    concepts = binary_concepts(ev.data)
    z = sl.z_value(t.confidence, len(concepts))
    found = []
    for concept, values in concepts.items():
        known = values >= 0
        disagree, agree = known & (values != ev.labels), known & (values == ev.labels)
        if disagree.sum() < t.min_support or agree.sum() < t.min_support:
            continue
        err_d, err_a = ev.errors[disagree].mean(), ev.errors[agree].mean()
        low, _ = sl.wilson(ev.errors[disagree].sum(), disagree.sum(), z)
        enrichment, method, region = region_enrichment(summary, concept)
        share = weight_share(summary, results, concept)
        attributed = enrichment >= t.shortcut_enrichment or (share or 0) >= t.shortcut_weight_share
        if low <= ev.error_rate or err_d - err_a < t.shortcut_gap or not attributed:
            continue
        at_stake = disagree.sum() / known.sum() * (err_d - err_a)
        figures = {
            "where": f"{concept}≠label",
            "n_disagree": int(disagree.sum()),
            "error_rate_disagree": _round(err_d),
            "error_rate_agree": _round(err_a),
            "ci_low_disagree": _round(low),
            "base_error_rate": _round(ev.error_rate),
            "follows": _round((ev.pred[known] == values[known]).mean()),  # how often the prediction equals the concept
            "enrichment": _round(enrichment, 3) if method else None,
            "method": method,
            "weight_share": None if share is None else _round(share),
        }
        action = {"kind": "decorrelate", "concept": concept}
        if region:
            action.update(region=concept, modality=_region_modality(ev, concept))
        found.append(Finding("shortcut", concept, float(at_stake), figures, action))
    return found


def _region_modality(ev: Evaluated, region: str) -> str | None:
    return next((m for m, regions in ev.data.truth.items() if region in regions), None)


def ignored_modalities(summary: dict, ev: Evaluated, t: Thresholds = DEFAULT) -> list[Finding]:
    """A modality whose MM-SHAP share, or whose share of the |modality Shapley values|, is below
    `ignored_share`, while the model errs on at least `min_error_rate` of the samples."""
    uni = summary.get("unimodal") or {}
    shares = {m: s["mean"] for m, s in (uni.get("modality_share") or {}).items() if s.get("mean") is not None}
    ablation = {m: v["abs_shapley"] for m, v in (uni.get("modality_ablation") or {}).items() if m != "interaction" and v.get("abs_shapley") is not None}
    total = sum(ablation.values())
    ablation_share = {m: v / total for m, v in ablation.items()} if total > 0 else {}
    names = set(shares) | set(ablation_share)
    if len(names) < 2 or ev.error_rate < t.min_error_rate:
        return []
    found = []
    for m in sorted(names):
        share = min(v for v in (shares.get(m), ablation_share.get(m)) if v is not None)
        if share < t.ignored_share:
            figures = {"modality_share": shares.get(m), "ablation_share": None if m not in ablation_share else _round(ablation_share[m]), "error_rate": _round(ev.error_rate)}
            strength = ev.error_rate * (1 - share / t.ignored_share)
            found.append(Finding("ignored_modality", m, strength, figures, {"kind": "modality_dropout", "modality": m}))
    return found


def purity(cells: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of predicting the majority label of each cell."""
    hits = 0
    for c in np.unique(cells):
        hits += np.bincount(labels[cells == c]).max()
    return hits / len(labels)


def label_derived(meta: dict[str, np.ndarray], labels: np.ndarray) -> set[str]:
    """Binary concepts that say whether another concept agrees with the label (such as the demo's
    `shortcut_agrees`): with that other concept they give the label away, so they are no
    evidence about the data. The relation is symmetric, so both concepts of such a pair are
    named."""
    binary = {n: v for n, v in meta.items() if set(np.unique(v[v >= 0]).tolist()) == {0, 1}}
    return {c for c, v in binary.items() for d, w in binary.items() if c != d and np.mean(v == (w == labels)) >= 0.99}


def label_needs_pairs(data_meta: dict[str, np.ndarray], labels: np.ndarray) -> dict:
    """How much better the best pair of concepts predicts the label than the best single one
    (majority label per cell, samples with every concept known, concepts derived from the label
    left out): an XOR-like rule needs both."""
    derived = label_derived(data_meta, labels)
    data_meta = {n: v for n, v in data_meta.items() if n not in derived}
    names = list(data_meta)
    known = np.all([data_meta[n] >= 0 for n in names], axis=0) if names else np.zeros(len(labels), bool)
    if len(names) < 2 or known.sum() == 0:
        return {"single": None, "pair": None, "gain": 0.0}
    y = labels[known]
    meta = {n: v[known] for n, v in data_meta.items()}
    single = max(purity(meta[n], y) for n in names)
    best_pair, pair = max(((purity(meta[a] * (meta[b].max() + 1) + meta[b], y), (a, b)) for a, b in combinations(names, 2)))
    return {"single": _round(single), "pair": _round(best_pair), "pair_concepts": list(pair), "gain": _round(best_pair - single)}


def missing_interaction(summary: dict, results: dict[str, StageResult], ev: Evaluated, t: Thresholds = DEFAULT) -> list[Finding]:
    """The model behaves additively (EMAP: the additive projection is within `additive_gap` of
    the full model's accuracy) while the data needs interaction (a pair of concepts predicts the
    label at least `interaction_gain` better than any single concept), and it errs on at least
    `min_error_rate` of the samples."""
    cross = summary.get("crossmodal") or {}
    full, additive = cross.get("full_accuracy"), cross.get("additive_accuracy")
    if full is None or additive is None or ev.error_rate < t.min_error_rate:
        return []
    meta = {n: v.numpy() for n, v in ev.data.meta.items() if len(np.unique(v.numpy())) <= t.max_values}
    needs = label_needs_pairs(meta, ev.labels)
    if full - additive > t.additive_gap or needs["gain"] < t.interaction_gain:
        return []
    figures = {
        "full_accuracy": full,
        "additive_accuracy": additive,
        "gap": _round(full - additive),
        "error_rate": _round(ev.error_rate),
        "label_from_one_concept": needs["single"],
        "label_from_two_concepts": needs["pair"],
        "pair": needs.get("pair_concepts"),
        "rescued": rescue_rate(results.get("crossmodal"), ev),
    }
    if cross.get("additive_follows"):
        concept, rate = max(cross["additive_follows"].items(), key=lambda kv: kv[1])
        figures["additive_follows"] = {"concept": concept, "rate": rate}
    return [Finding("missing_interaction", "fusion", ev.error_rate, figures, {"kind": "interaction_fusion", "options": ["film", "cross_attention"]})]


def rescue_rate(cross: StageResult | None, ev: Evaluated) -> float | None:
    """How often the full model is right where its additive projection is wrong (EMAP reference
    samples): near 0, the model's interaction part adds nothing."""
    if cross is None or not {"emap.ids", "emap.full", "emap.additive"} <= set(cross.arrays):
        return None
    labels = ev.labels[ev.rows(cross.arrays["emap.ids"])]
    wrong = cross.arrays["emap.additive"].argmax(1) != labels
    return _round((cross.arrays["emap.full"].argmax(1)[wrong] == labels[wrong]).mean()) if wrong.any() else None


def decision_selectivity(summary: dict, concept: str) -> float | None:
    """Probe selectivity at the decision layer (or the best layer when there is none)."""
    layers = ((summary.get("representation") or {}).get("probes") or {}).get(concept)
    if not layers:
        return None
    if "decision" in layers:
        return layers["decision"].get("selectivity")
    return max(v.get("selectivity", 0) for v in layers.values())


def concepts_not_encoded(summary: dict, ev: Evaluated, found: list[sl.Slice], shortcut_concepts: set[str], t: Thresholds = DEFAULT) -> list[Finding]:
    """A concept that defines an error slice (not a shortcut, not the label) whose decision-layer
    probe selectivity is below `probe_selectivity`: errors concentrate on it and the model does
    not encode it."""
    worst: dict[str, sl.Slice] = {}
    for s in found:
        for concept, _ in s.conditions:
            if s.kind == "concept" and concept != "label" and concept not in shortcut_concepts:
                if concept not in worst or _excess(worst[concept], ev) < _excess(s, ev):
                    worst[concept] = s
    out = []
    for concept, s in worst.items():
        sel = decision_selectivity(summary, concept)
        if sel is None or sel >= t.probe_selectivity:
            continue
        strength = _excess(s, ev) * (1 - max(sel, 0) / t.probe_selectivity)
        figures = {"selectivity": sel, "slice": s.where, "slice_error_rate": _round(s.error_rate), "base_error_rate": _round(ev.error_rate), "n": s.n}
        out.append(Finding("concept_not_encoded", concept, strength, figures, {"kind": "concept_data", "concept": concept}))
    return out


def _excess(s: sl.Slice, ev: Evaluated) -> float:
    """The slice's errors beyond the base rate, as a share of all samples."""
    return s.n * (s.error_rate - ev.error_rate) / len(ev.labels)


def detect(summary: dict, results: dict[str, StageResult], ev: Evaluated, found: list[sl.Slice], t: Thresholds = DEFAULT) -> list[Finding]:
    cuts = shortcuts(summary, results, ev, t)
    return [
        *cuts,
        *ignored_modalities(summary, ev, t),
        *missing_interaction(summary, results, ev, t),
        *concepts_not_encoded(summary, ev, found, {f.subject for f in cuts}, t),
    ]
