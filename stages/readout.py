"""What each modality could tell of the label, against what the model takes from it.

A modality the model ignores is a bug only where it carries information about the label that
the other modalities do not. Both sides are measured in one currency, the Brier score of the
label (a proper score: a model that predicts the majority class gains nothing by it):

- the model's use of modality m: its score with m removed (the 2^M modality ablations of the
  intervention stage) minus its score on the whole input, per sample;
- what m could tell: the same difference for a readout refitted to the analysed split's labels
  on every modality's inputs and on all but m (multinomial logistic regression, out of fold:
  `FOLDS` stratified folds, so no sample is scored by a readout that saw its label).

Their per-sample difference (readout's gain minus the model's) is the information the model
leaves unused; its interval above 0 says the model takes less from m than m shows. A modality
that tells nothing the others do not (a neutral caption) gives the readout nothing to gain,
however little the model uses it. A second readout asks whether m tells anything beyond the
model's answer (its logits, refitted, against its logits and m's inputs): where the model
ignores one modality, the other's gain in the readout includes what the two tell together
(an OR of a word and a colour), which the model cannot take from the word alone; only the
ignored one adds to the model's answer.

The readout sees each modality's encoded input reduced to at most `WIDTH` numbers (`features`):
an image pooled to at most `GRID` x `GRID` cells per channel (the model's own patch positions
are not needed to tell a colour or a corner; tiles of one image averaged), a sequence averaged
over its unit elements (a bag of its embedded words), anything else flattened; a wider one
through a fixed random projection. The readout is linear: information only a combination of
features shows (a caption's word and the colour of the shape it names) it does not see, so the
rule errs towards silence, never towards a false finding.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mmdiag.pipeline import stats
from mmdiag.pipeline.units import Units

FOLDS = 5
GRID = 8
WIDTH = 1024


def features(x: Tensor, units: Units) -> Tensor:
    """(B, d) float, d <= `WIDTH`: what the readout sees of one modality's encoded input."""
    x = x.detach().float()
    if x.dim() >= 4:  # images (and tiles of one: their mean)
        pooled = torch.nn.functional.adaptive_avg_pool2d(x.flatten(0, -4), (min(GRID, x.shape[-2]), min(GRID, x.shape[-1])))
        out = pooled.reshape(x.shape[0], -1, *pooled.shape[1:]).mean(1).flatten(1)
    elif x.dim() == 3:
        inside = units.elements.expand(x.shape[0], *units.mask.shape[1:])
        inside = inside.reshape(x.shape[0], x.shape[1], -1).any(2).float()[..., None]
        out = (x * inside).sum(1) / inside.sum(1).clamp_min(1.0)
    else:
        out = x.flatten(1)
    if out.shape[1] <= WIDTH:
        return out
    # wider (a large model's embeddings, a long table): a fixed random projection, the same for
    # every batch, keeps distances (Johnson-Lindenstrauss) at a readout's cost
    g = torch.Generator().manual_seed(out.shape[1])
    return out @ (torch.randn(out.shape[1], WIDTH, generator=g) / WIDTH**0.5).to(out.device)


def brier(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per sample: the squared distance of the predicted distribution from the label's."""
    onehot = np.eye(probs.shape[1])[labels]
    return ((probs - onehot) ** 2).sum(1)


def refitted(blocks: list[np.ndarray], labels: np.ndarray, n_classes: int, seed: int = 0) -> np.ndarray | None:
    """Out-of-fold class probabilities (N, n_classes) of a logistic readout on the blocks side by
    side (each column standardised); None where a class has fewer than `FOLDS` samples."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    present, counts = np.unique(labels, return_counts=True)
    if len(present) < 2 or counts.min() < FOLDS:
        return None
    x = np.concatenate(blocks, 1).astype(np.float64)
    x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
    out = np.zeros((len(labels), n_classes))
    folds = StratifiedKFold(FOLDS, shuffle=True, random_state=seed)
    out[:, present] = cross_val_predict(LogisticRegression(max_iter=2000), x, labels, cv=folds, method="predict_proba")
    return out


def unused(model_logits: np.ndarray, blocks: dict[str, np.ndarray], labels: np.ndarray, z: float) -> dict[str, dict] | None:
    """Per modality: the readout's gain from it, the model's, the information the model leaves
    unused (readout's gain minus the model's, per sample; an interval at `z`) and what it adds
    to the model's answer (`beyond_answer`, an interval at `z`).
    `model_logits` (N, 2^M, C) are the modality ablations in `attribution.coalitions` order,
    `blocks` each modality's readout features in the same modality order."""
    from mmdiag.stages import attribution as attr

    mods, n_classes = list(blocks), model_logits.shape[2]
    if len(mods) < 2:
        return None
    logits = torch.from_numpy(model_logits).double()
    probs = logits.softmax(-1).numpy()
    everything = refitted(list(blocks.values()), labels, n_classes)
    if everything is None:
        return None
    model_full, readout_full = brier(probs[:, -1], labels), brier(everything, labels)
    answer = model_logits[:, -1]
    recalibrated = brier(refitted([answer], labels, n_classes), labels)  # the model's answer alone, refitted
    out = {}
    for j, m in enumerate(mods):
        readout_without = brier(refitted([b for k, b in blocks.items() if k != m], labels, n_classes), labels)
        model_gain = brier(probs[:, attr.without(j, len(mods))], labels) - model_full
        readout_gain = readout_without - readout_full
        out[m] = {
            "readout_gain": round(float(readout_gain.mean()), 4),
            "model_gain": round(float(model_gain.mean()), 4),
            "unused": stats.interval(readout_gain - model_gain, z),
            "beyond_answer": stats.interval(recalibrated - brier(refitted([answer, blocks[m]], labels, n_classes), labels), z),
        }
    return out
