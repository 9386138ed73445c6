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
from ranges import holds, measured

pytestmark = pytest.mark.trained
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
    holds(f"the planted {concept} shortcut: accuracy where it agrees - where it disagrees", agree - disagree, above=0.15)


def _assert_shortcut(analysis, data, model, concept: str, modality: str, known: np.ndarray | None = None, share: float = 0.9) -> None:
    """The top suggestion is the shortcut; of the errors where the concept points to the
    predicted class against the label (and `known`: where that makes it the cause by
    construction), most are carded shortcut."""
    top = analysis["suggestions"][0]
    assert top["id"] == f"shortcut:{concept}", [s["id"] for s in analysis["suggestions"]]
    assert top["action"]["modality"] == modality
    assert top["figures"]["decided_by"] in ("counterfactual", "intervention")
    # errors where the concept points to the predicted class against the label are shortcut errors by construction
    with torch.no_grad():
        pred = model(data.inputs).argmax(1).numpy()
    v, y = data.meta[concept].numpy(), data.labels.numpy()
    causes = _causes(analysis, (pred != y) & (v == pred) & (True if known is None else known))
    assert sum(causes.values()) >= 20
    holds(f"share of the errors that follow {concept} carded shortcut", _share(causes, "shortcut"), above=share)


TEXT_SHORTCUT = {"short captions": (3, 6), "long captions": (10, 14)}


@pytest.mark.parametrize("caption", TEXT_SHORTCUT.values(), ids=TEXT_SHORTCUT.keys())
def test_a_word_shortcut_is_found_whatever_the_caption_length(caption):
    world = pl.World(label=lambda c: c["colour"], spurious={"zz": 0.9}, caption=caption, contrast=0.25, hidden=0.25)
    model = pl.train(world)
    data = pl.samples(world, 600, seed=SEED_EVAL, p_spurious={"zz": 0.5})
    _prove_shortcut(model, data, "zz")
    summary, _, analysis = diagnose(model, data)
    _assert_shortcut(analysis, data, model, "zz", "text")
    # one token among 3-16 is judged against one random token, not against its share of the units
    zz = summary["intervention"]["regions"]["text.zz"]
    assert zz["units"] == 1.0
    holds("the word's flip effect, low end", zz["flip_effect"]["low"], above=0)


def test_a_shortcut_in_the_image_of_a_model_that_uses_the_text():
    # the mark says nothing where the object is drawn, so the XOR is learnt there by construction
    world = pl.World(label=lambda c: c["colour"] ^ c["negation"], spurious={"mark": 0.9}, contrast=0.35, hidden=0.4, visible_spurious=0.5)
    model = pl.train(world, steps=3000)
    data = pl.samples(world, 600, seed=SEED_EVAL, p_spurious={"mark": 0.5})
    _prove_shortcut(model, data, "mark")
    # the model uses the text: flipping "not" matters, which no text-blind model could do
    summary, _, analysis = diagnose(model, data)
    holds("the flip effect of 'not', low end", summary["intervention"]["regions"]["text.negation"]["flip_effect"]["low"], above=0.05)
    # where the object is drawn the mark says nothing in training: an error there follows it by chance
    _assert_shortcut(analysis, data, model, "mark", "image", known=data.meta["hidden"].numpy() == 1, share=0.75)


def test_a_multi_class_shortcut_needs_and_uses_declared_class_concepts():
    world = pl.World(label=lambda c: c["colour"], n_classes=4, spurious={"mark_pos": 0.9}, contrast=0.4, hidden=0.25)
    model = pl.train(world, steps=1000)
    data = pl.samples(world, 600, seed=SEED_EVAL, p_spurious={"mark_pos": 0.25})
    _prove_shortcut(model, data, "mark_pos")
    summary, results, analysis = diagnose(model, data)
    _assert_shortcut(analysis, data, model, "mark_pos", "image")
    # undeclared, the rule cannot tell which concept points to which class, and says so
    from mmdiag.reports import analyse

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
    holds("predictions changed by swapping the images", (pred != pred_swapped).float().mean(), below=0.05)
    needs_image = (data.meta["cue"] == 0).numpy()
    holds("accuracy where only the image knows the label", pl.accuracy(model, data, needs_image), below=0.65)
    holds("accuracy where the text knows it", pl.accuracy(model, data, ~needs_image), above=0.95)
    summary, _, analysis = diagnose(model, data)
    top = analysis["suggestions"][0]
    assert top["id"] == "ignored_modality:image" and top["figures"]["evidence"] == "intervention"
    holds("the image's share", top["figures"]["share"]["value"], below=0.1)
    assert not any(s["rule"] == "missing_interaction" for s in analysis["suggestions"])  # an OR needs no interaction
    # an error whose card blames a feature mmdiag found has a second cause the model learnt by
    # itself, proven by removing it (a filler word the two-thread training of seed 0 picked up:
    # removing it makes the error right); of the others, the cause is the ignored image
    found = {c["row"] for c in analysis["errors"]["cards"] if ((c["rule"] or {}).get("feature") or {}).get("found")}
    rows = _errors(model, data) & needs_image
    measured("errors where only the image knows the label, blamed on a found feature", float(np.mean([r in found for r in np.flatnonzero(rows)])))
    rows[list(found)] = False
    holds("share of those errors carded ignored_modality", _share(_causes(analysis, rows), "ignored_modality"), above=0.9)
    # the localisation table is conditional on the modality: the report shows its small share
    holds("the image's share, high end", summary["intervention"]["modalities"]["image"]["share"]["high"], below=0.15)


def test_a_three_class_model_whose_image_branch_learnt_nothing():
    """The label is the object's colour (three classes); the captions say nothing of it, and the
    model was trained on images paired at random, so it answers at chance. No share is compared
    with a fixed number: the image shows the label where the model does not look (a readout
    refitted to the labels gains from it what the model does not), and the caption, which the
    model does read, shows nothing of it."""
    world = pl.World(label=lambda c: c["colour"], n_classes=3)
    model = pl.train(world, shuffle=("image",))
    data = pl.samples(world, 600, seed=SEED_EVAL)
    swapped = {**data.inputs, "image": data.inputs["image"][torch.randperm(len(data), generator=torch.Generator().manual_seed(0))]}
    with torch.no_grad():
        pred, pred_swapped = model(data.inputs).argmax(1), model(swapped).argmax(1)
    holds("predictions changed by swapping the images (three classes)", (pred != pred_swapped).float().mean(), below=0.05)
    holds("accuracy of the model that learnt nothing from its images (chance: 1/3)", pl.accuracy(model, data), below=0.45)
    for bare in (False, True):
        summary, _, analysis = diagnose(model, pl.bare(data) if bare else data)
        ids = [s["id"] for s in analysis["suggestions"]]
        assert ids[0] == "ignored_modality:image" and "ignored_modality:text" not in ids, ids
        image, text = summary["intervention"]["modalities"]["image"], summary["intervention"]["modalities"]["text"]
        holds("the image's unused Brier score, low end", image["unused"]["low"], above=0.1)
        # the caption adds nothing to the model's answer (which is all caption)
        measured("the caption's unused Brier score, low end", text["unused"]["low"])
        measured("the caption's gain beyond the model's answer, low end", text["beyond_answer"]["low"])


def three_modalities() -> pl.World:
    return pl.World(label=lambda c: c["colour"] ^ c["tone"], modalities=("image", "text", "audio"))


def test_three_modalities_name_the_one_pair_that_interacts():
    world = three_modalities()
    model = pl.train(world)
    data = pl.samples(world, 400, seed=SEED_EVAL)
    holds("accuracy", pl.accuracy(model, data), above=0.9)  # it learnt the image x audio XOR
    summary, _, _ = diagnose(model, data, stages=("intervention", "unimodal"))
    pairs = summary["intervention"]["pairs"]
    assert set(pairs) == {"image×text", "image×audio", "text×audio"}
    holds("image×audio's share of the interaction", pairs["image×audio"]["abs_share"], above=0.5)
    holds("the other pairs' largest share", max(pairs["image×text"]["abs_share"], pairs["text×audio"]["abs_share"]), below=0.15)
    stage1 = summary["unimodal"]["modality_ablation"]["pairs"]
    assert max(stage1, key=lambda k: stage1[k]["abs_mean"]) == "image×audio"


def test_an_additive_model_of_three_modalities_gets_the_fusion_fix_for_the_right_pair():
    world = three_modalities()
    model = pl.train(world, fusion="sum")
    data = pl.samples(world, 600, seed=SEED_EVAL)
    holds("accuracy", pl.accuracy(model, data), below=0.6)  # an additive model cannot learn an XOR
    summary, _, analysis = diagnose(model, data)
    top = analysis["suggestions"][0]
    assert top["id"] == "missing_interaction:fusion"
    assert top["action"]["modalities"] == ["image", "audio"] and "between image and audio" in top["title"]
    causes = _causes(analysis, _errors(model, data))
    # an additive model that cannot fit the XOR fits what chance put in its training captions:
    # discovery finds a filler word it follows (0.105 of the errors carded shortcut, 1 seed)
    holds("share of the errors carded interaction or shortcut", _share(causes, "interaction") + _share(causes, "shortcut"), above=0.9)
    holds("share of the errors carded interaction", _share(causes, "interaction"), above=0.75)


def test_a_clean_model_gets_no_shortcut_although_the_word_is_there():
    world = pl.World(label=lambda c: c["colour"], spurious={"zz": 0.9}, contrast=0.5)
    model = pl.train(world)
    data = pl.samples(world, 600, seed=SEED_EVAL, p_spurious={"zz": 0.5})
    v, y = data.meta["zz"].numpy(), data.labels.numpy()
    holds("|accuracy where the word agrees - where it disagrees|", abs(pl.accuracy(model, data, v == y) - pl.accuracy(model, data, v != y)), below=0.03)
    _, _, analysis = diagnose(model, data)
    assert analysis["suggestions"] == []


def test_a_shortcut_without_any_link_is_reported_not_skipped():
    world = pl.World(label=lambda c: c["colour"], spurious={"zz": 0.9}, contrast=0.25, hidden=0.25)
    model = pl.train(world)
    data = pl.samples(world, 600, seed=SEED_EVAL, p_spurious={"zz": 0.5})
    data.truth["text"]["word"] = data.truth["text"].pop("zz")  # a region no concept is linked to
    data.truth_concepts = {m: {r: c for r, c in links.items() if r != "zz"} for m, links in data.truth_concepts.items()}
    data.counterfactuals = {}
    _, _, analysis = diagnose(model, data, stages=("unimodal", "intervention"))
    assert not any(s["rule"] == "shortcut" for s in analysis["suggestions"])
    assert any("zz" in n and "truth_concepts" in n for n in analysis["errors"]["notes"])


def test_the_report_shows_the_interventions_and_each_cards_sentence():
    from mmdiag.reports import render

    import report_fixtures as fx

    world = pl.World(label=lambda c: c["colour"], spurious={"zz": 0.9}, contrast=0.25, hidden=0.25)
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
