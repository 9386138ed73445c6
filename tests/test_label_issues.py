"""Confident learning (reports/label_issues.py) against hand computation and planted label noise,
and the label's causes found under noise (reliance.determining_sets, reliance.consensus)."""

import numpy as np
import pytest

from mmdiag.reports import label_issues as li
from mmdiag.reports import reliance


def test_the_confident_joint_by_hand():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.2, 0.8], [0.6, 0.4], [0.1, 0.9]])
    labels = np.array([0, 0, 0, 1, 1, 1])
    # thresholds: class 0 among labelled 0: (0.9 + 0.8 + 0.3) / 3; class 1 among labelled 1: (0.8 + 0.4 + 0.9) / 3
    assert li.thresholds(probs, labels) == pytest.approx([2 / 3, 0.7])
    joint, guess = li.confident_joint(probs, labels)
    # row 2 (labelled 0) is confidently 1; row 4 (labelled 1) is 0.6 < 2/3 of class 0: no class
    assert guess.tolist() == [0, 0, 1, 1, -1, 1]
    assert joint.tolist() == [[2, 1], [0, 2]]
    # calibrated: each row sums to its label's count (3 and 3)
    assert li.calibrated(joint, labels).tolist() == [[2, 1], [0, 3]]
    assert li.find(probs, labels).tolist() == [False, False, True, False, False, False]


def _noisy(n, k, rate, seed, strength=4.0):
    rng = np.random.default_rng(seed)
    true = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k)) + strength * np.eye(k)[true]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    given = np.where(rng.random(n) < rate, (true + rng.integers(1, k, n)) % k, true)
    return probs, given, given != true


@pytest.mark.parametrize("k", [2, 3, 5])
def test_planted_label_noise_is_found(k):
    probs, given, wrong = _noisy(3000, k, 0.1, seed=k)
    found = li.find(probs, given)
    assert (found & wrong).sum() / found.sum() > 0.9 and (found & wrong).sum() / wrong.sum() > 0.85
    ranked = li.ranked(probs, given, found)
    assert set(ranked.tolist()) == set(np.flatnonzero(found).tolist())
    assert np.all(np.diff(probs[ranked, given[ranked]]) >= 0)  # lowest self-confidence first


def test_the_same_issues_as_cleanlab():
    cleanlab = pytest.importorskip("cleanlab.filter")  # the benchmark extra's reference (AGPL: never a dependency)
    same = []
    for seed in range(20):
        probs, given, _ = _noisy(1500, 2 + seed % 4, 0.05 + 0.01 * seed, seed, strength=2.0)
        same.append(np.array_equal(li.find(probs, given), cleanlab.find_label_issues(given, probs)))
    assert np.mean(same) >= 0.9  # a tie in rounding the calibrated joint can differ by a sample


def test_the_labels_causes_are_found_through_label_noise():
    rng = np.random.default_rng(1)
    colour, word, other = rng.integers(0, 2, 2000), rng.integers(0, 2, 2000), rng.integers(0, 3, 2000)
    meta = {"colour": colour, "word": word, "other": other}
    noisy = np.where(rng.random(2000) < 0.1, 1 - (colour ^ word), colour ^ word)
    sets = reliance.determining_sets(meta, noisy)
    assert sets == [("colour", "word")]  # no set is a 99% pure function of the noisy label, yet the causes win
    told = reliance.consensus(meta, noisy, sets)
    assert np.array_equal(told, colour ^ word)  # each cell's majority is the true label
    # a label that no concept tells: the empty set (the majority label) is as good as any
    unrelated = rng.integers(0, 2, 2000)
    assert reliance.determining_sets(meta, unrelated) == [()]
    assert reliance.causal("colour", [()], None) is False and reliance.consensus(meta, unrelated, [()]) is None


def test_a_class_nobody_is_sure_of_keeps_one_sample():
    """As cleanlab: the confident joint's diagonal is at least 1 before calibration."""
    probs = np.array([[0.6, 0.4], [0.55, 0.45], [0.1, 0.9], [0.2, 0.8], [0.3, 0.7]])
    labels = np.array([1, 1, 1, 0, 0])
    joint, _ = li.confident_joint(probs, labels)
    assert joint[0, 0] == 1 and (joint.diagonal() >= 1).all()


def test_few_samples_cannot_tell_the_labels_causes():
    """On a few dozen samples a concept set that does best but not significantly better than
    the majority label is no verdict ([]: cannot tell), and fewer than ten samples give no set."""
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 2, 24)
    meta = {"colour": colour, "a": rng.integers(0, 2, 24), "b": rng.integers(0, 2, 24)}
    found = [reliance.determining_sets(meta, np.where(rng.random(24) < 0.3, 1 - colour, colour)) for _ in range(1)]
    assert found[0] in ([], [("colour",)])
    assert reliance.determining_sets({"colour": colour[:8]}, colour[:8]) == []
    assert reliance.causal("colour", [], None) is None


def _hidden_world(n: int, rate: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(features, model probabilities, given labels, flipped) of two classes whose inputs show
    the class on three quarters of the samples; on the rest the model guesses confidently (a
    shortcut's errors) and nothing in the features tells the class. `rate` of the visible
    samples' labels are flipped."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, 2, n)
    visible = rng.random(n) < 0.75
    features = np.stack([np.where(visible, 2.0 * true - 1, 0.0) + rng.normal(0, 0.1, n), visible + rng.normal(0, 0.1, n)], 1)
    guess = np.where(visible, true, rng.integers(0, 2, n))
    probs = np.where(np.eye(2)[guess] == 1, 0.95, 0.05)
    flipped = visible & (rng.random(n) < rate)
    return features, probs, np.where(flipped, 1 - true, true), flipped


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_readout_refitted_to_the_labels_tells_label_mistakes_from_errors_on_inputs_that_show_no_label(seed):
    """Confident learning on the model alone takes its confident errors on the hidden samples
    (the labels there are right) for label mistakes; the readout refitted to the split's own
    labels is unsure there and sure on the flipped visible samples."""
    features, probs, given, flipped = _hidden_world(4000, 0.1, seed)
    model = li.find(probs, given)
    hidden_errors = model & ~flipped
    assert hidden_errors.sum() > flipped.sum()  # the model's confident errors outnumber the mistakes
    refit = li.cross_fitted([features], given, 2, seed)
    both = model & (li.neighbours_say(refit, given) == probs.argmax(1))
    assert (both & flipped).sum() / both.sum() > 0.95 and (both & flipped).sum() / flipped.sum() > 0.9


def test_a_readout_is_refitted_only_where_every_class_fills_the_folds():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(50, 3))
    assert li.cross_fitted([features], np.r_[np.zeros(47, int), np.ones(3, int)], 2) is None
    assert li.cross_fitted([np.ones((50, 3))], np.r_[np.zeros(25, int), np.ones(25, int)], 2) is None
    out = li.cross_fitted([features], np.r_[np.zeros(25, int), np.full(25, 2)], 3)  # class 1 absent: probability 0
    assert out.shape == (50, 3) and (out[:, 1] == 0).all() and np.allclose(out.sum(1), 1)


def test_every_block_counts_alike_in_the_readouts_distance():
    rng = np.random.default_rng(0)
    wide, narrow = rng.normal(5, 3, (200, 64)), rng.normal(-2, 0.1, (200, 4))
    x = li.standardised([wide, narrow, np.ones((200, 2))])
    assert x.shape == (200, 70) and np.allclose(x.mean(0), 0)
    # each block's squared distances average alike: its columns' variances sum to one
    assert np.isclose(x[:, :64].var(0).sum(), 1) and np.isclose(x[:, 64:68].var(0).sum(), 1) and not x[:, 68:].any()
