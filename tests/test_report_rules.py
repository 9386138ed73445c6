"""Suggestion rules fire on a constructed finding and not on a clean model; category rules
fire in order, record their figures, and skip what has no evidence."""

import copy
import json

import numpy as np
import pytest

from mmdiag.reports import analyse, evidence, findings
from mmdiag.reports.samples import evaluated
from mmdiag.reports.thresholds import DEFAULT

import report_fixtures as fx


def _ids(analysis):
    return [s["id"] for s in analysis["suggestions"]]


@pytest.fixture(scope="module")
def clean():
    return analyse(*fx.run("clean"))


def test_shortcut_is_the_top_suggestion_with_a_decorrelate_action():
    suggestions = analyse(*fx.run("shortcut"))["suggestions"]
    top = suggestions[0]
    assert top["id"] == "shortcut:mark" and top["rank"] == 1
    assert top["action"] == {"kind": "decorrelate", "concept": "mark", "region": "mark", "modality": "image"}
    assert top["figures"]["error_rate_disagree"] > 0.4 and top["figures"]["error_rate_agree"] < 0.05
    assert {e["section"] for e in top["evidence"]} >= {"errors", "unimodal"}
    assert "missing_interaction:fusion" not in _ids({"suggestions": suggestions})  # far from additive


def test_missing_interaction_outranks_the_shortcut_of_an_additive_model():
    suggestions = analyse(*fx.run("additive"))["suggestions"]
    assert suggestions[0]["id"] == "missing_interaction:fusion"
    assert suggestions[0]["action"]["kind"] == "interaction_fusion"
    assert suggestions[0]["figures"]["label_from_two_concepts"] == 1.0
    shortcut = next(s for s in suggestions if s["id"] == "shortcut:mark")
    assert shortcut["priority"] < suggestions[0]["priority"]


def test_an_additive_model_that_could_combine_the_modalities_gets_the_shortcut_first():
    """The same figures from a model whose architecture combines the modalities (declared joint
    fusion): it was not built without the interaction, the shortcut let it do without."""
    summary, results, data = fx.run("additive")
    summary = copy.deepcopy(summary)
    summary["model"]["fusion"] = "joint"
    suggestions = analyse(summary, results, data)["suggestions"]
    assert suggestions[0]["id"] == "shortcut:mark"
    missing = next(s for s in suggestions if s["id"] == "missing_interaction:fusion")
    assert missing["action"]["kind"] == "interaction_training" and "can combine the modalities" in missing["title"]
    assert "FiLM" not in missing["change"] and missing["priority"] < suggestions[0]["priority"]


def test_missing_interaction_needs_data_that_needs_interaction():
    summary, results, data = fx.run("additive")
    data.meta = {k: v for k, v in data.meta.items() if k != "negation"}  # no pair predicts the label any more
    assert findings.missing_interaction(summary, results, evaluated(results, data)) == []


def _modality(unused: float, beyond: float) -> dict:
    figure = lambda v: {"value": v, "low": v - 0.02, "high": v + 0.02, "n": 400}  # noqa: E731
    return {"share": figure(0.5), "removal_flip_rate": figure(0.2), "readout_gain": 0.3, "model_gain": 0.3 - unused, "unused": figure(unused), "beyond_answer": figure(beyond)}


def test_ignored_modality_fires_where_a_modality_shows_what_the_model_leaves_unused():
    summary, results, data = fx.run("shortcut")
    ev = evaluated(results, data)
    summary = copy.deepcopy(summary)
    notes = []
    assert findings.ignored_modalities(summary, ev, notes=notes) == [] and "needs the intervention stage" in notes[0]
    summary["intervention"] = {"modalities": {"image": _modality(-0.1, 0.0), "text": _modality(0.2, 0.1)}}
    found = findings.ignored_modalities(summary, ev)
    assert [(f.subject, f.action["kind"]) for f in found] == [("text", "modality_dropout")]
    assert found[0].strength == pytest.approx(ev.error_rate * 0.2 / 0.3)  # the share of what it shows left unused
    assert "ignored_modality:text" in _ids(analyse(summary, results, data))
    # both must hold: the readout gains more than the model, and the modality adds to its answer
    summary["intervention"]["modalities"]["text"] = _modality(0.2, 0.01)
    assert findings.ignored_modalities(summary, ev) == []


def test_concept_not_encoded_fires_for_an_error_slice_concept_with_low_selectivity():
    data = fx.make_data(n=400)
    summary, results, _ = fx.run("clean", data=data, colour_selectivity=0.02)
    # plant errors where colour = 1
    logits = results["model"].arrays["logits"]
    wrong = (data.meta["colour"].numpy() == 1) & (np.arange(len(data)) % 2 == 0)
    logits[wrong] = -logits[wrong]
    analysis = analyse(summary, results, data)
    hit = next(s for s in analysis["suggestions"] if s["rule"] == "concept_not_encoded")
    assert hit["subject"] == "colour" and hit["action"] == {"kind": "concept_data", "concept": "colour"}
    summary["representation"]["probes"]["colour"]["decision"].update(accuracy=0.9, selectivity=0.4)
    assert not any(s["rule"] == "concept_not_encoded" for s in analyse(summary, results, data)["suggestions"])


def test_no_rule_fires_on_the_clean_model(clean):
    assert clean["suggestions"] == []
    assert clean["errors"]["slices"] == []


def test_every_error_has_a_categorised_card_and_the_analysis_is_json(clean):
    analysis = analyse(*fx.run("shortcut"))
    cards, counts = analysis["errors"]["cards"], analysis["errors"]["categories"]
    assert len(cards) == analysis["errors"]["n"] == sum(counts.values())
    for card in cards:
        assert card["category"] in counts
        assert [c["rule"] for c in card["checked"]][: len(card["checked"])] == evidence.RULES.names()[: len(card["checked"])]
        if card["category"] != "undetermined":
            assert card["rule"]["name"] == card["category"] and card["rule"]["sentence"]
    json.dumps(analysis, allow_nan=False)
    json.dumps(clean, allow_nan=False)


def test_shortcut_disagreement_is_reported_for_compare():
    analysis = analyse(*fx.run("shortcut"))
    mark = next(d for d in analysis["errors"]["disagreement"] if d["concept"] == "mark")
    assert mark["where"] == "mark≠label" and mark["accuracy"] < 0.6


# --- category rules on constructed cards ---


def _card(**parts):
    return {"id": 1, **parts}


PERCEIVED = {"method": "shapley", "modalities": {"image": {"relevant": {"regions": ["shape"], "mass": 0.6, "area": 0.2, "enrichment": 3.0}}}}
MISSED = {"method": "shapley", "modalities": {"image": {"relevant": {"regions": ["shape"], "mass": 0.1, "area": 0.2, "enrichment": 0.5}}}}
BOUND = {"pairs": [], "needed": {"image×text": {"regions": [], "mass": 0.5, "area": 0.1, "enrichment": 5.0}}}
UNBOUND = {"pairs": [], "needed": {"image×text": {"regions": [], "mass": 0.05, "area": 0.1, "enrichment": 0.5}}}
ENCODED = {"concepts": [{"concept": "colour", "value": 1, "read": 1, "selectivity": 0.4, "encoded": True}]}
MISREAD = {"concepts": [{"concept": "colour", "value": 1, "read": 0, "selectivity": 0.4, "encoded": True}]}
PUSHED = {
    "top": [{"feature": 0, "concept": "mark", "push": 2.0}],
    "by_concept": [{"concept": "mark", "share": 0.8, "features": 1, "null_p": 0.001}, {"concept": None, "share": 0.2, "features": 9, "null_p": None}],
}


# removing the shape moves the prediction less than random units do; the modalities hardly combine
IGNORED_SHAPE = {"modalities": {"image": {"interventions": [{"region": "image.shape", "margin_drop": 0.1, "null_margin_drop_median": 0.5}]}}}
USED_SHAPE = {"modalities": {"image": {"interventions": [{"region": "image.shape", "margin_drop": 2.0, "null_margin_drop_median": 0.5}]}}}
# the data needs the modalities combined and the additive part alone gives the wrong answer
APART = {"pairs": [], "needed": {}, "modality": {"value": 0.3, "gap": 1.0, "share": 0.3, "additive_answer": "c1", "additive_keeps": True}, "data_needs_interaction": True}
# the same sample where the data needs no interaction (no missing_interaction finding): no cause
NOT_NEEDED = {**APART, "data_needs_interaction": False}
# the data needs it, but the model's interaction made this answer: not the additive part's error
COMBINED = {**APART, "modality": {**APART["modality"], "additive_answer": "c0", "additive_keeps": False}}


@pytest.mark.parametrize(
    "parts, category, rule",
    [
        ({"perception": IGNORED_SHAPE, "interaction": APART}, "perception", "perception"),
        ({"perception": USED_SHAPE, "interaction": APART}, "interaction", "interaction"),
        # attribution, mixed gradients, probes and the surrogate are associations: no cause alone
        ({"perception": MISSED, "interaction": APART}, "interaction", "interaction"),
        ({"perception": MISSED, "interaction": NOT_NEEDED}, "undetermined", "perception"),
        ({"perception": MISSED, "interaction": COMBINED}, "undetermined", "perception"),
        ({"perception": MISSED, "interaction": UNBOUND}, "undetermined", "perception"),
        ({"perception": PERCEIVED, "interaction": UNBOUND}, "undetermined", "interaction"),
        ({"perception": PERCEIVED, "interaction": BOUND, "representation": MISREAD}, "undetermined", "representation"),
        ({"perception": PERCEIVED, "interaction": BOUND, "representation": ENCODED, "composition": PUSHED}, "undetermined", "composition"),
        ({"perception": PERCEIVED, "interaction": BOUND, "representation": ENCODED}, "undetermined", None),
        ({}, "undetermined", None),
    ],
)
def test_category_rules_fire_in_pipeline_order_and_only_on_interventions(parts, category, rule):
    card = evidence.categorise(_card(**copy.deepcopy(parts)))
    assert card["category"] == category
    assert (card["rule"] or {}).get("name") == rule
    assert bool((card["rule"] or {}).get("association_only")) == (category == "undetermined" and rule is not None)
    if card["rule"] and card["rule"].get("association_only"):
        assert card["rule"]["sentence"].startswith("Association only: ")
    skipped = [c["rule"] for c in card["checked"] if "skipped" in c]
    assert set(skipped) == {r for r in evidence.RULES.names() if r not in parts} & {c["rule"] for c in card["checked"]}


def test_category_rule_records_its_figures_and_threshold():
    card = evidence.categorise(_card(perception=copy.deepcopy(MISSED)))
    assert card["rule"]["name"] == "perception"
    assert card["rule"]["figures"] == {
        "modality": "image",
        "method": "shapley",
        "evidence": "attribution",
        "regions": ["shape"],
        "mass": 0.1,
        "area": 0.2,
        "enrichment": 0.5,
        "threshold": DEFAULT.perception_enrichment,
    }
    assert "0.50x their share" in card["rule"]["sentence"]


def test_a_concept_not_encoded_is_an_association():
    weak = {"concepts": [{"concept": "colour", "value": 1, "read": None, "selectivity": 0.02, "encoded": False}]}
    card = evidence.categorise(_card(representation=weak))
    assert card["category"] == "undetermined" and card["rule"]["name"] == "representation" and card["rule"]["association_only"]


def test_a_sample_stage_1_skipped_has_no_perception_evidence():
    summary, results, data = fx.run("shortcut")
    uni = results["unimodal"].arrays
    k = int(np.nonzero(uni["pred"] != uni["label"])[0][0])
    uni["attr.shapley.pred"][k, 0] = np.nan  # stage 1 lists such samples under `skipped`
    analysis = analyse(summary, results, data)
    card = next(c for c in analysis["errors"]["cards"] if c["id"] == int(uni["ids"][k]))
    assert "perception" not in card
    # with the earlier causes set aside, the perception rule is reached and skipped, not failed
    rest = evidence.categorise({k: v for k, v in card.items() if k not in ("shortcut", "ignored_modality", "label")})
    perception = next(c for c in rest["checked"] if c["rule"] == "perception")
    assert perception == {"rule": "perception", "skipped": evidence.RULES.get("perception").missing}
    json.dumps(analysis, allow_nan=False)


def test_a_concept_derived_from_the_label_is_no_evidence_of_interaction():
    summary, results, data = fx.run("additive")
    meta = {k: v.numpy() for k, v in data.meta.items()}
    labels = data.labels.numpy()
    meta["agrees"] = (meta["mark"] == labels).astype(int)
    assert findings.label_derived(meta, labels) == {"agrees", "mark"}
    assert findings.label_needs_pairs(meta, labels)["pair_concepts"] == ["colour", "negation"]


def test_an_or_needs_no_interaction_and_an_xor_does():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2, 800), rng.integers(0, 2, 800)
    for y, best in ((a | b, 1.0), (a ^ b, 0.6)):
        f, g = findings.additive_fit(a, b, y)
        accuracy = ((f[a] + g[b]).argmax(1) == y).mean()
        assert accuracy == 1.0 if best == 1.0 else accuracy < best
    assert not findings.label_needs_pairs({"a": a, "b": b}, a | b)["needs"]
    xor = findings.label_needs_pairs({"a": a, "b": b}, a ^ b)
    assert xor["needs"] and xor["gain"] > 0.4


def test_labels_no_concept_tells_need_no_interaction_however_many_values():
    """Six concepts of ten values and labels independent of them, N = 200: some pair of cells
    always fits the labels better than chance on the samples it is learnt from; on a held-out
    half it does not."""
    for seed in range(10):
        rng = np.random.default_rng(seed)
        meta = {f"c{i}": rng.integers(0, 10, 200) for i in range(6)}
        assert not findings.label_needs_pairs(meta, rng.integers(0, 2, 200))["needs"]


def test_determining_sets_and_causes():
    from mmdiag.reports import reliance

    rng = np.random.default_rng(1)
    colour, word, other = rng.integers(0, 2, 600), rng.integers(0, 2, 600), rng.integers(0, 3, 600)
    meta = {"colour": colour, "word": word, "other": other}
    sets = reliance.determining_sets(meta, colour ^ word)
    assert sets == [("colour", "word")]
    assert reliance.causal("colour", sets, None) is True and reliance.causal("other", sets, None) is False
    assert reliance.causal("other", [], None) is None  # nothing determines the label: cannot tell
    # a counterfactual that keeps the label says the concept is not a cause, whatever the data
    assert reliance.causal("colour", sets, {"label_changed_rate": {"value": 0.0}}) is False


def test_a_rare_concept_encoded_perfectly_is_encoded():
    """10% prevalence: a probe that reads it perfectly beats its control task by 0.1 at most
    (the control predicts the majority), which a fixed selectivity bar of 0.1 calls 'not
    encoded'; against its interval it is encoded, and a concept the layer does not carry is not."""
    import torch

    from mmdiag.stages.representation import RepresentationConfig, fit_probes

    g = torch.Generator().manual_seed(0)
    rare = (torch.rand(2000, generator=g) < 0.1).long()
    layer = torch.cat([rare[:, None].float() + 0.05 * torch.randn(2000, 1, generator=g), torch.randn(2000, 7, generator=g)], 1)
    other = (torch.rand(2000, generator=g) < 0.1).long()
    probes = fit_probes({"decision": layer}, {"rare": rare, "other": other}, RepresentationConfig(), 0, torch.device("cpu"))
    summary = {"representation": {"probes": probes}}
    rare_enc, other_enc = findings.encoding(summary, "rare"), findings.encoding(summary, "other")
    assert probes["rare"]["decision"]["selectivity"] <= 0.12 and rare_enc["encoded"] and rare_enc["normalised"] > 0.9
    assert not other_enc["encoded"]


LABEL = {"flagged": True, "rank": 1, "of": 3, "given_probability": 0.02, "predicted_probability": 0.98, "likely": "true"}


@pytest.mark.parametrize(
    "kept, concepts_say, category, association",
    [
        (0.9, "true", "label", False),  # stable, and the label's causes give the model's answer
        (0.9, None, "label", False),  # no concept determines the label: the null removals decide
        (0.5, "true", "undetermined", False),  # half the random removals change it: not "most"
        (0.9, "false", "undetermined", False),  # the causes say the label is right: a model error
        (None, None, "undetermined", True),  # confident learning alone: an association
        (0.9, "cannot tell", "undetermined", False),  # concepts determine the label, but not this sample's
    ],
)
def test_the_label_rule_needs_a_stable_answer_that_the_labels_causes_share(kept, concepts_say, category, association):
    told = {"concepts_say": None, "concepts_tell": True} if concepts_say == "cannot tell" else {"concepts_say": concepts_say}
    card = evidence.categorise(_card(label={**LABEL, "null_kept": kept, **told}))
    assert card["category"] == category
    assert bool(card["rule"] and card["rule"].get("association_only")) == association


def test_a_sample_a_shortcut_points_to_its_prediction_is_no_label_mistake():
    card = evidence.categorise(_card(label={**LABEL, "null_kept": 0.9, "concepts_say": None, "follows_shortcut": ["word:zz"]}))
    assert card["category"] == "undetermined"


def test_label_issues_csv_has_a_header_even_when_empty():
    from mmdiag.reports import label_issues_csv

    assert label_issues_csv([]) == "row,id,given,likely,given_probability,likely_probability,evidence\n"
    line = label_issues_csv([{"row": 3, "id": 7, "given": "a", "likely": "b", "given_probability": 0.1, "likely_probability": 0.9, "evidence": "x, y"}])
    assert line.splitlines()[1] == '3,7,a,b,0.1,0.9,"x, y"'


def test_a_regions_effect_beyond_its_null_is_judged_at_the_rules_corrected_level():
    """An effect whose interval clears 0 at the stage's 95% but not once Bonferroni-corrected for
    the rule's 20 tests (a normal interval re-drawn from the stage's half-width)."""
    from mmdiag.pipeline import stats
    from mmdiag.reports import reliance

    effect = {"value": 0.02, "low": 0.001, "high": 0.039, "n": 400}
    none = {"value": 0.0, "low": -0.01, "high": 0.01, "n": 400}
    region = {
        "n": 400,
        "units": 4,
        "flip_rate": {"value": 0.05},
        "null_flip_rate": {"value": 0.03},
        "flip_effect": effect,
        "margin_effect": none,
        "fixes_error_rate": {"value": 0.1},
        "null_fixes_error_rate": {"value": 0.05},
    }
    summary = {"intervention": {"confidence": 0.95, "regions": {"image.mark": region}}}
    assert reliance.intervention(summary, [("image", "mark")])["beyond_null"]
    assert not reliance.intervention(summary, [("image", "mark")], stats.z_value(0.95, 20))["beyond_null"]
    # one flip in 2,000 with the label kept clears 0 at any level: the Wilson interval is re-drawn at the rule's
    kept = {"intervention": {"confidence": 0.95, "counterfactuals": {"c": {"flip_rate_label_kept": {"value": 0.0005, "low": 0.0001, "high": 0.003, "n": 2000}, "fixes_error_rate": {"value": 0.0}}}}}
    assert reliance.counterfactual(kept, "c", stats.z_value(0.95, 20))["tested_at_z"] > 3


def test_a_concept_computed_from_the_label_is_never_not_encoded():
    """The same planted slice as above, on a concept that is the label's function (a copy of the
    answer, or whether the answer is class 1): not encoding it is the model's error itself."""
    import dataclasses

    import torch

    data = fx.make_data(n=400)
    summary, results, _ = fx.run("clean", data=data, colour_selectivity=0.02)
    logits = results["model"].arrays["logits"]
    wrong = (data.labels.numpy() == 1) & (np.arange(len(data)) % 2 == 0)
    logits[wrong] = -logits[wrong]
    for name, values in {"answer": data.labels.clone(), "answer_is_1": (data.labels == 1).long()}.items():
        planted = dataclasses.replace(data, meta={**data.meta, name: values})
        summary["representation"]["probes"][name] = copy.deepcopy(summary["representation"]["probes"]["colour"])
        assert name in findings.label_functions({k: v.numpy() for k, v in planted.meta.items()}, planted.labels.numpy())
        assert not any(s["subject"] == name for s in analyse(summary, results, planted)["suggestions"])
    assert not findings.label_functions({"colour": data.meta["colour"].numpy()}, torch.randint(0, 2, (400,)).numpy())


def test_a_concepts_push_is_compared_with_as_many_random_features():
    share = np.array([0.8, 0.05, 0.05, 0.05, 0.05])
    # one feature of five carries 0.8: a random single feature does so one time in five
    assert evidence.random_share_p(share, 1, 0.8, seed=0) == pytest.approx(0.2, abs=0.04)
    assert evidence.random_share_p(share, 5, 1.0, seed=0) == 1.0  # every feature: no evidence
    assert evidence.random_share_p(np.full(40, 1 / 40), 4, 0.1, seed=0) == 1.0  # a fair share is no push
    big = np.r_[np.full(4, 0.2), np.full(36, 0.2 / 36)]
    assert evidence.random_share_p(big, 4, 0.8, seed=0) < 0.01  # four features of forty carry 80%
    card = {"composition": {"top": [], "by_concept": [{"concept": "mark", "share": 0.3, "features": 4, "null_p": 0.2}]}}
    assert evidence.composition_rule(card, DEFAULT)[0] is False  # 30% that random features reach as often is no push
