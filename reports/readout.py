"""Readouts refitted to the analysed split's own labels: k nearest neighbours, cross-fitted
(each sample predicted from the other folds), over blocks of features that count alike. They
are what the data itself says about the label, beside what the model says: the second opinion
on label mistakes (reports/label_issues.py) and how much the label depends on each modality
(reports/findings.ignored_modalities).
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier

FOLDS = 5


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
    if not _usable(features, labels):
        return None
    present = np.unique(labels)
    folds = StratifiedKFold(FOLDS, shuffle=True, random_state=seed)
    out = np.zeros((len(labels), n_classes))
    out[:, present] = cross_val_predict(KNeighborsClassifier(neighbours(len(labels))), features, labels, cv=folds, method="predict_proba")
    return out


def _usable(features: np.ndarray, labels: np.ndarray) -> bool:
    present, counts = np.unique(labels, return_counts=True)
    return len(present) >= 2 and counts.min() >= FOLDS and np.isfinite(features).all() and features.any()


def swap_dependence(blocks: list[np.ndarray], labels: np.ndarray, seed: int = 0) -> list[np.ndarray] | None:
    """Per block, per sample: whether the readout's out-of-fold prediction changes when that
    block alone is taken from another sample (a random pairing, drawn from `seed`): how much
    the label depends on what the block shows, as far as the data tells. None where the
    readout cannot be fitted (as cross_fitted)."""
    labels = np.asarray(labels, np.int64)
    features = standardised(blocks)
    if not _usable(features, labels):
        return None
    edges = np.cumsum([0, *(np.asarray(b).shape[1] for b in blocks)])
    partner = np.random.default_rng(seed).permutation(len(labels))
    changed = [np.zeros(len(labels), bool) for _ in blocks]
    for fit, test in StratifiedKFold(FOLDS, shuffle=True, random_state=seed).split(features, labels):
        readout = KNeighborsClassifier(neighbours(len(labels))).fit(features[fit], labels[fit])
        intact = readout.predict(features[test])
        for j in range(len(blocks)):
            swapped = features[test].copy()
            swapped[:, edges[j] : edges[j + 1]] = features[partner[test], edges[j] : edges[j + 1]]
            changed[j][test] = readout.predict(swapped) != intact
    return changed
