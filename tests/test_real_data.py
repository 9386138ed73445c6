"""Real data is imperfect: label mistakes and clean models must not produce a false diagnosis.
Planted worlds (tests/planted.py), each proven from the model before the diagnosis is asserted."""

import numpy as np
import pytest
import torch

import planted as pl
from inprocess import diagnose
from ranges import holds

pytestmark = pytest.mark.trained
SEED_EVAL = 7


def _pred(model, data) -> np.ndarray:
    with torch.no_grad():
        return model(data.inputs).argmax(1).numpy()


def _label_flags(analysis, data, true) -> tuple[float, float]:
    """Precision and recall of the errors carded as label mistakes against the flipped labels."""
    flagged = {c["row"] for c in analysis["errors"]["cards"] if c["category"] == "label"}
    wrong = set(np.flatnonzero(data.labels.numpy() != true).tolist())
    hit = len(flagged & wrong)
    return hit / max(len(flagged), 1), hit / max(len(wrong), 1)


@pytest.mark.parametrize("annotated", [True, False], ids=["annotated", "bare"])
@pytest.mark.parametrize("rate", [0.05, 0.10])
def test_flipped_labels_on_a_right_model_are_label_mistakes_not_a_model_bug(rate, annotated):
    """Bare, the colour the labels follow is found (a transform) and is the label's own cue:
    the flipped labels disagree with it, and that is no shortcut."""
    world = pl.World(label=lambda c: c["colour"], contrast=0.5)
    model = pl.train(world)
    data = pl.samples(world, 1000, seed=SEED_EVAL, label_noise=rate)
    true = pl.true_labels(world, data)
    holds("accuracy against the true labels", (_pred(model, data) == true).mean(), above=0.97)  # the model is right
    summary, _, analysis = diagnose(model, data if annotated else pl.bare(data))
    assert [s["id"] for s in analysis["suggestions"]] == ["label_noise:labels"]  # no model bug
    precision, recall = _label_flags(analysis, data, true)
    holds("precision of the label flags", precision, above=0.8)
    holds("recall of the label flags", recall, above=0.8)


def test_a_shortcut_under_label_noise_is_still_found_and_its_errors_are_not_label_mistakes():
    world = pl.World(label=lambda c: c["colour"], spurious={"zz": 0.9}, contrast=0.25, hidden=0.25)
    model = pl.train(world)
    data = pl.samples(world, 1000, seed=SEED_EVAL, p_spurious={"zz": 0.5}, label_noise=0.05)
    true = pl.true_labels(world, data)
    pred, zz = _pred(model, data), data.meta["zz"].numpy()
    holds("the planted shortcut: accuracy where zz agrees with the true label - where it disagrees", (pred == true)[zz == true].mean() - (pred == true)[zz != true].mean(), above=0.15)
    _, _, analysis = diagnose(model, data)
    assert analysis["suggestions"][0]["id"] == "shortcut:zz", [s["id"] for s in analysis["suggestions"]]
    precision, _ = _label_flags(analysis, data, true)
    holds("precision of the label flags", precision, above=0.8)


@pytest.mark.parametrize("n", [200, 2000])
def test_a_clean_model_gets_no_suggestion(n):
    world = pl.World(label=lambda c: c["colour"], contrast=0.5)
    model = pl.train(world)
    data = pl.samples(world, n, seed=SEED_EVAL)
    holds("accuracy", pl.accuracy(model, data), above=0.95)
    _, _, analysis = diagnose(model, data)
    assert analysis["suggestions"] == []
