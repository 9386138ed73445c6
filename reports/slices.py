"""Slices of the data where errors concentrate.

Candidates: every value of every concept (the samples' `meta`, the true label, and k-means
clusters of the decision-level features), and every pair of values of two concepts (not
clusters). A slice is kept when the lower end of its Wilson interval for the error rate lies
above the overall error rate, at a familywise 95% level: the intervals are Bonferroni-corrected
for the number of slices tried, so data with uniform errors yields nothing. A pair is kept only
if it is also worse than both of its single-concept parents (lower bound above each parent's
rate), so that it says something its parents do not. Slices are ranked by the lower bound: the
error rate we are confident of, which favours a large, clearly bad slice over a tiny extreme one.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np

from mmdiag.pipeline.stats import wilson, z_value
from mmdiag.reports.thresholds import DEFAULT, Thresholds


@dataclass
class Column:
    """A concept to slice on: integer values per sample (-1 = unknown) and a display name per value."""

    values: np.ndarray
    names: dict[int, str]
    kind: str = "concept"  # or "cluster"


@dataclass
class Slice:
    conditions: tuple[tuple[str, str], ...]
    mask: np.ndarray
    n: int
    n_errors: int
    low: float
    high: float
    base: float
    kind: str

    @property
    def where(self) -> str:
        return " & ".join(f"{c}={v}" for c, v in self.conditions)

    @property
    def error_rate(self) -> float:
        return self.n_errors / self.n

    def record(self, index: int) -> dict:
        return {
            "id": f"s{index}",
            "where": self.where,
            "kind": self.kind,
            "conditions": [{"concept": c, "value": v} for c, v in self.conditions],
            "n": self.n,
            "n_errors": self.n_errors,
            "error_rate": round(self.error_rate, 4),
            "ci": [round(self.low, 4), round(self.high, 4)],
            "lift": round(self.error_rate / self.base, 3) if self.base else None,
        }


def columns(meta: dict[str, np.ndarray], labels: np.ndarray, class_names: list[str], max_values: int) -> dict[str, Column]:
    """The data's concepts with at most `max_values` known values, and the true label."""
    out = {}
    for name, values in meta.items():
        levels = np.unique(values[values >= 0])
        if 2 <= len(levels) <= max_values:
            out[name] = Column(values, {int(v): str(int(v)) for v in levels})
    names = {k: class_names[k] if k < len(class_names) else str(k) for k in np.unique(labels).tolist()}
    out["label"] = Column(labels, names)
    return out


def _cells(cols: dict[str, Column]):
    """(conditions, mask, kind, parents) of every single value and every pair of concept values."""
    singles = {}
    for name, col in cols.items():
        for v, shown in col.names.items():
            singles[(name, shown)] = (col.values == v, col.kind)
            yield ((name, shown),), col.values == v, col.kind, ()
    concepts = [n for n, c in cols.items() if c.kind == "concept"]
    for a, b in combinations(concepts, 2):
        for va in cols[a].names.values():
            for vb in cols[b].names.values():
                ma, mb = singles[(a, va)][0], singles[(b, vb)][0]
                yield ((a, va), (b, vb)), ma & mb, "concept", ((a, va), (b, vb))


def find(errors: np.ndarray, cols: dict[str, Column], thresholds: Thresholds = DEFAULT) -> list[Slice]:
    """The kept slices, best first (at most `max_slices`)."""
    errors = np.asarray(errors, bool)
    base = float(errors.mean())
    cells = [(cond, mask, kind, parents) for cond, mask, kind, parents in _cells(cols) if mask.sum() >= thresholds.min_support]
    if not cells or base in (0.0, 1.0):
        return []
    n = np.array([m.sum() for _, m, _, _ in cells])
    k = np.array([(errors & m).sum() for _, m, _, _ in cells])
    low, high = wilson(k, n, z_value(thresholds.confidence, len(cells)))
    rate = {cond: ki / ni for (cond, *_), ki, ni in zip(cells, k, n)}
    kept = []
    for (cond, mask, kind, parents), ni, ki, lo, hi in zip(cells, n, k, low, high):
        beats_parents = all(lo > rate.get((p,), 1.0) for p in parents)
        if lo > base and beats_parents:
            kept.append(Slice(cond, mask, int(ni), int(ki), float(lo), float(hi), base, kind))
    kept.sort(key=lambda s: (-s.low, -s.n))
    return kept[: thresholds.max_slices]


def kmeans(x: np.ndarray, k: int, seed: int = 0, iterations: int = 50) -> np.ndarray:
    """Cluster ids of standardised rows: k-means++ seeding, then Lloyd's iterations (seeded)."""
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d = np.min([((x - c) ** 2).sum(1) for c in centres], axis=0)
        centres.append(x[rng.choice(len(x), p=d / d.sum())] if d.sum() > 0 else x[rng.integers(len(x))])
    centres = np.stack(centres)
    for _ in range(iterations):
        assign = ((centres**2).sum(1)[None] - 2 * x @ centres.T).argmin(1)  # |x - c|^2 up to |x|^2
        moved = np.stack([x[assign == j].mean(0) if (assign == j).any() else centres[j] for j in range(k)])
        if np.allclose(moved, centres):
            break
        centres = moved
    return assign


def cluster_column(decision: np.ndarray, thresholds: Thresholds = DEFAULT, seed: int = 0) -> Column:
    k = max(2, min(thresholds.clusters, len(decision) // max(thresholds.min_support, 1)))
    assign = kmeans(np.asarray(decision, np.float64), k, seed)
    return Column(assign, {j: str(j) for j in np.unique(assign).tolist()}, kind="cluster")


def profile(mask: np.ndarray, cols: dict[str, Column], top: int = 3) -> list[dict]:
    """The concept values most over-represented in a slice (what a cluster is made of)."""
    rows = []
    for name, col in cols.items():
        if col.kind != "concept":
            continue
        for v, shown in col.names.items():
            inside, overall = float((col.values[mask] == v).mean()), float((col.values == v).mean())
            rows.append({"where": f"{name}={shown}", "share": round(inside, 3), "overall": round(overall, 3)})
    rows.sort(key=lambda r: r["overall"] - r["share"])
    return rows[:top]
