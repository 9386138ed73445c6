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

from mmdiag.pipeline import stats
from mmdiag.reports import reliance as rl
from mmdiag.reports import slices as sl
from mmdiag.reports.samples import Evaluated
from mmdiag.reports.thresholds import DEFAULT, Thresholds
from mmdiag.stages.base import StageResult


@dataclass
class Finding:
    rule: str  # the name of its record in reports/suggest.FINDINGS (shortcut, ignored_modality, ...)
    subject: str  # the concept, region or modality it is about
    strength: float  # share of the samples at stake, in [0, 1]
    figures: dict = field(default_factory=dict)
    action: dict = field(default_factory=dict)
    # per data row, the class a shortcut concept points to (-1 unknown): what the cards test
    points_to: np.ndarray | None = field(default=None, repr=False)


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


def class_valued(ev: Evaluated) -> tuple[dict[str, np.ndarray], list[str]]:
    """Concepts whose value points to a class, per data row (-1 unknown), and notes on what
    could not be tested. Declared ones (`SampleSet.class_concepts`) as they are; undeclared, in a
    two-class task, every binary concept, oriented to the value the model's predictions follow
    (a concept can point to class 0 when present)."""
    names = ev.data.class_valued()
    if names is None:
        n_classes = max(len(ev.data.class_names), int(ev.labels.max()) + 1)
        return {}, [f"shortcut rule: no concept is declared class-valued (SampleSet.class_concepts), so none was tested as a shortcut of this {n_classes}-class task"]
    out = {c: ev.data.meta[c].numpy() for c in names}
    if ev.data.class_concepts is None:  # undeclared binary concepts: point where the model's predictions follow
        for c, v in out.items():
            if c in ev.data.found:  # points to the class it was found to push towards
                continue
            known = v >= 0
            if (ev.pred[known] == v[known]).mean() < 0.5:
                out[c] = np.where(known, 1 - v, v)
    return out, []


def label_sets(ev: Evaluated, t: Thresholds = DEFAULT) -> list[tuple[str, ...]]:
    """The small sets of concepts that determine the label (reliance.determining_sets) among the
    concepts that may explain it: few values, not derived from the label."""
    meta = {n: v.numpy() for n, v in ev.data.meta.items() if 2 <= len(np.unique(v.numpy()[v.numpy() >= 0])) <= t.max_values}
    derived = label_derived(meta, ev.labels)
    return rl.determining_sets({n: v for n, v in meta.items() if n not in derived}, ev.labels, confidence=t.confidence)


def cue_sets(ev: Evaluated, t: Thresholds = DEFAULT) -> list[tuple[str, ...]]:
    """label_sets with the features mmdiag found beside the annotated concepts, each as the
    concept "carried or not": what the data shows the label to follow, annotated or not."""
    if not ev.data.found:
        return label_sets(ev, t)
    found = {n: (ev.data.meta[n].numpy() >= 0).astype(np.int64) for n in ev.data.found}
    meta = {n: v.numpy() for n, v in ev.data.meta.items() if n not in found and 2 <= len(np.unique(v.numpy()[v.numpy() >= 0])) <= t.max_values}
    meta = {n: v for n, v in meta.items() if n not in label_derived(meta, ev.labels)}
    return rl.determining_sets({**meta, **found}, ev.labels, confidence=t.confidence)


def label_cues(ev: Evaluated, cues: list[tuple[str, ...]]) -> set[str]:
    """The features mmdiag found that tell the label as well as anything the data shows (in a
    set of `cue_sets`). Such a feature is the label's own cue (the colour of a colour-labelled
    world), not a shortcut, even where errors concentrate where it disagrees with the labels:
    those are label mistakes."""
    return {c for s in cues for c in s if c in ev.data.found}


def modalities_of(ev: Evaluated, concept: str) -> set[str]:
    """Where a concept lives: its linked truth regions' modalities, or a found feature's."""
    linked = {m for m, regions in ev.data.truth.items() for r in regions if ev.data.concept_of(m, r) == concept}
    return linked | ({ev.data.found[concept]["modality"]} if concept in ev.data.found else set())


def _concentrated(values: np.ndarray, labels: np.ndarray, errors: np.ndarray, z: float, t: Thresholds):
    """((k_d, n_d, k_a, n_a), Newcombe gap, Wilson low of the disagree slice) where errors
    concentrate where the concept disagrees with the label; None where they do not."""
    known = values >= 0
    disagree, agree = known & (values != labels), known & (values == labels)
    if disagree.sum() < t.min_support or agree.sum() < t.min_support:
        return None
    k_d, n_d, k_a, n_a = int(errors[disagree].sum()), int(disagree.sum()), int(errors[agree].sum()), int(agree.sum())
    gap = stats.difference(k_d, n_d, k_a, n_a, z)
    low_d, _ = stats.wilson(k_d, n_d, z)
    return ((k_d, n_d, k_a, n_a), gap, low_d) if gap[1] > 0 and low_d > errors.mean() else None


def shortcuts(
    summary: dict,
    results: dict[str, StageResult],
    ev: Evaluated,
    t: Thresholds = DEFAULT,
    notes: list[str] | None = None,
    sets: list[tuple[str, ...]] | None = None,
    cues: list[tuple[str, ...]] | None = None,
) -> list[Finding]:
    """A concept the model follows against the label. Three things must hold:
    - errors concentrate where the concept disagrees with the label: the error rates' difference
      (disagree - agree, Newcombe interval) is above 0 and the disagree slice's Wilson interval
      lies above the base error rate, Bonferroni over the concepts tested;
    - the model relies on it beyond a null of the same size (reports/reliance.py): removing its
      region or flipping it (the evidence of record, when there is any), else its attribution or
      composition weights against random unit or feature sets;
    - errors still concentrate so against the label the concepts that determine it give each
      sample, where they give one (rl.consensus): label mistakes are no errors there, and a
      proxy of the label's causes (a colour transform in a colour-labelled world) no shortcut;
    - the data does not show it to be a cause of the label (reliance.causal), nor, for a
      feature mmdiag found, the label's own cue (label_cues; `cues`: cue_sets)."""
    notes = [] if notes is None else notes
    candidates, msgs = class_valued(ev)
    notes += msgs
    sets = label_sets(ev, t) if sets is None else sets
    cues = label_cues(ev, cue_sets(ev, t) if cues is None else cues)
    # the label by the data's own account: what the concepts that determine it give each sample
    # (a label mistake is no error there, and a proxy of the label's causes no shortcut)
    told = rl.consensus({n: v.numpy() for n, v in ev.data.meta.items()}, ev.labels, sets, t.confidence)
    told = ev.labels if told is None else np.where(told >= 0, told, ev.labels)
    z = stats.z_value(t.confidence, len(candidates))
    found = []
    for concept, values in candidates.items():
        if concept in cues:
            continue
        known = values >= 0
        concentrated = _concentrated(values, ev.labels, ev.errors, z, t)
        if concentrated is None or _concentrated(values, told, ev.pred != told, z, t) is None:
            continue
        (k_d, n_d, k_a, n_a), (gap, gap_low, gap_high), low_d = concentrated
        cf_figures = ((summary.get("intervention") or {}).get("counterfactuals") or {}).get(concept)
        is_cause = rl.causal(concept, sets, cf_figures)
        if is_cause:
            continue
        regions = rl.linked_regions(ev, concept)
        evidence = {
            # Bonferroni over the concepts tested and, for the interventions, their regions
            "counterfactual": rl.counterfactual(summary, concept, z),
            "intervention": rl.intervention(summary, regions, stats.z_value(t.confidence, len(candidates) * max(len(regions), 1))),
            "attribution": rl.attribution(results, ev, regions, z),
            "composition": rl.composition(summary, results, concept, len(candidates)),
        }
        measured = [k for k, v in evidence.items() if v is not None]
        if not measured:
            notes.append(
                f"shortcut rule: errors concentrate where {concept} disagrees with the label, but nothing measures the model's reliance on it: "
                "link a truth region to it (SampleSet.truth_concepts) or supply a counterfactual"
            )
            continue
        # interventions first: where the model was intervened on, that is the verdict
        of_record = [k for k in ("counterfactual", "intervention") if evidence[k] is not None] or measured
        relied = [k for k in of_record if evidence[k]["beyond_null"]]
        if not relied:
            continue
        at_stake = n_d / known.sum() * gap
        enrichment, method, _ = region_enrichment(summary, regions[0][1] if regions else concept)
        figures = {
            "where": f"{concept}≠label",
            "n_disagree": n_d,
            "error_rate_disagree": _round(k_d / n_d),
            "error_rate_agree": _round(k_a / n_a),
            "error_rate_gap": {"value": _round(gap), "low": _round(gap_low), "high": _round(gap_high)},
            "ci_low_disagree": _round(low_d),
            "base_error_rate": _round(ev.error_rate),
            "follows": _round((ev.pred[known] == values[known]).mean()),  # how often the prediction is the class it points to
            "points_to": {str(v): ev.class_name(int(v)) for v in np.unique(values[known]).tolist()},
            "cause_of_label": is_cause,  # False: the sets that predict the label best leave it out; None: the data cannot tell
            "label_determined_by": [list(s) for s in sets if s and concept not in s][:3],
            "evidence": evidence,
            "decided_by": relied[0],
            "enrichment": _round(enrichment, 3) if method else None,
            "method": method,
        }
        action = {"kind": "decorrelate", "concept": concept}
        if regions:
            action.update(region=regions[0][1], modality=regions[0][0])
        found.append(Finding("shortcut", concept, float(at_stake), figures, action, points_to=values))
    return explained_away(found, ev.pred, told, z, t)


def explained_away(found: list[Finding], pred: np.ndarray, labels: np.ndarray, z: float, t: Thresholds = DEFAULT) -> list[Finding]:
    """The shortcut findings less each whose errors stop concentrating once the errors another
    finding's concept claims (it points the sample to its prediction against its label) are set
    aside, where that other finding's errors survive the same with this one's: a concept that
    merely co-occurs with another's errors (a colour transform that disagrees with the label
    mostly where the object is hidden and a word decides) is explained away by it."""
    errors = pred != labels
    claims = {id(f): (f.points_to == pred) & errors for f in found}

    def survives(f: Finding, without: Finding) -> bool:
        keep = ~claims[id(without)]
        return _concentrated(f.points_to[keep], labels[keep], errors[keep], z, t) is not None

    return [f for f in found if not any(g is not f and not survives(f, g) and survives(g, f) for g in found)]


def ignored_modalities(
    summary: dict, ev: Evaluated, t: Thresholds = DEFAULT, notes: list[str] | None = None, sets: list[tuple[str, ...]] | None = None, cues: list[tuple[str, ...]] | None = None
) -> list[Finding]:
    """A modality that shows the label where the model does not look, while the model errs on at
    least `min_error_rate` of the samples: a readout refitted to the labels on the modalities'
    inputs gains more from it (Brier score of the label, out of fold) than the model does (its
    score with the modality removed, from the 2^M ablations), per sample, the interval of the
    difference above 0 at the stage's confidence, Bonferroni over the modalities, and it adds to
    the model's answer (a readout of the model's logits with the modality's inputs beats one of
    the logits alone, the same way; stages/readout.py). No share is compared with a fixed number: a modality that tells
    nothing beyond the others (a neutral caption) gives the readout nothing to gain, and one the
    model reads a little of still leaves the rest unused. Needs the intervention stage (a note
    says so without it). A modality whose linked concepts the data shows not to matter for the
    label is not flagged, nor one where a set that determines the label (cue_sets, found features
    included) lives wholly in other modalities."""
    notes = [] if notes is None else notes
    if ev.error_rate < t.min_error_rate:
        return []
    inter = (summary.get("intervention") or {}).get("modalities") or {}
    if len(inter) < 2:
        if len(ev.data.inputs) >= 2:
            notes.append("ignored_modality rule: needs the intervention stage (each modality's use by the model against a readout refitted to the labels); not tested")
        return []
    if not all(g.get("unused") for g in inter.values()):
        notes.append("ignored_modality rule: too few samples of some class for a readout refitted to the labels; not tested")
        return []
    sets = label_sets(ev, t) if sets is None else sets
    cues = cue_sets(ev, t) if cues is None else cues
    found = []
    for m in sorted(inter):
        g = inter[m]
        if g["unused"]["low"] <= 0 or g["beyond_answer"]["low"] <= 0:
            continue
        elsewhere = next((c for c in cues if c and all(modalities_of(ev, x) and m not in modalities_of(ev, x) for x in c)), None)
        if elsewhere is not None:
            notes.append(f"ignored_modality rule: the model leaves what {m} shows unused, but the label is determined without it ({', '.join(elsewhere)}); not flagged")
            continue
        linked = sorted({ev.data.concept_of(m, r) for r in ev.data.truth.get(m, {})} - {None})
        needed = [c for c in linked if rl.causal(c, sets, None)]
        if linked and sets and not needed:
            notes.append(f"ignored_modality rule: the model leaves what {m} shows unused, but the label is determined without its concepts ({', '.join(linked)}); not flagged")
            continue
        figures = {
            "share": g["share"],
            "removal_flip_rate": g["removal_flip_rate"],
            "unused": g["unused"],
            "beyond_answer": g["beyond_answer"],
            "readout_gain": g["readout_gain"],
            "model_gain": g["model_gain"],
            "needed_concepts": needed,
            "evidence": "intervention",
            "error_rate": _round(ev.error_rate),
        }
        # the share of what the modality shows that the model leaves unused
        left = min(max(g["unused"]["value"] / g["readout_gain"], 0.0), 1.0) if g["readout_gain"] > 0 else 0.0
        found.append(Finding("ignored_modality", m, ev.error_rate * left, figures, {"kind": "modality_dropout", "modality": m}))
    return found


def priors(summary: dict, ev: Evaluated) -> list[Finding]:
    """A slice of the data named by a word on which the model answers without looking at a
    modality and errs more than elsewhere (the discovery stage's priors, stages/priors.py: both
    tested against the rest of the split, Benjamini-Hochberg over every word and modality). Its
    strength is the share of the samples that are its errors no other input of the modality
    changed."""
    found = []
    for s in (summary.get("discovery") or {}).get("priors", []):
        figures = {**s, "evidence": "intervention", "error_rate": _round(ev.error_rate)}
        strength = s["errors_unmoved"] / max(len(ev.labels), 1)
        found.append(Finding("prior", f"{s['modality']}:{s['word']}", strength, figures, {"kind": "balance_slice", "word": s["word"], "modality": s["modality"]}))
    return found


def label_derived(meta: dict[str, np.ndarray], labels: np.ndarray) -> set[str]:
    """Binary concepts that say whether another concept agrees with the label (such as the demo's
    `shortcut_agrees`): with that other concept they give the label away, so they are no
    evidence about the data. The relation is symmetric, so both concepts of such a pair are
    named."""
    binary = {n: v for n, v in meta.items() if set(np.unique(v[v >= 0]).tolist()) == {0, 1}}
    return {c for c, v in binary.items() for d, w in binary.items() if c != d and np.mean(v == (w == labels)) >= 0.99}


def label_functions(meta: dict[str, np.ndarray], labels: np.ndarray, purity: float = 0.99) -> set[str]:
    """Concepts that are a function of the label (each class's samples take one value of it, at
    `purity`): a copy of the label, or a concept computed from the answer. Whether the decision
    layer encodes one is whether the model is right, no representation finding."""
    out = set()
    for name, v in meta.items():
        known = v >= 0
        if known.sum() < 2 or len(np.unique(v[known])) < 2:
            continue
        agree = sum(np.bincount(v[known & (labels == k)]).max() for k in np.unique(labels[known]))
        if agree >= purity * known.sum():
            out.add(name)
    return out


def additive_fit(a: np.ndarray, b: np.ndarray, labels: np.ndarray, sizes: tuple[int, int, int] | None = None, steps: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """The best additive classifier of two categorical concepts: multinomial logistic regression
    on their one-hot codes (logit = f(a) + g(b)), fitted on the cell counts by gradient descent (a
    few dozen parameters); `sizes`: the numbers of values of a, b and the label (else from the
    data). Returns (f, g). An OR of two concepts is additive (it fits it exactly); an XOR is not."""
    cells, inverse = np.unique(np.stack([a, b, labels], 1), axis=0, return_inverse=True)
    weight = np.bincount(inverse.reshape(-1), minlength=len(cells)) / len(labels)
    ca, cb, cy = cells[:, 0], cells[:, 1], cells[:, 2]
    n_a, n_b, n_classes = sizes or (int(a.max()) + 1, int(b.max()) + 1, int(labels.max()) + 1)
    f, g = np.zeros((n_a, n_classes)), np.zeros((n_b, n_classes))
    target = np.eye(n_classes)[cy]
    for _ in range(steps):
        z = f[ca] + g[cb]
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        grad = weight[:, None] * (p - target)
        df, dg = np.zeros_like(f), np.zeros_like(g)
        np.add.at(df, ca, grad)
        np.add.at(dg, cb, grad)
        f -= 2.0 * (df + 1e-4 * f)
        g -= 2.0 * (dg + 1e-4 * g)
    return f, g


def _majority_hits(x: np.ndarray, y: np.ndarray, fit: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Per test sample: whether the majority label of its value of `x` among the fit samples (the
    fit samples' majority for a value they lack) is its label."""
    k = int(y.max()) + 1
    counts = np.zeros((int(x.max()) + 1, k))
    np.add.at(counts, (x[fit], y[fit]), 1)
    rule = np.where(counts.sum(1) > 0, counts.argmax(1), np.bincount(y[fit], minlength=k).argmax())
    return rule[x[test]] == y[test]


def label_needs_pairs(data_meta: dict[str, np.ndarray], labels: np.ndarray, confidence: float = 0.95, seed: int = 0) -> dict:
    """Whether the label needs two concepts together, judged on a held-out half: the best pair's
    rule (majority label per cell of the pair, learnt on the other half) against the best additive
    use of the two (the better of the best single concept's rule and the best additive classifier
    of the pair, learnt alike), compared on the same held-out samples (one-sided sign test on the
    samples where they disagree, Bonferroni over the pairs tried). An XOR-like rule needs the two
    together, an OR does not, and labels that no pair tells need nothing, however many concept
    values there are to chance upon. Samples with every concept known; concepts derived from the
    label left out."""
    from scipy.stats import binom

    derived = label_derived(data_meta, labels)
    data_meta = {n: v for n, v in data_meta.items() if n not in derived}
    names = list(data_meta)
    known = np.all([data_meta[n] >= 0 for n in names], axis=0) if names else np.zeros(len(labels), bool)
    if len(names) < 2 or known.sum() < 4:
        return {"single": None, "pair": None, "gain": 0.0, "needs": False}
    y = labels[known]
    meta = {n: v[known] for n, v in data_meta.items()}
    order = np.random.default_rng(seed).permutation(len(y))
    fit, test = np.sort(order[: len(y) // 2]), np.sort(order[len(y) // 2 :])
    singles = {n: _majority_hits(meta[n], y, fit, test) for n in names}
    pairs = {(a, b): _majority_hits(meta[a] * (meta[b].max() + 1) + meta[b], y, fit, test) for a, b in combinations(names, 2)}
    pair = max(pairs, key=lambda p: pairs[p].sum())
    a, b = meta[pair[0]], meta[pair[1]]
    f, g = additive_fit(a[fit], b[fit], y[fit], (int(a.max()) + 1, int(b.max()) + 1, int(y.max()) + 1))
    additive = (f[a[test]] + g[b[test]]).argmax(1) == y[test]
    best_single = max(singles.values(), key=lambda h: h.sum())
    alone = additive if additive.sum() >= best_single.sum() else best_single
    gained, lost = int((pairs[pair] & ~alone).sum()), int((alone & ~pairs[pair]).sum())
    p = float(binom.sf(gained - 1, gained + lost, 0.5)) if gained else 1.0
    return {
        "single": _round(best_single.mean()),
        "pair": _round(pairs[pair].mean()),
        "pair_concepts": list(pair),
        "additive_pair": _round(alone.mean()),
        "gain": _round(pairs[pair].mean() - alone.mean()),
        "p_value": _round(p),
        "needs": bool(p < (1 - confidence) / len(pairs)),
    }


def behaves_additively(results: dict[str, StageResult], ev: Evaluated, t: Thresholds = DEFAULT) -> dict | None:
    """Whether the model is no more accurate than its additive projection (EMAP) on the reference
    samples: one-sided sign test on the samples where the two disagree."""
    from scipy.stats import binom

    cross = results.get("crossmodal")
    if cross is None or not {"emap.ids", "emap.full", "emap.additive"} <= set(cross.arrays):
        return None
    labels = ev.labels[ev.rows(cross.arrays["emap.ids"])]
    full, additive = cross.arrays["emap.full"].argmax(1) == labels, cross.arrays["emap.additive"].argmax(1) == labels
    gained, lost = int((full & ~additive).sum()), int((additive & ~full).sum())
    p = float(binom.sf(gained - 1, gained + lost, 0.5)) if gained else 1.0
    return {"full_right_additive_wrong": gained, "additive_right_full_wrong": lost, "p_value": _round(p), "additive": bool(p >= 1 - t.confidence)}


def missing_interaction(summary: dict, results: dict[str, StageResult], ev: Evaluated, t: Thresholds = DEFAULT) -> list[Finding]:
    """The model behaves additively (its EMAP additive projection is not significantly less
    accurate: `behaves_additively`) while the data needs interaction (a pair of concepts predicts
    the label significantly better on a held-out half than any additive use of them:
    `label_needs_pairs`), and it errs on at least `min_error_rate` of the samples."""
    cross = summary.get("crossmodal") or {}
    full, additive = cross.get("full_accuracy"), cross.get("additive_accuracy")
    if full is None or additive is None or ev.error_rate < t.min_error_rate:
        return []
    behaves = behaves_additively(results, ev, t)
    if behaves is None or not behaves["additive"]:
        return []
    # the features mmdiag found say what the model follows, not what the label needs
    meta = {n: v.numpy() for n, v in ev.data.meta.items() if n not in ev.data.found and len(np.unique(v.numpy())) <= t.max_values}
    needs = label_needs_pairs(meta, ev.labels, t.confidence)
    if not needs["needs"]:
        return []
    figures = {
        "full_accuracy": full,
        "additive_accuracy": additive,
        "gap": _round(full - additive),
        "additive_test": behaves,
        "pair_test_p": needs["p_value"],
        "error_rate": _round(ev.error_rate),
        "label_from_one_concept": needs["single"],
        "label_from_two_concepts": needs["pair"],
        "pair": needs.get("pair_concepts"),
        "rescued": rescue_rate(results.get("crossmodal"), ev),
    }
    if cross.get("additive_follows"):
        concept, rate = max(cross["additive_follows"].items(), key=lambda kv: kv[1])
        figures["additive_follows"] = {"concept": concept, "rate": rate}
    figures["modalities"] = pair_modalities(summary, ev, needs.get("pair_concepts") or [])
    figures["fusion"] = (summary.get("model") or {}).get("fusion")
    where = {"modalities": figures["modalities"]["pair"]} if figures["modalities"] else {}
    if figures["fusion"] == "joint":  # the architecture can combine them: the training did not make it
        return [Finding("missing_interaction", "fusion", ev.error_rate, figures, {"kind": "interaction_training", **where})]
    return [Finding("missing_interaction", "fusion", ev.error_rate, figures, {"kind": "interaction_fusion", "options": ["film", "cross_attention"], **where})]


def pair_modalities(summary: dict, ev: Evaluated, concepts: list[str]) -> dict | None:
    """The modalities the needed concept pair lives in (through their linked truth regions), and
    how much those modalities interact now: the pair's share of the modality-level logit change
    (exact Shapley interaction index, every sample), beside every other pair's."""
    where = [sorted({m for m, regions in ev.data.truth.items() for r in regions if ev.data.concept_of(m, r) == c}) for c in concepts]
    if len(where) != 2 or not where[0] or not where[1]:
        return None
    pair = next(([a, b] for a in where[0] for b in where[1] if a != b), None)
    if pair is None:
        return None
    measured = (summary.get("intervention") or {}).get("pairs") or (summary.get("unimodal") or {}).get("modality_ablation", {}).get("pairs") or {}
    key = next((k for k in (f"{pair[0]}×{pair[1]}", f"{pair[1]}×{pair[0]}") if k in measured), None)
    return {"pair": pair, "interaction": None if key is None else measured[key], "all_pairs": measured}


def rescue_rate(cross: StageResult | None, ev: Evaluated) -> float | None:
    """How often the full model is right where its additive projection is wrong (EMAP reference
    samples): near 0, the model's interaction part adds nothing."""
    if cross is None or not {"emap.ids", "emap.full", "emap.additive"} <= set(cross.arrays):
        return None
    labels = ev.labels[ev.rows(cross.arrays["emap.ids"])]
    wrong = cross.arrays["emap.additive"].argmax(1) != labels
    return _round((cross.arrays["emap.full"].argmax(1)[wrong] == labels[wrong]).mean()) if wrong.any() else None


def encoding(summary: dict, concept: str, confidence: float = 0.95) -> dict | None:
    """How far the decision layer's probe of a concept (the best layer's where there is none)
    beats its control task on the held-out samples: the difference (selectivity) with its
    Newcombe interval, and the same over its ceiling, one minus the control's accuracy (the most
    a probe can beat it by: 0.1 for a concept of 10% prevalence). Encoded: the interval's low
    end is above 0."""
    layers = ((summary.get("representation") or {}).get("probes") or {}).get(concept)
    if not layers:
        return None
    probe = layers.get("decision") or max(layers.values(), key=lambda v: v.get("selectivity", 0))
    n = probe.get("n_test")
    if not n or probe.get("control") is None:
        return None
    z = stats.z_value(confidence)
    value, low, high = stats.difference(round(probe["accuracy"] * n), n, round(probe["control"] * n), n, z)
    ceiling = max(1 - probe["control"], 1 / n)
    return {"selectivity": _round(value), "low": _round(low), "high": _round(high), "normalised": _round(value / ceiling), "encoded": bool(low > 0)}


def concepts_not_encoded(summary: dict, ev: Evaluated, found: list[sl.Slice], shortcut_concepts: set[str], t: Thresholds = DEFAULT) -> list[Finding]:
    """A concept that defines an error slice (not a shortcut, not the label) whose decision-layer
    probe does not beat its control task (`encoding`: the interval's low end is not above 0):
    errors concentrate on it and the model does not encode it."""
    worst: dict[str, sl.Slice] = {}
    meta = {n: v.numpy() for n, v in ev.data.meta.items()}
    # no model can encode these from its inputs, or not encoding them is its error itself
    derived = label_derived(meta, ev.labels) | label_functions(meta, ev.labels)
    for s in found:
        for concept, _ in s.conditions:
            if s.kind == "concept" and concept != "label" and concept not in shortcut_concepts | derived:
                if concept not in worst or _excess(worst[concept], ev) < _excess(s, ev):
                    worst[concept] = s
    out = []
    for concept, s in worst.items():
        enc = encoding(summary, concept, t.confidence)
        if enc is None or enc["encoded"]:
            continue
        strength = _excess(s, ev) * (1 - min(max(enc["normalised"], 0), 1))
        figures = {"selectivity": enc["selectivity"], "encoding": enc, "slice": s.where, "slice_error_rate": _round(s.error_rate), "base_error_rate": _round(ev.error_rate), "n": s.n}
        out.append(Finding("concept_not_encoded", concept, strength, figures, {"kind": "concept_data", "concept": concept}))
    return out


def _excess(s: sl.Slice, ev: Evaluated) -> float:
    """The slice's errors beyond the base rate, as a share of all samples."""
    return s.n * (s.error_rate - ev.error_rate) / len(ev.labels)


def label_mistakes(ev: Evaluated, cards: list[dict]) -> list[Finding]:
    """The errors carded as likely label mistakes (reports/evidence.py: confident learning, with
    no intervention showing a model error), as one finding: review them. Its strength is their
    share of the samples, the accuracy correct labels would restore."""
    mine = sorted((c for c in cards if c["category"] == "label"), key=lambda c: c["rule"]["figures"]["rank"])
    if not mine:
        return []
    n_errors = int(ev.errors.sum())
    figures = {
        "n": len(mine),
        "share_of_errors": _round(len(mine) / n_errors),
        "flagged": mine[0]["rule"]["figures"]["of"],  # by confident learning, before the interventions had their say
        "error_rate": _round(ev.error_rate),
        "first": [{"id": c["id"], "given": c["label"], "likely": c["pred"]} for c in mine[:5]],
    }
    return [Finding("label_noise", "labels", len(mine) / len(ev.labels), figures, {"kind": "review_labels", "file": "label_issues.csv", "ids": [c["id"] for c in mine]})]


@dataclass
class Seen:
    """What a finding's detector reads: the stage summaries and results, the analysed samples,
    the error slices, the thresholds, the label-determining concept sets (label_sets, cue_sets),
    the findings detected before it, and (for detectors that run after them) the error cards.
    `notes` collects one line for each rule that lacked a link it needed."""

    summary: dict
    results: dict[str, StageResult]
    ev: Evaluated
    slices: list[sl.Slice]
    t: Thresholds = DEFAULT
    notes: list[str] = field(default_factory=list)
    sets: list[tuple[str, ...]] = field(default_factory=list)
    cues: list[tuple[str, ...]] = field(default_factory=list)
    found: list[Finding] = field(default_factory=list)
    cards: list[dict] | None = None
