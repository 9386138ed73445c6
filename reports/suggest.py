"""Ranked debugging suggestions: each finding becomes a title, the evidence behind it (figures
with links to the report's sections), the concrete change, a machine-readable `action` and a
priority.

Priority = the finding's strength (share of samples at stake). One precedence rule: when the
model behaves additively and the data needs interaction, either the architecture cannot combine
the modalities (late fusion, or not declared): then a shortcut (and an ignored modality of the
needed pair) is a symptom, since decorrelating the data cannot teach an additive model the rule;
or it can (the adapter declares joint fusion: attention over both, FiLM): then the missing
interaction (and an ignored modality of the needed pair) is the symptom of a shortcut that let
training stop short of the rule. The symptom's
priority is scaled by `additive_shortcut_discount`. A second: a prior on a word that a shortcut
finding names (`word:<w>` found, or a concept named `w`) is that shortcut seen from the other
modality (the model answers those samples from the word, so another image changes nothing):
the prior is the symptom.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mmdiag.pipeline.registry import Registry
from mmdiag.reports import findings as fd
from mmdiag.reports.findings import Finding
from mmdiag.reports.thresholds import DEFAULT, Thresholds


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _num(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def reliance_sentence(c: str, g: dict) -> str:
    """The evidence that decided a shortcut, as a sentence a reader can check."""
    e, by = g["evidence"], g["decided_by"]
    if by == "counterfactual" and "flip_rate_label_kept" not in e[by]:
        k = e[by]
        return (
            f"applying {c} flips {_pct(k['flip_rate'])} of the predictions against {_pct(k['null_flip_rate'])} for a random colour change as large "
            f"({_pct(k['flip_effect']['low'])}–{_pct(k['flip_effect']['high'])} more, {k['n']} samples), and makes {_pct(k['fixes_error_rate'])} of the errors right "
            f"(the random change: {_pct(k['null_fixes_error_rate'])})"
        )
    if by == "counterfactual":
        k = e[by]["flip_rate_label_kept"]
        return f"flipping {c} with the label unchanged flips {_pct(k['value'])} of the predictions ({_pct(k['low'])}–{_pct(k['high'])}, {k['n']} samples)"
    if by == "intervention":
        i = e[by]
        return (
            f"removing {i['region']} ({_num(i['units'], 1)} units) flips {_pct(i['flip_rate'])} of the predictions against {_pct(i['null_flip_rate'])} for as many random units "
            f"of the same modality, and makes {_pct(i['fixes_error_rate'])} of the errors right (random units: {_pct(i['null_fixes_error_rate'])})"
        )
    if by == "attribution":
        a = e[by]
        return (
            f"its region {a['region']} outranks {_pct(a['rank']['value'])} of random unit sets of its size in attribution "
            f"({a['method']}; {_pct(a['rank']['low'])}–{_pct(a['rank']['high'])}, 50% by chance)"
        )
    w = e[by]
    return f"its features carry {_pct(w['weight_share'])} of the composition's weights against {_pct(w['null_weight_share'])} for random features (p = {_num(w['p_value'])})"


def shortcut(f: Finding) -> dict:
    c, g = f.subject, f.figures
    e = g["evidence"]
    inter, cf, att, comp = e.get("intervention"), e.get("counterfactual"), e.get("attribution"), e.get("composition")
    return {
        "title": f"Shortcut: the model follows {c} instead of the label; decorrelate {c} from the label",
        "finding": (
            f"Where {c} disagrees with the label the error rate is {_pct(g['error_rate_disagree'])} ({g['n_disagree']} samples), against {_pct(g['error_rate_agree'])} where it agrees "
            f"(difference {_pct(g['error_rate_gap']['low'])}–{_pct(g['error_rate_gap']['high'])}); {reliance_sentence(c, g)}."
            + (f" The label is determined without it (by {', '.join(g['label_determined_by'][0])})." if g["label_determined_by"] else "")
        ),
        "evidence": [
            {"label": f"error rate where {c}≠label", "value": g["error_rate_disagree"], "section": "errors"},
            {"label": f"error rate where {c}=label", "value": g["error_rate_agree"], "section": "errors"},
            {"label": f"prediction is the class {c} points to", "value": g["follows"], "section": "errors"},
            {"label": f"flip rate, {c} flipped (label kept)", "value": cf and cf.get("flip_rate_label_kept", {}).get("value"), "section": "intervention"},
            {"label": f"flip rate, {c} applied", "value": cf and cf.get("flip_rate"), "section": "intervention"},
            {"label": "flip rate, a random colour change as large", "value": cf and cf.get("null_flip_rate"), "section": "intervention"},
            {"label": f"flip rate, region of {c} removed", "value": inter and inter["flip_rate"], "section": "intervention"},
            {"label": "flip rate, as many random units removed", "value": inter and inter["null_flip_rate"], "section": "intervention"},
            {"label": f"errors made right by removing the region of {c}", "value": inter and inter["fixes_error_rate"], "section": "intervention"},
            {"label": f"attribution rank of {c}'s region among random sets (0.5 = chance)", "value": att and att["rank"]["value"], "section": "unimodal"},
            {"label": f"composition weight share of {c}", "value": comp and comp["weight_share"], "section": "composition"},
        ],
        "change": (
            f"Counterfactual data augmentation: add training samples with {c} flipped (added or removed) independently of the label, "
            f"or reweight the training data so that the {c}≠label slice counts as much as the {c}=label slice (P(label | {c}) = P(label)). "
            f"Retrain, then check accuracy where {c}≠label and that removing {c} no longer flips predictions."
        ),
    }


def ignored_modality(f: Finding) -> dict:
    m, g = f.subject, f.figures
    share, flips, unused = g["share"], g["removal_flip_rate"], g["unused"]
    return {
        "title": f"The model ignores what {m} shows of the label: train with modality dropout or balanced losses",
        "finding": (
            f"A readout refitted to the labels gains {_num(g['readout_gain'])} of Brier score from {m} beyond the other modalities (out of fold), the model only "
            f"{_num(g['model_gain'])} (removing {m} from every sample): it leaves {_num(unused['value'])} unused ({_num(unused['low'])}–{_num(unused['high'])}). "
            f"{m} accounts for {_pct(share['value'])} of what the modalities change in the logit, and removing it changes {_pct(flips['value'])} of the predictions, "
            f"while {_pct(g['error_rate'])} of the predictions are wrong" + (f"; the label depends on {', '.join(g['needed_concepts'])}, which {m} shows." if g["needed_concepts"] else ".")
        ),
        "evidence": [
            {"label": f"Brier score the model leaves unused in {m}", "value": unused["value"], "section": "intervention"},
            {"label": f"share of the modality-level logit change of {m}", "value": share["value"], "section": "intervention"},
            {"label": f"predictions changed by removing {m}", "value": flips["value"], "section": "intervention"},
        ],
        "change": (
            f"Modality dropout: remove the other modalities for a fraction of the training batches (e.g. 30%) so the model must use {m}; "
            f"or balance the losses (an auxiliary head on {m} alone, gradient blending / on-the-fly gradient modulation). Check that the unused part of {m} shrinks."
        ),
    }


def _interaction_evidence(g: dict) -> list[dict]:
    return [
        {"label": "full accuracy", "value": g["full_accuracy"], "section": "crossmodal"},
        {"label": "additive (EMAP) accuracy", "value": g["additive_accuracy"], "section": "crossmodal"},
        {"label": "full model right where the additive part is wrong", "value": g["rescued"], "section": "crossmodal"},
        {"label": "label from the best pair of concepts", "value": g["label_from_two_concepts"], "section": "errors"},
    ]


def missing_interaction(f: Finding) -> dict:
    g = f.figures
    pair = " and ".join(g["pair"] or []) or "two concepts"
    follows = g.get("additive_follows")
    mods = g.get("modalities")
    between = f" between {mods['pair'][0]} and {mods['pair'][1]}" if mods else ""
    now = (
        f" The {mods['pair'][0]}×{mods['pair'][1]} interaction is now {_pct(mods['interaction']['abs_share'])} of the modality-level logit change."
        if mods and mods.get("interaction") and mods["interaction"].get("abs_share") is not None
        else ""
    )
    if g.get("fusion") == "joint":
        return {
            "title": f"Missing cross-modal interaction{between}: the architecture can combine the modalities, the trained model does not",
            "finding": (
                f"The additive projection of the model (EMAP) is as accurate as the model itself ({_num(g['additive_accuracy'])} vs {_num(g['full_accuracy'])}), "
                f"although its modalities meet inside the model and the label needs {pair} together ({_pct(g['label_from_two_concepts'])} predictable from the pair, "
                f"{_pct(g['label_from_one_concept'])} from any one concept); {_pct(g['error_rate'])} of the predictions are wrong."
                + (f" The additive part follows {follows['concept']} ({_pct(follows['rate'])})." if follows else "")
                + now
            ),
            "evidence": _interaction_evidence(g),
            "change": (
                "Keep the architecture: remove what lets training stop short of the rule (decorrelate the shortcut found here from the label), or train longer "
                "with samples where the single concepts disagree with the label; check that the gap between full and additive accuracy opens."
            ),
        }
    return {
        "title": f"Missing cross-modal interaction{between}: use a fusion that can combine the modalities (FiLM, cross-attention)",
        "finding": (
            f"The additive projection of the model (EMAP) is as accurate as the model itself ({_num(g['additive_accuracy'])} vs {_num(g['full_accuracy'])}), "
            f"but the label needs {pair} together ({_pct(g['label_from_two_concepts'])} predictable from the pair, {_pct(g['label_from_one_concept'])} from any one concept); "
            f"{_pct(g['error_rate'])} of the predictions are wrong." + (f" The additive part follows {follows['concept']} ({_pct(follows['rate'])})." if follows else "") + now
        ),
        "evidence": _interaction_evidence(g),
        "change": (
            f"Replace the additive (late, concatenation) fusion{between} by one that can bind units across modalities: FiLM conditioning of one encoder on the other, "
            "or cross-attention between tokens and image patches. Retrain and check that the gap between full and "
            "additive accuracy opens and that accuracy rises on the error slices."
        ),
    }


def concept_not_encoded(f: Finding) -> dict:
    c, g = f.subject, f.figures
    return {
        "title": f"The model does not encode {c}: add data or supervision for it",
        "finding": f"Errors concentrate in {g['slice']} ({_pct(g['slice_error_rate'])} against {_pct(g['base_error_rate'])} overall, {g['n']} samples), "
        f"and a linear probe reads {c} at the decision layer with selectivity {_num(g['selectivity'], 2)}.",
        "evidence": [
            {"label": f"probe selectivity of {c}", "value": g["selectivity"], "section": "representation"},
            {"label": f"error rate in {g['slice']}", "value": g["slice_error_rate"], "section": "slices"},
        ],
        "change": f"Collect or generate more samples that vary {c}, balanced over the label, or add an auxiliary loss that predicts {c} "
        "from the fused features; check that its probe selectivity rises.",
    }


def label_noise(f: Finding) -> dict:
    g = f.figures
    first = ", ".join(f"{e['id']} ({e['given']} -> {e['likely']})" for e in g["first"])
    return {
        "title": f"Label mistakes: review {g['n']} labels (label_issues.csv); these errors are not the model's",
        "finding": (
            f"{g['n']} of the errors ({_pct(g['share_of_errors'])}) are likely label mistakes: confident learning flags them (the model is confidently of "
            f"another class than the label, beyond each class's own confidence), and no intervention makes them right, as it would a shortcut's. "
            f"Most likely first: {first}."
        ),
        "evidence": [
            {"label": "errors that are likely label mistakes", "value": g["share_of_errors"], "section": "errors"},
            {"label": "error rate", "value": g["error_rate"], "section": "errors"},
        ],
        "change": (
            "Review the samples of label_issues.csv in the run folder (most likely first) and correct their labels; rerun the diagnosis (`mmdiag rerun`) to see "
            "the error rate without them. Where they are right after all, the model errs confidently on them: look at their cards."
        ),
    }


def prior(f: Finding) -> dict:
    g = f.figures
    word, m, text = g["word"], g["modality"], g["text"]
    return {
        "title": f'Answers to {text} with "{word}" do not depend on the {m}: a prior the model learnt from the wording',
        "finding": (
            f'Replacing the {m} with other samples\' changes {_pct(g["flip_rate"])} of the answers where the {text} holds "{word}" ({g["n"]} samples), '
            f"{_pct(g['flip_rate_elsewhere'])} elsewhere; the model errs on {_pct(g['error_rate'])} of them, {_pct(g['error_rate_elsewhere'])} elsewhere "
            f"(both beyond chance, q = {_num(g['q_value'])}). {g['errors_unmoved']} errors ({_pct(g['errors_explained'])} of all) keep their answer whatever the {m}."
        ),
        "evidence": [
            {"label": f'answers changed by another {m}, with "{word}"', "value": g["flip_rate"], "section": "discovery"},
            {"label": f"answers changed by another {m}, elsewhere", "value": g["flip_rate_elsewhere"], "section": "discovery"},
            {"label": f'error rate with "{word}"', "value": g["error_rate"], "section": "discovery"},
            {"label": "errors it explains", "value": g["errors_explained"], "section": "discovery"},
        ],
        "change": (
            f'Balance the training data of this slice: {text} with "{word}" whose answers vary with the {m} as much as elsewhere (the same wording with '
            f"each answer, counterfactual {m}s); then check that replacing the {m} changes these answers as often as the others."
        ),
    }


@dataclass(frozen=True)
class FindingRule:
    """One kind of finding: `detect` reads what the stages found (findings.Seen) and returns its
    findings (each with the figures it used and its strength); `write` turns one into a
    suggestion's title, evidence and change. Detectors run in registration order, each seeing
    the findings before it; those with `after_cards` run once the error cards are categorised."""

    name: str
    detect: Callable[[fd.Seen], list[Finding]]
    write: Callable[[Finding], dict]
    after_cards: bool = False


FINDINGS: Registry[FindingRule] = Registry("finding rule", "report findings")
for _rule in (
    FindingRule("shortcut", lambda s: fd.shortcuts(s.summary, s.results, s.ev, s.t, s.notes, s.sets, s.cues), shortcut),
    FindingRule("ignored_modality", lambda s: fd.ignored_modalities(s.summary, s.ev, s.t, s.notes, s.sets, s.cues), ignored_modality),
    FindingRule("missing_interaction", lambda s: fd.missing_interaction(s.summary, s.results, s.ev, s.t), missing_interaction),
    FindingRule("prior", lambda s: fd.priors(s.summary, s.ev), prior),
    FindingRule("concept_not_encoded", lambda s: fd.concepts_not_encoded(s.summary, s.ev, s.slices, {f.subject for f in s.found if f.rule == "shortcut"}, s.t), concept_not_encoded),
    FindingRule("label_noise", lambda s: fd.label_mistakes(s.ev, s.cards), label_noise, after_cards=True),
):
    FINDINGS.register(_rule)


def detect(seen: fd.Seen, after_cards: bool = False) -> list[Finding]:
    """The findings of every registered rule of this phase (before or after the cards), added
    to `seen.found` as they come."""
    new = []
    for rule in FINDINGS:
        if rule.after_cards == after_cards:
            got = rule.detect(seen)
            seen.found += got
            new += got
    return new


def priority(f: Finding, findings: list[Finding], t: Thresholds = DEFAULT) -> float:
    """The finding's strength, discounted when it is a symptom. When the model is additive and
    the data needs interaction: if its architecture cannot combine the modalities, a shortcut
    and an ignored modality of the needed pair are symptoms of the fusion (an additive model
    cannot use a modality whose meaning depends on the other); if it can, the missing
    interaction, and an ignored modality of the needed pair, are symptoms of the shortcut. A
    prior on a word a shortcut names is a symptom of the shortcut."""
    if f.rule == "prior" and any(g.rule == "shortcut" and g.subject in (f"word:{f.figures['word']}", f.figures["word"]) for g in findings):
        return round(max(f.strength, 0.0) * t.additive_shortcut_discount, 4)
    additive = next((g for g in findings if g.rule == "missing_interaction"), None)
    pair = ((additive.figures.get("modalities") or {}).get("pair") or []) if additive else []
    needed = f.rule == "ignored_modality" and (f.subject in pair or not pair)
    if additive is not None and additive.figures.get("fusion") == "joint":
        symptom = (f is additive or needed) and any(g.rule == "shortcut" for g in findings)
        return round(max(f.strength, 0.0) * (t.additive_shortcut_discount if symptom else 1.0), 4)
    symptom = additive is not None and (f.rule == "shortcut" or needed)
    return round(max(f.strength, 0.0) * (t.additive_shortcut_discount if symptom else 1.0), 4)


def suggestions(findings: list[Finding], t: Thresholds = DEFAULT) -> list[dict]:
    """One suggestion per finding, highest priority first."""
    out = []
    for f in findings:
        text = FINDINGS.get(f.rule).write(f)
        text["evidence"] = [e for e in text["evidence"] if e["value"] is not None]
        out.append({"id": f"{f.rule}:{f.subject}", "rule": f.rule, "subject": f.subject, **text, "action": f.action, "figures": f.figures, "priority": priority(f, findings, t)})
    out.sort(key=lambda s: -s["priority"])
    for rank, s in enumerate(out, 1):
        s["rank"] = rank
    return out
