"""Turn the config's model and data specs into an adapter and sample sets."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.adapter import ModelAdapter
from pipeline.config import DataSpec, ModelSpec, import_callable
from pipeline.data import SampleSet
from pipeline.demo import catalog
from pipeline.errors import MmdiagError


def check_model(spec: ModelSpec) -> None:
    """What can be checked without building the model: the name, the files, the import."""
    if spec.weights is not None and not spec.weights.is_file():
        raise MmdiagError(f"model.weights: no file at {spec.weights}; give the path of a .safetensors state dict")
    if spec.name is not None and spec.name not in catalog.MODELS:
        raise MmdiagError(f"model.name: unknown model {spec.name!r}; choose one of {', '.join(catalog.MODELS)} or set model.factory")
    if spec.factory is not None:
        import_callable(spec.factory, "model.factory")


def load_model(spec: ModelSpec, cache: Path | None = None, device: str = "cpu") -> tuple[ModelAdapter, bool]:
    """(adapter in eval mode, whether built-in weights came from the cache)."""
    check_model(spec)
    cached = False
    if spec.name is not None:
        adapter, cached = catalog.load_model(spec.name, cache=cache, device=device)
    else:
        adapter = import_callable(spec.factory, "model.factory")()
        if not isinstance(adapter, ModelAdapter):
            raise MmdiagError(f"model.factory: {spec.factory} returned {type(adapter).__name__}, not a ModelAdapter")
    if spec.weights is not None:
        try:
            adapter.module.load_state_dict(load_file(str(spec.weights)))
        except Exception as e:
            raise MmdiagError(f"model.weights: {spec.weights} does not fit the model ({str(e).splitlines()[0]})") from None
    return adapter.eval(), cached


def load_data(spec: DataSpec, split: str, seed: int) -> SampleSet:
    if spec.name is not None:
        if spec.name not in catalog.DATA:
            raise MmdiagError(f"data.name: unknown data {spec.name!r}; choose one of {', '.join(catalog.DATA)} or set data.factory")
        return catalog.load_data(spec.name, split, spec.n, seed)
    data = import_callable(spec.factory, "data.factory")(split=split, n=spec.n, seed=seed)
    if not isinstance(data, SampleSet):
        raise MmdiagError(f"data.factory: {spec.factory} returned {type(data).__name__}, not a SampleSet")
    return data


@torch.no_grad()
def predict(adapter: ModelAdapter, data: SampleSet, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """Logits (N, C) over the whole data set, in batches; NaN output is an error."""
    adapter.to(device).eval()
    out = []
    for rows, inputs in data.batches(batch_size, device):
        logits = adapter(inputs)
        if logits.dim() != 2:
            raise MmdiagError(f"model: forward returned shape {tuple(logits.shape)}; a classifier must return (B, C) logits")
        if not torch.isfinite(logits).all():
            bad = data.ids[rows][~torch.isfinite(logits).all(1).cpu()][0]
            raise MmdiagError(f"model: non-finite output for sample {int(bad)}; check the weights and that input")
        out.append(logits.float().cpu())
    return torch.cat(out)
