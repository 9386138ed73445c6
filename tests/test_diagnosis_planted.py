"""The diagnosis on models it has not been tuned on: small models with one bug planted each
(tests/planted.py), every bug proven from the model itself before the diagnosis is asserted.

For each: the top suggestion names the planted bug and its modality, and the per-error cause is
right on >= 90% of the errors whose cause is known by construction. A clean model gets no
suggestion, and a rule that lacks a link it needs says so.
"""

import numpy as np
import pytest
import torch

import planted as pl
from inprocess import diagnose

SEED_EVAL = 7


def _causes(analysis, rows) -> dict[str, int]:
    want = set(np.flatnonzero(rows).tolist())
    out: dict[str, int] = {}
    for card in analysis["errors"]["cards"]:
        if card["row"] in want:
            out[card["category"]] = out.get(card["category"], 0) + 1
    return out


def _share(causes: dict[str, int], category: str) -> float:
    return causes.get(category, 0) / max(sum(causes.values()), 1)


def _errors(model, data) -> np.ndarray:
    with torch.no_grad():
        return model(data.inputs).argmax(1).numpy() != data.labels.numpy()


def _prove_shortcut(model, data, concept: str) -> None:
    v, y = data.meta[concept].numpy(), data.labels.numpy()
    agree, disagree = pl.accuracy(model, data, v == y), pl.accuracy(model, data, v != y)
    assert agree - disagree > 0.15, f"the planted {concept} shortcut did not take: {agree:.2f} vs {disagree:.2f}"


def _assert_shortcut(analysis, data, model, concept: str, modality: str) -> None:
    top = analysis["suggestions"][0]
    assert top["id"] == f"shortcut:{concept}", [s["id"] for s in analysis["suggestions"]]
    assert top["action"]["modality"] == modality
    assert top["figures"]["decided_by"] in ("counterfactual", "intervention")
    # errors where the concept points to the predicted class against the label are shortcut errors by construction
    with torch.no_grad():
        pred = model(data.inputs).argmax(1).numpy()
    v, y = data.meta[concept].numpy(), data.labels.numpy()
    causes = _causes(analysis, (pred != y) & (v == pred))
    assert sum(causes.values()) >= 20
    assert _share(causes, "shortcut") >= 0.9, causes


TEXT_SHORTCUT = {"short captions": (3, 6), "long captions": (10, 14)}


@pytest.mark.parametrize("caption", TEXT_SHORTCUT.values(), ids=TEXT_SHORTCUT.keys())
def test_a_word_shortcut_is_found_whatever_the_caption_length(caption):
    world = pl.World(label=lambda c: c["colour"], spurious={"zz": 0.9}, caption=caption, contrast=0.25)
    model = pl.train(world)
    data = pl.samples(world, 600, seed=SEED_EVAL, p_spurious={"zz": 0.5})
    _prove_shortcut(model, data, "zz")
    summary, _, analysis = diagnose(model, data)
    _assert_shortcut(analysis, data, model, "zz", "text")
    # one token among 3-16 is judged against one random token, not against its share of the units
    zz = summary["intervention"]["regions"]["text.zz"]
    assert zz["units"] == 1.0 and zz["flip_effect"]["low"] > 0


def test_a_shortcut_in_the_image_of_a_model_that_uses_the_text():
    world = pl.World(label=lambda c: c["colour"] ^ c["negation"], spurious={"mark": 0.9}, contrast=0.35)
    model = pl.train(world, steps=3000)
    data = pl.samples(world, 600, seed=SEED_EVAL, p_spurious={"mark": 0.5})
    _prove_shortcut(model, data, "mark")
    # the model uses the text: flipping "not" matters, which no text-blind model could do
    summary, _, analysis = diagnose(model, data)
    assert summary["intervention"]["regions"]["text.negation"]["flip_effect"]["low"] > 0.05
    _assert_shortcut(analysis, data, model, "mark", "image")


def test_a_multi_class_shortcut_needs_and_uses_declared_class_concepts():
    world = pl.World(label=lambda c: c["colour"], n_classes=4, spurious={"mark_pos": 0.9}, contrast=0.4)
    model = pl.train(world, steps=1000)
    data = pl.samples(world, 600, seed=SEED_EVAL, p_spurious={"mark_pos": 0.25})
    _prove_shortcut(model, data, "mark_pos")
    summary, results, analysis = diagnose(model, data)
    _assert_shortcut(analysis, data, model, "mark_pos", "image")
    # undeclared, the rule cannot tell which concept points to which class, and says so
    from reports import analyse

    data.class_concepts = None
    bare = analyse(summary, results, data)
    assert not any(s["rule"] == "shortcut" for s in bare["suggestions"])
    assert any("class_concepts" in n for n in bare["errors"]["notes"])


def test_a_model_that_ignores_a_modality():
    world = pl.World(label=lambda c: c["colour"] | c["cue"])
    model = pl.train(world, shuffle=("image",))  # trained on images that say nothing
    data = pl.samples(world, 600, seed=SEED_EVAL)
    # proof: replacing every image by another sample's changes no prediction, and the model
    # fails exactly where only the image knows the label
    swapped = {**data.inputs, "image": data.inputs["image"][torch.randperm(len(data), generator=torch.Generator().manual_seed(0))]}
    with torch.no_grad():
        pred, pred_swapped = model(data.inputs).argmax(1), model(swapped).argmax(1)
    assert (pred != pred_swapped).float().mean() < 0.05
    needs_image = (data.meta["cue"] == 0).numpy()
    assert pl.accuracy(model, data, needs_image) < 0.65 < 0.95 < pl.accuracy(model, data, ~needs_image)
    summary, _, analysis = diagnose(model, data)
    top = analysis["suggestions"][0]
    assert top["id"] == "ignored_modality:image" and top["figures"]["evidence"] == "intervention"
    assert top["figures"]["share"]["value"] < 0.1
    assert not any(s["rule"] == "missing_interaction" for s in analysis["suggestions"])  # an OR needs no interaction
    causes = _causes(analysis, _errors(model, data) & needs_image)
    assert _share(causes, "ignored_modality") >= 0.9, causes
    # the localisation table is conditional on the modality: the report shows its small share
    assert summary["intervention"]["modalities"]["image"]["share"]["high"] < 0.15


def three_modalities() -> pl.World:
    return pl.World(label=lambda c: c["colour"] ^ c["tone"], modalities=("image", "text", "audio"))


def test_three_modalities_name_the_one_pair_that_interacts():
    world = three_modalities()
    model = pl.train(world)
    data = pl.samples(world, 400, seed=SEED_EVAL)
    assert pl.accuracy(model, data) > 0.9  # it learnt the image x audio XOR
    summary, _, _ = diagnose(model, data, stages=("intervention", "unimodal"))
    pairs = summary["intervention"]["pairs"]
    assert set(pairs) == {"image×text", "image×audio", "text×audio"}
    assert pairs["image×audio"]["abs_share"] > 0.5
    assert max(pairs["image×text"]["abs_share"], pairs["text×audio"]["abs_share"]) < 0.15
    stage1 = summary["unimodal"]["modality_ablation"]["pairs"]
    assert max(stage1, key=lambda k: stage1[k]["abs_mean"]) == "image×audio"


def test_an_additive_model_of_three_modalities_gets_the_fusion_fix_for_the_right_pair():
    world = three_modalities()
    model = pl.train(world, fusion="sum")
    data = pl.samples(world, 600, seed=SEED_EVAL)
    assert pl.accuracy(model, data) < 0.6  # an additive model cannot learn an XOR
    summary, _, analysis = diagnose(model, data)
    top = analysis["suggestions"][0]
    assert top["id"] == "missing_interaction:fusion"
    assert top["action"]["modalities"] == ["image", "audio"] and "between image and audio" in top["title"]
    causes = _causes(analysis, _errors(model, data))
    assert _share(causes, "interaction") >= 0.9, causes


def test_a_clean_model_gets_no_shortcut_although_the_word_is_there():
    world = pl.World(label=lambda c: c["colour"], spurious={"zz": 0.9}, contrast=0.5)
    model = pl.train(world)
    data = pl.samples(world, 600, seed=SEED_EVAL, p_spurious={"zz": 0.5})
    v, y = data.meta["zz"].numpy(), data.labels.numpy()
    assert abs(pl.accuracy(model, data, v == y) - pl.accuracy(model, data, v != y)) < 0.03
    _, _, analysis = diagnose(model, data)
    assert analysis["suggestions"] == []


def test_a_shortcut_without_any_link_is_reported_not_skipped():
    world = pl.World(label=lambda c: c["colour"], spurious={"zz": 0.9}, contrast=0.25)
    model = pl.train(world)
    data = pl.samples(world, 600, seed=SEED_EVAL, p_spurious={"zz": 0.5})
    data.truth["text"]["word"] = data.truth["text"].pop("zz")  # a region no concept is linked to
    data.truth_concepts = {m: {r: c for r, c in links.items() if r != "zz"} for m, links in data.truth_concepts.items()}
    data.counterfactuals = {}
    _, _, analysis = diagnose(model, data, stages=("unimodal", "intervention"))
    assert not any(s["rule"] == "shortcut" for s in analysis["suggestions"])
    assert any("zz" in n and "truth_concepts" in n for n in analysis["errors"]["notes"])


def test_the_report_shows_the_interventions_and_each_cards_sentence():
    import report_fixtures as fx
    from reports import render

    world = pl.World(label=lambda c: c["colour"], spurious={"zz": 0.9}, contrast=0.25)
    model = pl.train(world)
    data = pl.samples(world, 300, seed=SEED_EVAL, p_spurious={"zz": 0.5})
    summary, results, analysis = diagnose(model, data)
    summary.update(schema="mmdiag.summary/1", run={"name": "planted", "created": "2026-01-01T00:00:00+00:00", "device": "cpu"})
    summary["model"].update(name="planted", fingerprint="0123456789abcdef")
    summary["stages"] = {name: {"seconds": 0.1, "cached": False, "key": "0", "model": "0"} for name in results}
    summary["errors"] = {k: v for k, v in analysis["errors"].items() if k != "cards"}
    summary["suggestions"] = analysis["suggestions"]
    html = render(summary, results, data, analysis, fx.provenance(summary))
    assert 'id="intervention"' in html and "text.zz" in html
    assert "Interventions on this sample" in html and 'class="sentence"' in html
    card = next(c for c in analysis["errors"]["cards"] if c["category"] == "shortcut")
    assert card["rule"]["sentence"] in html.replace("&#39;", "'")
