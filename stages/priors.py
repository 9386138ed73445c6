"""Priors: slices of the data, named by a word, on which the model answers without looking at a
modality (a visual question answered from its wording alone: the language prior).

- Dependence: each sample's input of modality m is replaced by m of `draws` other samples of
  the split, drawn at random from its id (so that a sample's draws do not depend on its batch);
  the share of draws that change the prediction is the sample's dependence on m. A model that
  looks at the image changes its answer to "is the circle red" for about half of the other
  images; one that answers from the words changes nothing.
- Slices: the samples whose text holds a word (the discovery stage's word candidates: every word
  type in at least `min_samples` samples and not in all). A slice has a prior on m where
  (a) its dependence on m is below the rest of the split's (one-sided Welch test of the mean),
  and (b) the model errs on it more than elsewhere (one-sided two-proportion test): a slice whose
  answers need no image, or that the model answers right anyway, is no bug. The two are joined
  by the larger p-value (both must hold) and Benjamini-Hochberg runs over every word and
  modality tested.
- Errors it explains: the slice's errors whose answer no draw changed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from scipy.stats import false_discovery_control, norm
from torch import Tensor

from mmdiag.pipeline.adapter import ModelAdapter
from mmdiag.pipeline.data import SampleSet


def partners(ids: Tensor, positions: np.ndarray, n: int, seed: int, salt: int, draws: int) -> np.ndarray:
    """(B, draws) rows of other samples of the split, uniform, a function of each id."""
    from mmdiag.stages.intervention import null_scores

    u = null_scores(ids, seed, salt, draws, 1)[..., 0].numpy()  # (B, draws) in [0, 1)
    picked = np.minimum((u * (n - 1)).astype(np.int64), n - 2)
    return picked + (picked >= positions[:, None])  # skip the sample itself


def dependence(adapter: ModelAdapter, data: SampleSet, pred: Tensor, modality: str, draws: int, seed: int, salt: int, batch_size: int, device) -> np.ndarray:
    """(N,) per sample: the share of `draws` other samples' inputs of `modality` that change its
    prediction when they replace its own."""
    n = len(data)
    out = np.zeros(n)
    if n < 2:
        return out
    for rows, inputs in data.batches(batch_size, device):
        positions = np.arange(rows.start, rows.stop)
        others = partners(data.ids[rows], positions, n, seed, salt, draws)
        for k in range(draws):
            swapped = {**inputs, modality: data.inputs[modality][torch.from_numpy(others[:, k])].to(device)}
            with torch.no_grad():
                after = adapter(swapped).argmax(1).cpu()
            out[rows] += (after != pred[rows]).numpy() / draws
    return out


def _welch_below(inside: np.ndarray, outside: np.ndarray) -> float:
    """One-sided p-value that the mean of `inside` is below that of `outside`."""
    se = math.sqrt(inside.var(ddof=1) / len(inside) + outside.var(ddof=1) / len(outside))
    gap = outside.mean() - inside.mean()
    if se == 0:
        return 0.0 if gap > 0 else 1.0
    return float(norm.sf(gap / se))


def _more_errors(k1: int, n1: int, k2: int, n2: int) -> float:
    """One-sided p-value that the error rate k1/n1 is above k2/n2 (pooled two-proportion z)."""
    pooled = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    gap = k1 / n1 - k2 / n2
    if se == 0:
        return 1.0
    return float(norm.sf(gap / se))


def slices(words: Iterator, swaps: dict[str, np.ndarray], errors: np.ndarray, fdr: float) -> list[dict]:
    """Every (word, modality) slice tested, with its figures, p- and q-values and whether it has
    a prior (`prior`). `words`: (text modality, word, carriers (N,) bool)."""
    out = []
    for text, word, carriers in words:
        for m, dep in swaps.items():
            if m == text:
                continue
            rest = ~carriers
            if carriers.sum() < 2 or rest.sum() < 2:
                continue
            k1, n1, k2, n2 = int(errors[carriers].sum()), int(carriers.sum()), int(errors[rest].sum()), int(rest.sum())
            p = max(_welch_below(dep[carriers], dep[rest]), _more_errors(k1, n1, k2, n2))
            unmoved = carriers & errors & (dep == 0)
            out.append(
                {
                    "word": word,
                    "text": text,
                    "modality": m,
                    "n": n1,
                    "flip_rate": round(float(dep[carriers].mean()), 4),
                    "flip_rate_elsewhere": round(float(dep[rest].mean()), 4),
                    "error_rate": round(k1 / n1, 4),
                    "error_rate_elsewhere": round(k2 / n2, 4),
                    "errors_unmoved": int(unmoved.sum()),
                    "errors_explained": round(float(unmoved.sum() / max(errors.sum(), 1)), 4),
                    "p_value": p,
                }
            )
    q = false_discovery_control([s["p_value"] for s in out], method="bh") if out else []
    for s, qq in zip(out, q):
        s["q_value"] = float(qq)
        s["prior"] = bool(qq < fdr)
    return out
