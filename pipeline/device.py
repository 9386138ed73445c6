"""Device selection: `auto` takes CUDA when there is one."""

from typing import Literal

import torch

from pipeline.errors import MmdiagError

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
