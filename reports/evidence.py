"""Per-error evidence cards and their causes.

A card gathers, for one error, what the interventions and each stage say about it: what removing
each truth region (or flipping a concept) did to this prediction against removing as many random
units, where each modality's attribution pointed, the strongest cross-modal unit pairs, the
concepts the error's slices involve and whether the decision layer reads them, and the features
(with their concepts) that pushed the prediction to the wrong class.

The cause is the first of seven rules that fires; each rule is a function of the card and the
thresholds:

- shortcut: a shortcut finding's concept points to the predicted class against the label, and
  removing its region (or flipping it) makes this prediction right, or moves it towards the
  true class more than every one of its null removals (a counterfactual with a null, a found
  transform's random changes as large: more than their median); where no intervention applies
  to this sample (the region is absent, no counterfactual), following the concept is an
  association only;
- ignored_modality: a modality the findings call ignored shows what this sample needs (its
  relevant truth regions) and removing it does not change this prediction;
- label: confident learning (reports/label_issues.py) flags the error as a likely label mistake,
  no intervention above showed it to be a model error, most of the sample's null removals
  (random units) keep the prediction (without null removals, confident learning alone is an
  association), and where the data's concepts determine the label
  (reliance.determining_sets), the label they give this sample (its cell's majority) is the
  model's answer, not the given label;
- perception: in some modality, removing the relevant truth regions lowers the predicted class's
  margin no more than the median of as many random units (without interventions: their
  attribution is no higher than their share of the units, enrichment <= `perception_enrichment`);
- interaction: the data needs the modalities combined (a missing_interaction finding) and the
  model's additive part alone (from the 2^M modality ablations) gives this wrong answer, or the
  needed cross-modal pairs carry no more than their share of the |mixed interaction|
  (`interaction_enrichment`);
- representation: a concept defining an error slice that holds this error is not decodable at
  the decision layer (its probe does not beat its control task: findings.encoding) or its features read
  the wrong value for this sample;
- composition: one concept's features give more of the push towards the wrong class than as
  many random features of the surrogate would (an association, never a cause).

"Relevant" truth regions are all of a sample's regions except the shortcuts the findings name.
A rule whose evidence is missing is skipped and the card says so; an error no rule explains is
"undetermined". Each fired rule records its figures and a sentence a reader can check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from mmdiag.pipeline.registry import Registry
from mmdiag.reports import reliance as rl
from mmdiag.reports import samples as sp
from mmdiag.reports.findings import Finding, encoding
from mmdiag.reports.slices import Slice
from mmdiag.reports.thresholds import DEFAULT, Thresholds
from mmdiag.stages import attribution as attr
from mmdiag.stages.base import StageResult


@dataclass
class Sources:
    """What the cards read, prepared once per analysis."""

    ev: sp.Evaluated
    summary: dict
    results: dict[str, StageResult]
    slices: list[tuple[str, Slice]]  # (slice id, slice)
    shortcut_regions: set[str]  # regions (and concepts) set aside: shortcuts, and regions whose concept does not matter for the label
    readings: dict[str, np.ndarray]  # concept -> value the decision features read, per data row
    findings: list[Finding] = field(default_factory=list)
    # data row -> its rank among the likely label mistakes (confident learning), 1 first
    label_issues: dict[int, int] = field(default_factory=dict)
    # per data row, the label the concepts that determine it give (-1: unknown), reliance.consensus
    consensus: np.ndarray | None = None
    # out-of-fold probabilities of a readout refitted to this split's labels (label_issues.cross_fitted),
    # and per row the other class its neighbours carry beyond chance (label_issues.neighbours_say,
    # -1: none); None without stage 3's decision features
    refit: np.ndarray | None = None
    refit_other: np.ndarray | None = None
    pooled: dict = field(default_factory=dict)  # (modality, region, units) -> coverage of every sample

    def of_rule(self, rule: str) -> list[Finding]:
        return [f for f in self.findings if f.rule == rule]

    def intervened(self, key: str, row: int) -> dict | None:
        """One region's (or `counterfactual.<concept>`'s) intervention on a data row: the
        arrays of stage `intervention` at that sample."""
        result = self.results.get("intervention")
        if result is None:
            return None
        at = self.index("intervention").get(int(self.ev.data.ids[row]))
        prefix = key if key.startswith("counterfactual.") else f"region.{key}"
        found = {k[len(prefix) + 1 :]: np.asarray(v)[at] for k, v in result.arrays.items() if k.startswith(prefix + ".")}
        return found or None

    def coverage(self, modality: str, region: str, row: int, n_units: int) -> np.ndarray | None:
        """A truth region pooled to units for one sample (pooled once for all samples)."""
        key = (modality, region, n_units)
        if key not in self.pooled:
            self.pooled[key] = sp.coverage(self.ev.data, modality, region, n_units)
        pooled = self.pooled[key]
        return None if pooled is None else pooled[row]

    def index(self, stage: str) -> dict[int, int]:
        """Sample id -> position in a stage's per-sample arrays (built once per stage)."""
        if ("index", stage) not in self.pooled:
            result = self.results.get(stage)
            self.pooled[("index", stage)] = {} if result is None or "ids" not in result.arrays else {int(i): k for k, i in enumerate(result.arrays["ids"])}
        return self.pooled[("index", stage)]


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


def region_effect(src: Sources, key: str, row: int) -> dict | None:
    """What removing one truth region did to this prediction, beside its null removals (as many
    random units of the same modality): whether it made the prediction right, how far it moved
    the true class's logit against the predicted one, how much of the predicted class's margin
    it took."""
    a = src.intervened(key, row)
    if a is None or not a["has"]:
        return None
    at = src.index("intervention")[int(src.ev.data.ids[row])]
    label, base = int(src.ev.labels[row]), float(src.results["intervention"].arrays["margin"][at])
    valid = bool(a["null_valid"])
    toward, null_toward = a["d_true"] - a["d_pred"], a["null.d_true"] - a["null.d_pred"]
    return {
        "region": key,
        "units": int(a["size"]),
        "fixes": bool(a["pred_after"] == label),
        "flips": bool(a["pred_after"] != src.ev.pred[row]),
        "towards_truth": _r(toward),
        "null_towards_truth_max": _r(null_toward.max()) if valid else None,
        "null_fixes": _r((a["null.pred_after"] == label).mean()) if valid else None,
        "margin_drop": _r(base - a["margin_after"]),
        "null_margin_drop_median": _r(np.median(base - a["null.margin_after"])) if valid else None,
    }


def counterfactual_effect(src: Sources, concept: str, row: int) -> dict | None:
    """What flipping the concept did to this prediction, where the data supplies the flip and
    the label stays (or is unknown)."""
    a = src.intervened(f"counterfactual.{concept}", row)
    if a is None or not a["valid"] or (a["label"] >= 0 and a["label"] != src.ev.labels[row]):
        return None
    out = {"concept": concept, "fixes": bool(a["pred_after"] == src.ev.labels[row]), "towards_truth": _r(a["d_true"] - a["d_pred"])}
    if "null.pred_after" in a:  # a change with a null: a typical random change as large must do less
        out["null_fixes"] = _r((a["null.pred_after"] == src.ev.labels[row]).mean())
        out["null_towards_truth_median"] = _r(np.median(a["null.d_true"] - a["null.d_pred"]))
    return out


def _relevant_regions(src: Sources, modality: str, row: int) -> list[str]:
    return [r for r, mask in src.ev.data.truth.get(modality, {}).items() if r not in src.shortcut_regions and bool(mask[row].any())]


def shortcut_evidence(src: Sources, row: int) -> dict | None:
    """For each shortcut finding whose concept points to this error's predicted class against
    its label: what removing the concept's regions and flipping it did to this prediction."""
    found = src.of_rule("shortcut")
    if not found:
        return None
    ev, out = src.ev, []
    for f in found:
        v = int(f.points_to[row])
        if v < 0 or v == ev.labels[row] or v != ev.pred[row]:
            continue
        keys = [f"{m}.{r}" for m, r in rl.linked_regions(ev, f.subject)]
        effects = [e for e in (region_effect(src, k, row) for k in keys) if e is not None]
        out.append({"concept": f.subject, "points_to": ev.class_name(v), "regions": effects, "counterfactual": counterfactual_effect(src, f.subject, row)})
    return {"concepts": out, "findings": [f.subject for f in found]}


def ignored_evidence(src: Sources, row: int) -> dict | None:
    """For each modality the findings call ignored: whether this sample needs it (relevant truth
    regions in it) and whether removing it changes this prediction."""
    found = src.of_rule("ignored_modality")
    result = src.results.get("intervention")
    if not found or result is None:
        return None
    at = src.index("intervention")[int(src.ev.data.ids[row])]
    mods = result.details["modalities"]
    fusion = next((f for f in src.findings if f.rule == "missing_interaction"), None)
    pair = ((fusion.figures.get("modalities") or {}).get("pair") or []) if fusion else []
    out = []
    for f in found:
        if fusion is not None and (f.subject in pair or not pair):
            continue  # an additive model cannot use a modality that matters only with another: the interaction rule decides
        without = attr.without(mods.index(f.subject), len(mods))
        out.append(
            {
                "modality": f.subject,
                "share": f.figures["share"]["value"],
                "regions": _relevant_regions(src, f.subject, row),
                "has_truth": bool(src.ev.data.truth.get(f.subject)),
                "removal_changes_prediction": bool(result.arrays["modality.pred_after"][at, without] != src.ev.pred[row]),
                "removal_logit_change": _r(result.arrays["modality.pred"][at, without] - result.arrays["modality.pred"][at, -1]),
            }
        )
    return {"modalities": out} if out else None


def prior_evidence(src: Sources, row: int) -> dict | None:
    """For the prior findings whose slice holds this sample (a word of its text): how many of the
    other samples' inputs of the modality changed its prediction (discovery's swaps)."""
    found = src.of_rule("prior")
    result = src.results.get("discovery")
    if not found or result is None:
        return None
    mine = [f for f in found if result.arrays[f"prior.{f.figures['modality']}.{f.figures['word']}"][row]]
    if not mine:
        return {"in_slice": False}
    g = max(mine, key=lambda f: f.strength).figures
    keys = ("word", "text", "modality", "flip_rate", "flip_rate_elsewhere")
    return {"in_slice": True, **{k: g[k] for k in keys}, "dependence": _r(result.arrays[f"swap.{g['modality']}"][row])}


def label_evidence(src: Sources, row: int) -> dict:
    """Confident learning's verdict on this error, the probabilities it read, how often the
    sample's null removals (random units, of every truth region's size; a found transform's
    random change as large) keep the prediction, and
    the label the concepts that determine it give this sample."""
    ev = src.ev
    label, pred = int(ev.labels[row]), int(ev.pred[row])
    kept = []
    for m, regions in ev.data.truth.items():
        for r in regions:
            a = src.intervened(f"{m}.{r}", row)
            if a is not None and a["has"] and a["null_valid"]:
                kept.extend((np.asarray(a["null.pred_after"]) == pred).tolist())
    for c, cf in ev.data.counterfactuals.items():  # a found transform's null: a random change as large
        a = src.intervened(f"counterfactual.{c}", row) if cf.null else None
        if a is not None and a["valid"] and "null.pred_after" in a:
            kept.extend((np.asarray(a["null.pred_after"]) == pred).tolist())
    told = -1 if src.consensus is None else int(src.consensus[row])
    return {
        "flagged": row in src.label_issues,
        "rank": src.label_issues.get(row),
        "of": len(src.label_issues),
        "given_probability": _r(ev.probs[row, label]),
        "predicted_probability": _r(ev.probs[row, pred]),
        "likely": ev.class_name(pred),
        "null_kept": _r(np.mean(kept)) if kept else None,
        "concepts_say": None if told < 0 else ev.class_name(told),
        "concepts_tell": src.consensus is not None,  # some concept set determines the label
        # a readout refitted to this split's labels: does it, too, confidently give another class?
        "refit": None
        if src.refit is None
        else {
            "likely": ev.class_name(int(src.refit[row].argmax())),
            "neighbours_say": None if src.refit_other[row] < 0 else ev.class_name(int(src.refit_other[row])),
            "given_probability": _r(src.refit[row, label]),
        },
        # a shortcut finding's concept points this sample to its prediction against its label
        "follows_shortcut": [f.subject for f in src.of_rule("shortcut") if f.points_to is not None and f.points_to[row] == pred != label],
    }


def perception_evidence(src: Sources, row: int, at: int | None) -> dict | None:
    """Per modality: what removing each relevant truth region did (every sample), and where
    stage 1 explained the sample, the top units towards the prediction and the true class, the
    mass on each truth region and on the relevant regions together (none where stage 1 skipped
    it for non-finite attributions)."""
    out: dict = {"modalities": {}}
    if at is not None:
        out.update(_attribution_evidence(src, row, at) or {})
    fusion = next((f for f in src.findings if f.rule == "missing_interaction"), None)
    if fusion is not None:
        # an additive model does not look at what matters only in combination: the interaction rule decides there
        out["deferred"] = ((fusion.figures.get("modalities") or {}).get("pair")) or list(src.ev.data.truth)
    if "intervention" in src.results:
        for modality in src.ev.data.truth:
            effects = [e for e in (region_effect(src, f"{modality}.{r}", row) for r in _relevant_regions(src, modality, row)) if e is not None]
            if effects:
                out["modalities"].setdefault(modality, {})["interventions"] = effects
    return out if out["modalities"] else None


def _attribution_evidence(src: Sources, row: int, at: int) -> dict | None:
    method = sp.card_method(src.results["unimodal"])
    if method is None:
        return None
    uni = src.results["unimodal"].arrays
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


def modality_interaction(src: Sources, row: int, at_unimodal: int | None) -> dict | None:
    """The sample's exact modality-level interaction v(all) - sum_m v({m}) + (M - 1) v(none), as a
    share of what all its modalities together change in the logit (v(all) - v(none)): from the
    interventions (every sample) or stage 1 (the explained ones). With the interventions also the
    class the additive part alone gives (v(none) plus each modality's effect alone, every class's
    logit, from the 2^M ablations): where it is the prediction, the model's interaction did not
    make this answer."""
    inter = src.results.get("intervention")
    additive = None
    if inter is not None:
        at = src.index("intervention")[int(src.ev.data.ids[row])]
        m = len(inter.details["modalities"])
        v = np.asarray(inter.arrays["modality.pred"][at], np.float64)
        value, gap = attr.interaction_of(v, m), v[-1] - v[0]
        logits = np.asarray(inter.arrays["modality.logits"][at], np.float64)  # (2^M, C)
        alone = logits[0] + sum(logits[attr.coalition_index([j], m)] - logits[0] for j in range(m))
        additive = int(alone.argmax())
    elif at_unimodal is not None and "unimodal" in src.results and {"interaction", "modality_shapley"} <= set(src.results["unimodal"].arrays):
        uni = src.results["unimodal"].arrays
        value, gap = float(uni["interaction"][at_unimodal]), float(np.sum(uni["modality_shapley"][at_unimodal]))
    else:
        return None
    if not (np.isfinite(value) and np.isfinite(gap)):
        return None
    out = {"value": _r(value), "gap": _r(gap), "share": _r(abs(value) / max(abs(gap), 1e-12))}
    if additive is not None:
        out["additive_answer"] = src.ev.class_name(additive)
        out["additive_keeps"] = bool(additive == src.ev.pred[row])
    return out


def interaction_evidence(src: Sources, row: int, at: int | None, at_unimodal: int | None) -> dict | None:
    """The strongest cross-modal unit pairs, how much of the |mixed interaction| falls on the
    needed pairs (relevant units of both modalities), and the sample's modality-level interaction."""
    needs = any(f.rule == "missing_interaction" for f in src.findings)  # the data needs the modalities combined (tested with nulls)
    out = {"pairs": [], "needed": {}, "modality": modality_interaction(src, row, at_unimodal), "data_needs_interaction": needs}
    if at is None:
        return out if out["modality"] is not None else None
    cross = src.results["crossmodal"].arrays
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


def representation_evidence(src: Sources, row: int, t: Thresholds = DEFAULT) -> dict:
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
            enc = encoding(src.summary, concept, t.confidence)
            concepts.append({"concept": concept, "value": value, "read": read, "selectivity": enc and enc["selectivity"], "encoded": enc and enc["encoded"]})
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
    share = positive / positive.sum()
    owner = [concepts.get(int(f)) for f in support]
    shares: dict[str | None, float] = {}
    for k in np.nonzero(positive)[0]:
        shares[owner[k]] = shares.get(owner[k], 0.0) + share[k]
    top = [{"feature": int(support[k]), "concept": owner[k], "push": _r(push[k])} for k in np.argsort(-push)[:5] if push[k] > 0]
    by_concept = sorted(
        ({"concept": c, "share": _r(v), "features": owner.count(c), "null_p": None if c is None else _r(random_share_p(share, owner.count(c), v, row))} for c, v in shares.items()),
        key=lambda x: -x["share"],
    )
    return {"top": top, "by_concept": by_concept}


def random_share_p(share: np.ndarray, k: int, observed: float, seed: int, draws: int = 999) -> float:
    """How often k features drawn at random from the surrogate's support give at least the
    observed share of the push: the null of a concept's features (a Monte Carlo p-value, +1
    corrected; drawn from the row, so a card is the same on every run)."""
    order = np.random.default_rng(seed).random((draws, len(share))).argsort(1)[:, :k]
    return float(((share[order].sum(1) >= observed - 1e-12).sum() + 1) / (draws + 1))


# --- the category rules: each returns (fired, figures), or None when its evidence is missing ---


def shortcut_rule(card: dict, t: Thresholds) -> tuple[bool, dict] | None:
    found = card.get("shortcut")
    if found is None:
        return None
    told = card.get("label") or {}
    if told.get("flagged") and told.get("concepts_say") is not None and told["concepts_say"] == told["likely"]:
        # the concepts that determine the label give the predicted class: the label is the mistake
        return False, {"findings": found["findings"], "concepts_say": told["concepts_say"]}
    follows = None
    word = _named(card.get("prior") or {})  # a shortcut on the word of the sample's prior slice first
    for c in sorted(found["concepts"], key=lambda c: c["concept"] not in word):
        cf = c["counterfactual"]
        # it makes the prediction right and most draws of its null (a random change as large) do
        # not, or it moves the true class's logit against the predicted one further than the
        # median draw: a found transform's null changes the very property (colour) a model may
        # rightly read, so it is judged against a typical draw, not the most extreme of a few
        null_fixes = cf.get("null_fixes") if cf is not None else None
        beyond = cf is not None and cf.get("null_towards_truth_median") is not None and cf["towards_truth"] > cf["null_towards_truth_median"]
        if cf is not None and ((cf["fixes"] and (null_fixes is None or null_fixes < 0.5)) or beyond):
            return True, {"concept": c["concept"], "points_to": c["points_to"], "evidence": "counterfactual", **cf}
        for e in c["regions"]:
            beyond = e["null_towards_truth_max"] is not None and e["towards_truth"] > e["null_towards_truth_max"]
            if (e["fixes"] and (e["null_fixes"] is None or e["null_fixes"] < 0.5)) or beyond:
                return True, {"concept": c["concept"], "points_to": c["points_to"], "evidence": "intervention", **e}
        if not c["regions"] and cf is None and follows is None:  # no intervention applies: an association, not a cause
            follows = {"concept": c["concept"], "points_to": c["points_to"], "evidence": "follows"}
    if follows is not None:
        return True, follows
    ruled = [{"concept": c["concept"], "regions": c["regions"]} for c in found["concepts"]]
    return False, {"findings": found["findings"], "follows": [c["concept"] for c in found["concepts"]], "ruled_out": ruled}


def ignored_rule(card: dict, t: Thresholds) -> tuple[bool, dict] | None:
    found = card.get("ignored_modality")
    if found is None:
        return None
    for m in found["modalities"]:
        if not m["removal_changes_prediction"] and (m["regions"] or not m["has_truth"]):
            return True, m
    return False, {"modalities": found["modalities"]}


def _named(prior: dict) -> set[str]:
    """The concept names of a prior's word: found (`word:<w>`) or annotated as the word itself."""
    return {f"word:{prior['word']}", prior["word"]} if prior.get("in_slice") else set()


def prior_rule(card: dict, t: Thresholds) -> tuple[bool, dict] | None:
    found = card.get("prior")
    if found is None:
        return None
    figures = {**found, "evidence": "intervention"}
    # in a slice with a prior, and no other input of the modality changed this answer
    if not (found["in_slice"] and found["dependence"] == 0):
        return False, figures
    # a shortcut on the slice's own word that explains this error is the same bug seen by
    # removing the word: the shortcut rule (next, trying that word first) names it
    shortcut = card.get("shortcut")
    same = [c for c in (shortcut or {}).get("concepts", []) if c["concept"] in _named(found)]
    if same:
        verdict = shortcut_rule({**card, "shortcut": {**shortcut, "concepts": same}}, t)
        if verdict is not None and verdict[0] and by_intervention(verdict[1]):
            return False, {**figures, "yields_to": verdict[1]["concept"]}
    return True, figures


def label_rule(card: dict, t: Thresholds) -> tuple[bool, dict] | None:
    found = card.get("label")
    if found is None:
        return None
    stable = found["null_kept"] is None or found["null_kept"] > 0.5
    # where concepts determine the label, they must give this sample the model's answer: a
    # sample whose cell they cannot tell (a grey photo in a colour-labelled world) is no evidence
    agrees = found["concepts_say"] == found["likely"] if found["concepts_say"] is not None or found.get("concepts_tell") else True
    # a readout fit to this split's labels must contradict the label too, with the model's class:
    # a model error on an input that shows no label, or one this split does not reward, it does not
    refit = found.get("refit")
    refitted = refit is None or refit["neighbours_say"] == found["likely"]
    return found["flagged"] and stable and agrees and refitted and not found.get("follows_shortcut"), {**found, "evidence": "confident learning" if found["null_kept"] is None else "intervention"}


def perception_rule(card: dict, t: Thresholds) -> tuple[bool, dict] | None:
    seen = card.get("perception") or {}
    mods = {m: e for m, e in seen.get("modalities", {}).items() if m not in seen.get("deferred", ())}
    intervened = {m: [e for e in e_["interventions"] if e["null_margin_drop_median"] is not None] for m, e_ in mods.items() if e_.get("interventions")}
    intervened = {m: es for m, es in intervened.items() if es}
    if intervened:
        for modality, effects in intervened.items():
            if all(e["margin_drop"] <= e["null_margin_drop_median"] for e in effects):
                return True, {"modality": modality, "evidence": "intervention", "regions": effects}
        return False, {"evidence": "intervention", "modalities": intervened}
    checked = [(m, e["relevant"]) for m, e in mods.items() if e.get("relevant")]
    if not checked:
        return None
    modality, worst = min(checked, key=lambda me: me[1]["enrichment"])
    figures = {"modality": modality, "method": seen["method"], "evidence": "attribution", **worst, "threshold": t.perception_enrichment}
    return worst["enrichment"] <= t.perception_enrichment, figures


def interaction_rule(card: dict, t: Thresholds) -> tuple[bool, dict] | None:
    """Fires when the data needs the modalities combined (a missing_interaction finding: the model
    behaves additively while a concept pair tells the label beyond any additive use of it, each
    against its null) and the additive part of the model alone gives this wrong answer (its
    interaction does not change it; from the 2^M modality ablations), or when the modalities do
    combine but not on the needed unit pairs (enrichment <= `interaction_enrichment`, the share a
    random pair would carry). The first test matters for piecewise-linear (ReLU) models, whose
    mixed second derivatives are zero almost everywhere: no mixed interaction is no evidence there."""
    found = card.get("interaction") or {}
    modality, needed = found.get("modality"), found.get("needed")
    keeps, needs = (modality or {}).get("additive_keeps"), bool(found.get("data_needs_interaction"))
    if keeps and needs:
        return True, {"modality_interaction": modality}
    if not needed:
        return None if keeps is None else (False, {"modality_interaction": modality, "data_needs_interaction": needs})
    pair, worst = min(needed.items(), key=lambda kv: kv[1]["enrichment"])
    return worst["enrichment"] <= t.interaction_enrichment, {"pair": pair, **worst, "threshold": t.interaction_enrichment}


def representation_rule(card: dict, t: Thresholds) -> tuple[bool, dict] | None:
    concepts = (card.get("representation") or {}).get("concepts")
    if not concepts:
        return None
    for c in concepts:
        if c["encoded"] is False or (c["read"] is not None and c["read"] != c["value"]):
            return True, c
    return False, {"concepts": [c["concept"] for c in concepts]}


def composition_rule(card: dict, t: Thresholds) -> tuple[bool, dict] | None:
    """One concept's features give more of the push towards the wrong class than as many random
    features of the surrogate would (its Monte Carlo p-value below 1 - `confidence`, Bonferroni
    over the concepts that push); an association (the surrogate's weights), never a cause."""
    comp = card.get("composition")
    if not comp or not comp["by_concept"]:
        return None
    named = [c for c in comp["by_concept"] if c["concept"] is not None]
    if not named:
        return False, {"concept": None}
    top = min(named, key=lambda c: (c["null_p"], -c["share"]))
    features = [f["feature"] for f in comp["top"] if f["concept"] == top["concept"]]
    level = (1 - t.confidence) / len(named)
    return top["null_p"] < level, {**top, "top_features": features, "level": _r(level)}


def _f(x, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


# --- the fired rule's evidence in words, with the figures a reader can check on the card ---


def shortcut_sentence(g: dict) -> str:
    if g["evidence"] == "counterfactual":
        null = ""
        if g.get("null_towards_truth_median") is not None:
            null = f", against {_f(g['null_towards_truth_median'])} for the median random change as large ({100 * g['null_fixes']:.0f}% of those make it right)"
        moves = "right" if g["fixes"] else "move"
        return f"Flipping {g['concept']} (label unchanged) makes this prediction {moves}: the true class gains {_f(g['towards_truth'])} logits over the predicted one{null}."
    if g["evidence"] == "intervention":
        return (
            f"The prediction is the class {g['concept']} points to ({g['points_to']}); removing {g['region']} ({g['units']} units) "
            + ("makes it right" if g["fixes"] else "moves it towards the true class")
            + f": the true class gains {_f(g['towards_truth'])} logits over the predicted one, against at most {_f(g['null_towards_truth_max'])} for as many random units."
        )
    return f"The prediction is the class {g['concept']} points to ({g['points_to']}), against the label; no removal applies to this sample, so following the shortcut is the evidence."


def label_sentence(g: dict) -> str:
    stable = "" if g["null_kept"] is None else f"; {100 * g['null_kept']:.0f}% of the random removals keep it"
    stable += "" if g["concepts_say"] is None else f"; the concepts that determine the label say {g['concepts_say']} too"
    stable += "" if not g.get("refit") else f"; its nearest neighbours' labels say {g['refit']['neighbours_say']} too"
    return (
        f"Likely a label mistake ({g['rank']} of {g['of']} by confident learning): the model gives the label {100 * g['given_probability']:.0f}% "
        f"and its answer, {g['likely']}, {100 * g['predicted_probability']:.0f}%{stable}; no intervention shows a model error. Review the label."
    )


def ignored_sentence(g: dict) -> str:
    return (
        f"The model hardly uses {g['modality']} ({100 * g['share']:.0f}% of the modality-level logit change); "
        f"removing it changes this logit by {_f(g['removal_logit_change'])} and not the prediction, though the sample needs it"
    ) + (f" ({', '.join(g['regions'])})." if g["regions"] else ".")


def prior_sentence(g: dict) -> str:
    return (
        f"Its answer does not depend on the {g['modality']}: no other sample's {g['modality']} changed it. It is one of the {g['text']}s with "
        f'"{g["word"]}", whose answers another {g["modality"]} changes {_f(g["flip_rate"])} of the time, {_f(g["flip_rate_elsewhere"])} elsewhere: '
        "the model answers them from the wording."
    )


def perception_sentence(g: dict) -> str:
    if g.get("evidence") == "intervention":
        parts = ", ".join(f"{e['region']} takes {_f(e['margin_drop'])} of the margin (random units: {_f(e['null_margin_drop_median'])})" for e in g["regions"])
        return f"Removing the relevant regions of {g['modality']} moves this prediction no more than removing random units: {parts}."
    return f"The {g['method']} attribution on the relevant regions of {g['modality']} ({', '.join(g['regions'])}) is {_f(g['enrichment'])}x their share of the units: no more than chance."


def interaction_sentence(g: dict) -> str:
    if "modality_interaction" in g:
        mi = g["modality_interaction"]
        return (
            f"The label needs the modalities combined, and the model's additive part alone (each modality's effect without the others) gives this answer too, "
            f"{mi['additive_answer']}: its interaction ({100 * mi['share']:.0f}% of what the modalities change in the logit) does not change it."
        )
    return f"The needed unit pairs ({g['pair']}) carry {_f(g['enrichment'])}x their share of the mixed interaction: no more than chance."


def representation_sentence(g: dict) -> str:
    return f"The decision layer reads {g['concept']} as {g['read']} where it is {g['value']} (probe selectivity {_f(g['selectivity'])})."


def composition_sentence(g: dict) -> str:
    return (
        f"Features of {g['concept']} ({g['features']} of the surrogate's) give {100 * g['share']:.0f}% of the push towards the wrong class; "
        f"as many random features give that much with probability {_f(g['null_p'], 3)}."
    )


# what a fired rule's figures say their evidence was, when it is only an association: attribution,
# probes, the surrogate's weights, mixed gradients, and a label mistake confident learning alone flags
ASSOCIATIONS = ("follows", "attribution", "confident learning")


def by_intervention(figures: dict) -> bool:
    """Whether a fired rule rests on what the model did when something was removed or flipped:
    the interventions, a counterfactual, removing a modality."""
    return figures.get("evidence") not in ASSOCIATIONS


@dataclass(frozen=True)
class Rule:
    """One per-error cause: `evidence` gathers what the card shows for it (None: nothing to
    go on, and the card says `missing`), `test` decides from the card (fired, figures) or None
    when its evidence is missing, `sentence` puts the fired figures in words, and
    `interventional` says whether they rest on an intervention (only then may the rule be the
    card's cause; an association is recorded as such). A rule whose evidence is always an
    association (probes, the decision layer's push) has `interventional=None`: never a cause."""

    name: str
    evidence: Callable[[Sources, int, dict[str, int | None], Thresholds], dict | None]
    test: Callable[[dict, Thresholds], tuple[bool, dict] | None]
    missing: str
    sentence: Callable[[dict], str]
    interventional: Callable[[dict], bool] | None = by_intervention


# the rules in the order they are tried: the first that fires on interventional evidence is the cause
RULES: Registry[Rule] = Registry("per-error rule", "report rules")
for _rule in (
    # first: an error no other input of a modality changes, in a slice whose answers do not depend
    # on it, is the prior's, unless a shortcut on the slice's own word explains it (prior_rule)
    Rule("prior", lambda src, row, at, t: prior_evidence(src, row), prior_rule, "no prior finding", prior_sentence),
    Rule("shortcut", lambda src, row, at, t: shortcut_evidence(src, row), shortcut_rule, "no shortcut finding", shortcut_sentence),
    Rule("ignored_modality", lambda src, row, at, t: ignored_evidence(src, row), ignored_rule, "no ignored-modality finding", ignored_sentence),
    Rule("label", lambda src, row, at, t: label_evidence(src, row), label_rule, "no predicted probabilities", label_sentence),
    Rule(
        "perception",
        lambda src, row, at, t: perception_evidence(src, row, at["unimodal"]) if {"unimodal", "intervention"} & set(src.results) else None,
        perception_rule,
        "no intervention or unimodal evidence for this error",
        perception_sentence,
    ),
    Rule(
        "interaction",
        lambda src, row, at, t: interaction_evidence(src, row, at["crossmodal"], at["unimodal"]),
        interaction_rule,
        "no crossmodal evidence for this error",
        interaction_sentence,
        interventional=lambda figures: "modality_interaction" in figures,
    ),
    Rule(
        "representation",
        lambda src, row, at, t: representation_evidence(src, row, t) if "representation" in src.results else None,
        representation_rule,
        "no representation evidence for this error",
        representation_sentence,
        interventional=None,
    ),
    Rule(
        "composition",
        lambda src, row, at, t: composition_evidence(src, row) if "composition" in src.results else None,
        composition_rule,
        "no composition evidence for this error",
        composition_sentence,
        interventional=None,
    ),
):
    RULES.register(_rule)


def categories() -> tuple[str, ...]:
    """The causes a card can be given (every rule but those that rest on associations alone)."""
    return tuple(r.name for r in RULES if r.interventional is not None)


def categorise(card: dict, t: Thresholds = DEFAULT) -> dict:
    """Sets card["category"], card["rule"] (the one that fired, with its figures) and
    card["checked"] (every rule: fired, not fired, or skipped and why). No cause fires without
    interventional evidence: a rule that fires on an association alone is recorded, and where no
    rule fires otherwise, the card stays `undetermined` with the first association as its rule,
    marked `association_only`."""
    card["checked"], card["category"], card["rule"] = [], "undetermined", None
    associations = []
    for rule in RULES:
        verdict = rule.test(card, t)
        if verdict is None:
            card["checked"].append({"rule": rule.name, "skipped": rule.missing})
            continue
        fired, figures = verdict
        card["checked"].append({"rule": rule.name, "fired": fired, "figures": figures})
        if fired and not (rule.interventional and rule.interventional(figures)):
            associations.append({"name": rule.name, "figures": figures, "sentence": f"Association only: {rule.sentence(figures)}", "association_only": True})
        elif fired:
            card["category"], card["rule"] = rule.name, {"name": rule.name, "figures": figures, "sentence": rule.sentence(figures)}
            break
    if card["rule"] is None and associations:
        card["rule"] = associations[0]
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
    where = {stage: positions.get(sid) for stage, positions in at.items()}  # the sample's row in each stage's arrays
    found = {rule.name: rule.evidence(src, row, where, t) for rule in RULES}
    out.update({k: v for k, v in found.items() if v is not None})
    return categorise(out, t)


def cards(src: Sources, t: Thresholds = DEFAULT) -> list[dict]:
    """A categorised card for every error, most confident errors first."""
    at = {stage: src.index(stage) for stage in ("unimodal", "crossmodal")}
    rows = np.nonzero(src.ev.errors)[0]
    rows = rows[np.argsort(-src.ev.probs[rows, src.ev.pred[rows]], kind="stable")]
    return [card(src, int(r), at, t) for r in rows]
