"""`analyse`: error slices, per-error evidence cards and categories, and ranked suggestions,
from a run's summary, its stage results and the analysed data. Reads results; recomputes none.
"""

from __future__ import annotations

import csv
import io

import numpy as np

from mmdiag.pipeline.data import SampleSet
from mmdiag.reports import evidence, findings, label_issues, reliance, suggest
from mmdiag.reports import slices as sl
from mmdiag.reports.samples import Evaluated, binary_concepts, evaluated
from mmdiag.reports.thresholds import DEFAULT, Thresholds
from mmdiag.stages.base import StageResult


def slice_columns(results: dict[str, StageResult], ev: Evaluated, t: Thresholds, seed: int) -> dict[str, sl.Column]:
    """The concepts to slice on: the data's meta, the features mmdiag found (carried or not: a
    slice then has a name without annotations, the Domino idea), the label, and (with stage 3)
    clusters of the decision-level features."""
    meta = {k: v.numpy() for k, v in ev.data.meta.items()}
    cols = sl.columns(meta, ev.labels, ev.data.class_names, t.max_values)
    for name in ev.data.found:
        cols[name] = sl.Column((meta[name] >= 0).astype(np.int64), {1: "yes", 0: "no"})
    rep = results.get("representation")
    decision = ev.in_data_order(rep, "decision") if rep is not None and "decision" in rep.arrays else None
    if decision is not None:
        cols["cluster"] = sl.cluster_column(decision, t, seed)
    return cols


def refitted(results: dict[str, StageResult], ev: Evaluated, seed: int) -> np.ndarray | None:
    """Out-of-fold probabilities of a readout refitted to this split's labels (label_issues.
    cross_fitted), the second opinion on label mistakes, on stage 3's layers before the decision
    (every layer counting alike): the decision layer has collapsed onto the model's answer, where a confident
    error's neighbours are the samples it gets right; the earlier layers still show the input
    (a hidden object). The decision layer where no other is read; None without stage 3."""
    rep = results.get("representation")
    if rep is None:
        return None
    names = sorted(k for k in rep.arrays if k.startswith("layer.")) or (["decision"] if "decision" in rep.arrays else [])
    blocks = [x for x in (ev.in_data_order(rep, n) for n in names) if x is not None]
    return label_issues.cross_fitted(blocks, ev.labels, ev.probs.shape[1], seed) if blocks else None


def disagreement(ev: Evaluated) -> list[dict]:
    """Accuracy where each binary concept disagrees with a binary label: the slice a shortcut
    fails on, kept for every run so that `compare` can show it before and after a fix."""
    if len(np.unique(ev.labels)) != 2:
        return []
    out = []
    for concept, values in binary_concepts(ev.data).items():
        rows = (values >= 0) & (values != ev.labels)
        if rows.any():
            out.append({"where": f"{concept}≠label", "concept": concept, "n": int(rows.sum()), "accuracy": round(float(1 - ev.errors[rows].mean()), 4)})
    return out


def set_aside(summary: dict, ev: Evaluated, detected: list[findings.Finding], sets: list[tuple[str, ...]]) -> set[str]:
    """Truth regions (and concepts) that are no evidence of what a sample needs: the shortcuts'
    (and their concepts), and regions whose concept the data shows not to matter for the label
    (reports/reliance.causal is False)."""
    cuts = [f.subject for f in detected if f.rule == "shortcut"]
    out = {r for c in cuts for _, r in reliance.linked_regions(ev, c)} | set(cuts)
    for m, regions in ev.data.truth.items():
        for r in regions:
            concept = ev.data.concept_of(m, r)
            figures = ((summary.get("intervention") or {}).get("counterfactuals") or {}).get(concept)
            if concept is not None and reliance.causal(concept, sets, figures) is False:
                out.add(r)
    return out


def label_issue_rows(ev: Evaluated, cards: list[dict]) -> list[dict]:
    """The errors carded as label mistakes, most likely first: what `label_issues.csv` holds."""
    rows = sorted((c for c in cards if c["category"] == "label"), key=lambda c: c["rule"]["figures"]["rank"])
    return [
        {
            "row": c["row"],
            "id": c["id"],
            "given": c["label"],
            "likely": c["pred"],
            "given_probability": c["rule"]["figures"]["given_probability"],
            "likely_probability": c["rule"]["figures"]["predicted_probability"],
            "evidence": c["rule"]["sentence"],
        }
        for c in rows
    ]


COLUMNS = ("row", "id", "given", "likely", "given_probability", "likely_probability", "evidence")


def label_issues_csv(rows: list[dict]) -> str:
    """label_issues.csv: one line per likely label mistake, most likely first (a header alone
    where there is none)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def analyse(summary: dict, results: dict[str, StageResult], data: SampleSet, thresholds: Thresholds = DEFAULT, seed: int = 0) -> dict:
    """{"errors": {n, error_rate, slices, categories, association_only, disagreement, label_issues,
    cards, notes}, "suggestions": [...]};
    `notes` holds one line for every rule that lacked a link it needed (docs/report.md)."""
    ev = evaluated(results, data)
    cols = slice_columns(results, ev, thresholds, seed)
    found = sl.find(ev.errors, cols, thresholds)
    named = [(f"s{i}", s) for i, s in enumerate(found, 1)]
    notes: list[str] = []
    sets = findings.label_sets(ev, thresholds)
    seen = findings.Seen(summary, results, ev, found, thresholds, notes, sets, findings.cue_sets(ev, thresholds))
    detected = suggest.detect(seen)
    flagged = label_issues.ranked(ev.probs, ev.labels, label_issues.find(ev.probs, ev.labels))
    refit = refitted(results, ev, seed)
    src = evidence.Sources(
        ev,
        summary,
        results,
        named,
        set_aside(summary, ev, detected, sets),
        evidence.readings(summary, results, ev),
        detected,
        {int(r): k for k, r in enumerate(flagged, 1)},
        reliance.consensus(ev.data.meta, ev.labels, sets, thresholds.confidence),
        refit,
        None if refit is None else label_issues.neighbours_say(refit, ev.labels, thresholds.confidence),
    )
    cards = evidence.cards(src, thresholds)
    for c in cards:  # a cause that is a feature mmdiag found names it
        if c["rule"] and (c["rule"]["figures"] or {}).get("concept") in data.found:
            c["rule"]["feature"] = data.found[c["rule"]["figures"]["concept"]]
    seen.cards = cards
    detected += suggest.detect(seen, after_cards=True)
    categories = {c: 0 for c in (*evidence.categories(), "undetermined")}
    for c in cards:
        categories[c["category"]] += 1
    records = []
    for i, s in named:
        record = s.record(int(i[1:]))
        if s.kind == "cluster":
            record["profile"] = sl.profile(s.mask, cols)
        records.append(record)
    return {
        "errors": {
            "n": int(ev.errors.sum()),
            "error_rate": round(ev.error_rate, 4),
            "slices": records,
            "categories": categories,
            "association_only": sum(bool((c["rule"] or {}).get("association_only")) for c in cards),
            "disagreement": disagreement(ev),
            "label_issues": label_issue_rows(ev, cards),
            "cards": cards,
            "notes": notes,
        },
        "suggestions": [{**s, "feature": data.found[s["subject"]]} if s["subject"] in data.found else s for s in suggest.suggestions(detected, thresholds)],
    }
