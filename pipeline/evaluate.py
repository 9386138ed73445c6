"""Model evaluation: accuracy per split and per slice of the samples' concepts."""

from __future__ import annotations

import torch

from mmdiag.pipeline.data import SampleSet


def rate(hits: torch.Tensor) -> float:
    """Fraction of True, rounded for reading (exact counts are kept beside it)."""
    return round(float(hits.float().mean()), 4)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return rate(logits.argmax(1) == labels)


def concept_slices(data: SampleSet, correct: torch.Tensor, max_values: int = 10) -> list[dict]:
    """Accuracy where each concept takes each of its values (concepts with few values only)."""
    slices = []
    for concept, values in data.meta.items():
        levels = values[values >= 0].unique()
        if len(levels) < 2 or len(levels) > max_values:
            continue
        for v in levels.tolist():
            rows = values == v
            slices.append({"where": f"{concept}={v}", "n": int(rows.sum()), "accuracy": rate(correct[rows])})
    return slices


def model_summary(data: SampleSet, logits: torch.Tensor, split: str, split_accuracy: dict[str, dict], fusion: str | None = None) -> dict:
    """The `model` block of summary.json for the analysed split; `fusion`: where the adapter
    says the modalities meet ("late", "joint" or None: not declared)."""
    correct = logits.argmax(1) == data.labels
    return {
        "split": split,
        "fusion": fusion,
        "n": len(data),
        "accuracy": rate(correct),
        "n_errors": int((~correct).sum()),
        "splits": split_accuracy,
        "slices": concept_slices(data, correct),
    }
