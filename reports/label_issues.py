"""Label mistakes: the errors where the given label, not the model, is likely wrong.

Confident learning (Northcutt, Jiang & Chuang, JAIR 2021) on the model's predicted probabilities
of the analysed split (held out from training, so out-of-sample), as cleanlab's
`find_label_issues` does by default: per class a confidence threshold (the mean probability of
the class among the samples labelled with it); the confident joint counts, per given label, the
samples confidently of another class; calibrated to the label counts, its off-diagonal cells say
how many samples of each given label belong elsewhere, and that many are taken per cell, those
with the largest margin of the other class over the given one ("prune by noise rate"); a sample
the model predicts as labelled is never an issue. Ranked by self-confidence (the probability of
the given label, lowest first). Written here in numpy: cleanlab is AGPL-3.0 and mmdiag MIT, so
cleanlab is the benchmark's reference (`mmdiag bench`), never a dependency.

Confident learning cannot tell a label mistake from a confident model error: a shortcut's errors
look the same to it. Two things can. The interventions: a shortcut error becomes right when its
feature is removed, a label mistake does not. And a readout refitted to this split's own labels
(`cross_fitted`: cleanlab's own recipe, out-of-fold probabilities of a model fit to the data,
here nearest neighbours among the model's layers before its decision): where the model errs by following
something this split does not reward, or on an input that shows no label (a grey photo in a
colour-labelled world), the refitted readout does not confidently contradict the given label; a
label mistake it does. The per-error rule (reports/evidence.py) calls an error a label mistake
only where both the model and the readout are confident learning's issues and no intervention
shows the error to be the model's.
"""

from __future__ import annotations

import numpy as np
from scipy import stats
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier

FOLDS = 5


def thresholds(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per class: the mean predicted probability of the class among the samples labelled with it
    (a class no sample carries gets 1: nothing is confidently of it)."""
    k = probs.shape[1]
    return np.array([probs[labels == j, j].mean() if (labels == j).any() else 1.0 for j in range(k)])


def confident_joint(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C, guess): C[i, j] counts the samples labelled i whose probability of class j reaches j's
    threshold (where several classes do, the most probable class), each diagonal cell at least 1
    (as cleanlab: a class nobody is sure of still keeps one correct sample); guess is that class
    per sample, -1 where no class reaches its threshold."""
    k = probs.shape[1]
    confident = probs >= thresholds(probs, labels) - 1e-6
    count = confident.sum(1)
    guess = np.where(count == 1, confident.argmax(1), np.where(count > 1, probs.argmax(1), -1))
    joint = np.zeros((k, k), np.int64)
    np.add.at(joint, (labels[guess >= 0], guess[guess >= 0]), 1)
    np.fill_diagonal(joint, np.maximum(joint.diagonal(), 1))  # every class keeps a sample it is sure of
    return joint, guess


def calibrated(joint: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The confident joint rescaled so that each row sums to its label's count, rounded to the
    nearest integers with each row's total kept (the entries rounded furthest adjusted)."""
    counts = np.bincount(labels, minlength=joint.shape[0]).astype(np.float64)
    rows = joint.sum(1, keepdims=True)
    scaled = np.where(rows > 0, joint / np.maximum(rows, 1) * counts[:, None], 0.0)
    out = scaled.round()
    for i, row in enumerate(scaled):
        diff = int(round(row.sum() - out[i].sum()))
        if diff:
            step = 1 if diff > 0 else -1
            out[i, np.argsort(row - out[i])[::-step][: abs(diff)]] += step
    return out.astype(np.int64)


def find(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A boolean mask of the likely label mistakes (prune by noise rate)."""
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels, np.int64)
    joint = calibrated(confident_joint(probs, labels)[0], labels)
    issues = np.zeros(len(labels), bool)
    for given in range(joint.shape[0]):
        rows = np.flatnonzero(labels == given)
        for other in range(joint.shape[1]):
            n = joint[given, other]
            if other == given or n == 0 or len(rows) == 0:
                continue
            margin = probs[rows, other] - probs[rows, given]
            issues[rows[np.argsort(-margin, kind="stable")[:n]]] = True
    return issues & (probs.argmax(1) != labels)


def ranked(probs: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The rows of `mask`, lowest self-confidence (probability of the given label) first."""
    rows = np.flatnonzero(mask)
    return rows[np.argsort(probs[rows, labels[rows]], kind="stable")]


def neighbours(n: int) -> int:
    """k of the refitted readout: the square root of a fold's training size."""
    return max(1, round(np.sqrt(n * (FOLDS - 1) / FOLDS)))


def standardised(blocks: list[np.ndarray]) -> np.ndarray:
    """Blocks of features (one per layer) side by side, each column standardised and each block
    weighted by one over the square root of its width, so that every block counts alike in a
    distance whatever its width (a constant column stays 0)."""
    out = []
    for x in blocks:
        x = np.asarray(x, np.float64)
        sd = x.std(0)
        out.append((x - x.mean(0)) / np.where(sd > 0, sd, 1.0) / np.sqrt(x.shape[1]))
    return np.concatenate(out, 1)


def cross_fitted(blocks: list[np.ndarray], labels: np.ndarray, n_classes: int, seed: int = 0) -> np.ndarray | None:
    """Out-of-fold class probabilities (N, n_classes): the label shares among a sample's k nearest
    neighbours (`standardised` blocks, k the square root of a fold's training size) in the other
    folds (stratified, `FOLDS`; a class no sample carries gets 0). Nearest neighbours, not a
    linear readout: where the features show no label (a hidden object) the neighbours' labels
    are mixed and the readout unsure, where a line through them would still be confident on one
    side. None where fewer than two classes have `FOLDS` samples each, or the features are
    constant or not finite."""
    labels = np.asarray(labels, np.int64)
    features = standardised(blocks)
    present, counts = np.unique(labels, return_counts=True)
    if len(present) < 2 or counts.min() < FOLDS or not np.isfinite(features).all() or not features.any():
        return None
    folds = StratifiedKFold(FOLDS, shuffle=True, random_state=seed)
    out = np.zeros((len(labels), n_classes))
    out[:, present] = cross_val_predict(KNeighborsClassifier(neighbours(len(labels))), features, labels, cv=folds, method="predict_proba")
    return out


def neighbours_say(refit: np.ndarray, labels: np.ndarray, confidence: float = 0.95) -> np.ndarray:
    """Per sample, the class other than its label that its neighbours (cross_fitted) carry more
    often than the class's share of the labels could give by chance (one-sided binomial test of
    the neighbours' count, Bonferroni over the classes), -1 where none: the second opinion that
    the input shows another label. Where the input shows none (a hidden object), the neighbours'
    labels follow the class shares and say nothing."""
    labels = np.asarray(labels, np.int64)
    k = neighbours(len(labels))
    counts = np.rint(np.asarray(refit) * k)
    share = np.bincount(labels, minlength=refit.shape[1]) / len(labels)
    p = stats.binom.sf(counts - 1, k, share[None, :])  # P(count or more | the class's share)
    p[np.arange(len(labels)), labels] = 1.0
    best = p.argmin(1)
    return np.where(p[np.arange(len(labels)), best] * refit.shape[1] < 1 - confidence, best, -1)
