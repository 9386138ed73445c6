"""Samples, stored column-wise so that a batch is a slice and not a Python loop.

Sample `i` is the dict
    {"id", "inputs": {modality: raw tensor}, "label",
     "meta": {concept: value}, "truth": {modality: {region: mask}}, "display": {...}}
where `meta` holds named concepts (for probing and slicing; -1 = unknown), `truth` holds
ground-truth relevance masks over each modality's own grid (pixels, token positions), and
`display` what the report shows (token strings; images are shown from the inputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor

from pipeline.errors import MmdiagError
from pipeline.store import fingerprint_tensors


@dataclass
class SampleSet(torch.utils.data.Dataset):
    inputs: dict[str, Tensor]
    labels: Tensor
    meta: dict[str, Tensor] = field(default_factory=dict)
    truth: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    display: dict[str, list] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    ids: Tensor | None = None
    name: str = "data"

    def __post_init__(self):
        if self.ids is None:
            self.ids = torch.arange(len(self.labels))
        self.validate()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {
            "id": int(self.ids[i]),
            "inputs": {m: x[i] for m, x in self.inputs.items()},
            "label": int(self.labels[i]),
            "meta": {k: int(v[i]) for k, v in self.meta.items()},
            "truth": {m: {r: t[i] for r, t in regions.items()} for m, regions in self.truth.items()},
            "display": {k: v[i] for k, v in self.display.items()},
        }

    def validate(self) -> None:
        n = len(self.labels)
        if n == 0:
            raise MmdiagError(f"data ({self.name}): the data set is empty")
        if not self.inputs:
            raise MmdiagError(f"data ({self.name}): samples have no inputs")
        for m, x in self.inputs.items():
            if len(x) != n:
                raise MmdiagError(f"data ({self.name}): inputs.{m} has {len(x)} rows for {n} labels")
            if x.is_floating_point() and not torch.isfinite(x).all():
                bad = int((~torch.isfinite(x)).reshape(n, -1).any(1).nonzero()[0])
                raise MmdiagError(f"data ({self.name}): inputs.{m} of sample {bad} holds NaN or inf; clean the data")
        for k, v in self.meta.items():
            if len(v) != n:
                raise MmdiagError(f"data ({self.name}): meta.{k} has {len(v)} values for {n} samples")
        for m, regions in self.truth.items():
            for r, t in regions.items():
                if len(t) != n:
                    raise MmdiagError(f"data ({self.name}): truth.{m}.{r} has {len(t)} masks for {n} samples")
        n_classes = len(self.class_names)
        if n_classes and (self.labels.min() < 0 or self.labels.max() >= n_classes):
            raise MmdiagError(f"data ({self.name}): labels must lie in 0..{n_classes - 1} (class_names)")

    def subset(self, index: Tensor) -> "SampleSet":
        index = torch.as_tensor(index, dtype=torch.long)
        rows = index.tolist()
        return SampleSet(
            inputs={m: x[index] for m, x in self.inputs.items()},
            labels=self.labels[index],
            meta={k: v[index] for k, v in self.meta.items()},
            truth={m: {r: t[index] for r, t in regions.items()} for m, regions in self.truth.items()},
            display={k: [v[i] for i in rows] for k, v in self.display.items()},
            class_names=self.class_names,
            ids=self.ids[index],
            name=self.name,
        )

    def batches(self, batch_size: int, device: torch.device | str = "cpu") -> Iterator[tuple[slice, dict[str, Tensor]]]:
        for start in range(0, len(self), batch_size):
            rows = slice(start, min(start + batch_size, len(self)))
            yield rows, {m: x[rows].to(device) for m, x in self.inputs.items()}

    def fingerprint(self) -> str:
        """Content hash of the inputs, labels and ids: same data, same fingerprint."""
        named = {f"inputs.{m}": x for m, x in self.inputs.items()}
        return fingerprint_tensors({**named, "labels": self.labels, "ids": self.ids})
