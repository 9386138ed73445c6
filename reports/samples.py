"""The analysed samples as the report sees them: the model's predictions in data order, and how
each modality's attribution units map onto the data (image grids, token positions, truth masks).

Stage results index samples by id; the data by row. Everything here is lookup and pooling of
what the stages and the data already hold, never a model call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from mmdiag.pipeline.data import SampleSet
from mmdiag.pipeline.errors import MmdiagError
from mmdiag.stages import methods
from mmdiag.stages.base import StageResult


def card_method(unimodal: StageResult | None) -> str | None:
    """The attribution method whose maps cards and heatmaps read: the best-ranked registered
    method (stages/methods.py, `cards`) that stage 1 ran."""
    if unimodal is None:
        return None
    return methods.for_cards(lambda name: f"attr.{name}.pred" in unimodal.arrays)


@dataclass
class Evaluated:
    """The model's behaviour on the analysed data, in data order."""

    data: SampleSet
    labels: np.ndarray  # (N,)
    pred: np.ndarray  # (N,)
    probs: np.ndarray  # (N, C)
    row_of: dict[int, int] = field(repr=False)  # sample id -> data row

    @cached_property
    def errors(self) -> np.ndarray:
        return self.pred != self.labels

    @property
    def error_rate(self) -> float:
        return float(self.errors.mean())

    def rows(self, ids) -> np.ndarray:
        """Data rows of sample ids (ids the data does not hold are an error)."""
        try:
            return np.array([self.row_of[int(i)] for i in ids], dtype=int)
        except KeyError as e:
            raise MmdiagError(f"report: a stage result names sample {e.args[0]}, which the analysed data does not hold; rerun the stages on this data") from None

    def in_data_order(self, result: StageResult, name: str) -> np.ndarray | None:
        """A stage's per-sample array over the whole data, reordered to data order; None when the
        stage covered only some of the samples."""
        ids = result.arrays["ids"]
        if len(ids) != len(self.labels):
            return None
        return np.asarray(result.arrays[name])[self.rows(ids).argsort()]

    def class_name(self, k: int) -> str:
        names = self.data.class_names
        return names[k] if k < len(names) else str(k)


def evaluated(results: dict[str, StageResult], data: SampleSet) -> Evaluated:
    model = results["model"].arrays
    ids = np.asarray(model["ids"])
    if len(ids) != len(data) or not np.array_equal(ids, data.ids.numpy()):
        raise MmdiagError("report: the evaluation's sample ids are not the analysed data's; rerun the diagnosis on this data")
    logits = np.asarray(model["logits"], dtype=np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    return Evaluated(data, np.asarray(model["labels"]), logits.argmax(1), probs, {int(i): r for r, i in enumerate(ids)})


def modalities(data: SampleSet, results: dict[str, StageResult]) -> list[str]:
    """Modality order of the attribution units: stage 1's own record if it has one, else the
    data's inputs (which the adapters take in their own order)."""
    unimodal = results.get("unimodal")
    if unimodal is not None and unimodal.details.get("modalities"):
        return list(unimodal.details["modalities"])
    return list(data.inputs)


def spans(data: SampleSet, results: dict[str, StageResult]) -> dict[str, slice]:
    """Each modality's columns in stage 1's (n, F) attribution arrays."""
    sizes = [int(s) for s in results["unimodal"].arrays["sizes"]]
    names = modalities(data, results)
    if len(sizes) != len(names):
        raise MmdiagError(f"report: stage 1 has units for {len(sizes)} modalities, the data {len(names)}; record the modalities in its details")
    ends = np.cumsum([0, *sizes])
    return {m: slice(int(a), int(b)) for m, a, b in zip(names, ends[:-1], ends[1:])}


def image_grid(data: SampleSet, modality: str, n_units: int) -> tuple[int, int] | None:
    """(rows, cols) of the patch grid when the modality is an image (C, H, W), C in (1, 3), whose
    units tile it in square patches; None otherwise."""
    x = data.inputs[modality]
    if x.dim() != 4 or x.shape[1] not in (1, 3) or n_units <= 0:
        return None
    h, w = x.shape[2:]
    patch = int(round((h * w / n_units) ** 0.5))
    if patch == 0 or h % patch or w % patch or (h // patch) * (w // patch) != n_units:
        return None
    return h // patch, w // patch


def tokens(data: SampleSet, modality: str) -> list[list[str]] | None:
    """Display tokens per sample (position k = unit k) when the data has them."""
    shown = data.display.get(modality)
    return shown if shown and isinstance(shown[0], (list, tuple)) else None


def unit_labels(data: SampleSet, modality: str, row: int, n_units: int) -> list[str]:
    grid = image_grid(data, modality, n_units)
    if grid:
        return [f"r{i}c{j}" for i in range(grid[0]) for j in range(grid[1])]
    shown = tokens(data, modality)
    words = list(shown[row]) if shown else []
    return [words[k] if k < len(words) else f"u{k}" for k in range(n_units)]


COVERAGE_ROWS = 1024


def coverage(data: SampleSet, modality: str, region: str, n_units: int) -> np.ndarray | None:
    """(N, n_units): how much of each unit lies in a truth region (patch coverage for images, the
    mask itself for token positions); None where the mask does not fit the units."""
    mask = data.truth.get(modality, {}).get(region)
    if mask is None:
        return None
    grid = image_grid(data, modality, n_units)
    shape = tuple(mask.shape[1:])
    if not ((grid and len(shape) == 2) or (len(shape) == 1 and shape[0] <= n_units)):
        return None
    out = np.empty((len(mask), n_units), np.float32)
    for start in range(0, len(mask), COVERAGE_ROWS):  # a block at a time: the masks of a streamed set stay on disk
        m = np.asarray(mask[start : start + COVERAGE_ROWS].numpy(), np.float32)
        if grid:
            r, c = grid
            out[start : start + len(m)] = m.reshape(len(m), r, shape[0] // r, c, shape[1] // c).mean((2, 4)).reshape(len(m), n_units)
        else:
            out[start : start + len(m)] = np.pad(m, ((0, 0), (0, n_units - shape[0])))
    return out


def binary_concepts(data: SampleSet) -> dict[str, np.ndarray]:
    """Concepts whose known values (>= 0) are 0 and 1 only."""
    out = {}
    for name, values in data.meta.items():
        v = values.numpy()
        known = set(np.unique(v[v >= 0]).tolist())
        if known == {0, 1}:
            out[name] = v
    return out


def feature_concepts(summary: dict) -> dict[int, str]:
    """Decision-level feature -> the concept stage 3 (or stage 4) assigned to it."""
    out = {}
    for f in (summary.get("representation") or {}).get("features", []):
        if f.get("concept") is not None:
            out[int(f["feature"])] = f["concept"]
    for entries in (summary.get("composition") or {}).get("per_class", {}).values():
        for e in entries:
            if e.get("concept") is not None:
                out.setdefault(int(e["feature"]), e["concept"])
    return out
