"""Device selection: `auto` takes CUDA when there is one."""

from typing import Literal

import torch

from mmdiag.pipeline.errors import MmdiagError

DeviceName = Literal["auto", "cpu", "cuda"]


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise MmdiagError("device: 'cuda' was asked for but no CUDA GPU is visible; use 'auto' or 'cpu'")
        return torch.device("cuda")
    raise MmdiagError(f"device: unknown device {name!r}; use one of auto, cpu, cuda")


BATCH_ELEMENTS = 1 << 24  # input elements (samples x copies x elements a sample) one batch may hold


def fit_batch(requested: int, inputs, copies: int = 1) -> int:
    """`requested` samples a batch, fewer where the samples are large: a batch's inputs (with
    `copies` of each sample) stay under BATCH_ELEMENTS (64 MB of floats; a 224 px image is
    150k elements, so 111 of them, where 32 px images would allow 5,000). Stage results do not
    depend on the batch size, so this changes only memory and speed."""
    per_sample = sum(int(torch.Size(x.shape[1:]).numel()) for x in inputs.values()) * copies
    return max(1, min(requested, BATCH_ELEMENTS // max(per_sample, 1)))
