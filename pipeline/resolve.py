"""Turn the config's model and data specs into an adapter and sample sets."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from mmdiag.pipeline.adapter import ModelAdapter, with_units
from mmdiag.pipeline.config import DataSpec, ModelSpec, call_factory, import_callable
from mmdiag.pipeline.data import SampleSet
from mmdiag.pipeline.demo import catalog
from mmdiag.pipeline.device import fit_batch
from mmdiag.pipeline.errors import MmdiagError
from mmdiag.pipeline.store import cache_root
from mmdiag.pipeline.units import Segments


def check_model(spec: ModelSpec) -> None:
    """What can be checked without building the model: the name, the files, the import."""
    if spec.weights is not None and not spec.weights.is_file():
        raise MmdiagError(f"model.weights: no file at {spec.weights}; give the path of a .safetensors state dict")
    if spec.weights is not None:
        from safetensors import safe_open

        try:
            with safe_open(str(spec.weights), framework="pt") as f:
                f.keys()
        except Exception as e:  # safetensors' own error types
            raise MmdiagError(f"model.weights: {spec.weights} is not a readable safetensors file ({' '.join(str(e).split())[:120]}); save the state dict with safetensors.torch.save_file") from None
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
        adapter = call_factory(spec.factory, "model.factory", {"cache": cache_root(cache), "device": device})
        if not isinstance(adapter, ModelAdapter):
            raise MmdiagError(f"model.factory: {spec.factory} returned {type(adapter).__name__}, not a ModelAdapter")
    if spec.weights is not None:
        try:
            adapter.module.load_state_dict(load_file(str(spec.weights)))
        except Exception as e:
            raise MmdiagError(f"model.weights: {spec.weights} does not fit the model ({str(e).splitlines()[0]})") from None
    if spec.segments is not None:
        adapter = with_units(adapter, images=Segments(spec.segments))
    return adapter.eval(), cached


def load_data(spec: DataSpec, split: str, seed: int, cache: Path | None = None) -> SampleSet:
    if spec.name is not None:
        if spec.name not in catalog.DATA:
            raise MmdiagError(f"data.name: unknown data {spec.name!r}; choose one of {', '.join(catalog.DATA)} or set data.factory")
        return catalog.load_data(spec.name, split, spec.n, seed)
    data = call_factory(spec.factory, "data.factory", {"split": split, "n": spec.n, "seed": seed, "cache": cache_root(cache)}, required=("split", "n", "seed"))
    if not isinstance(data, SampleSet):
        raise MmdiagError(f"data.factory: {spec.factory} returned {type(data).__name__}, not a SampleSet")
    return data


def check_contract(adapter: ModelAdapter, data: SampleSet, split: str) -> None:
    """The adapter on two samples of the data, before any stage runs: encode, units, forward
    from the encoded inputs (which a TorchAdapter with `embeddings` must accept), the logits'
    shape against the class names, and every truth mask against its modality's units."""
    b = min(2, len(data))
    where = f"on {b} samples of split {split!r}"
    inputs = {m: x[:b] for m, x in data.inputs.items()}
    missing = [m for m in adapter.modalities if m not in inputs]
    if missing:
        raise MmdiagError(f"data: inputs have no {missing[0]!r}; the model takes {', '.join(adapter.modalities)}")
    unknown = [m for m in data.truth if m not in adapter.modalities]
    if unknown:
        raise MmdiagError(f"data.truth: modality {unknown[0]!r} is not one of the model's ({', '.join(adapter.modalities)}); rename or drop those masks")
    with torch.no_grad():
        encoded = _step(lambda: adapter.encode(inputs), f"model: encoding the inputs {where} failed", "the data's inputs do not fit the model's encode")
        units = _step(lambda: adapter.units(inputs, encoded), f"model: splitting the inputs {where} into units failed", "check the adapter's unit specs against the inputs")
        logits = _step(
            lambda: adapter.forward(encoded), f"model: forward of the encoded inputs {where} failed", "the model must accept what encode returns (embedded text for a modality named in `embeddings`)"
        )
    if not torch.is_tensor(logits) or logits.dim() != 2 or logits.shape[0] != b:
        raise MmdiagError(f"model: forward returned {tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__} for {b} samples; a classifier returns (B, C) logits")
    if not torch.isfinite(logits).all():
        raise MmdiagError(f"model: non-finite logits {where}; check the weights and the inputs")
    if data.class_names and logits.shape[1] != len(data.class_names):
        raise MmdiagError(f"model: forward returns {logits.shape[1]} logits, the data has {len(data.class_names)} class_names; make them agree")
    if adapter.has_late_fusion and b == 2:
        check_late_fusion(adapter, encoded, logits, where)
    for m, regions in data.truth.items():
        for r, masks in regions.items():
            _step(
                lambda: units[m].coverage(masks[:b].to(encoded[m].device)),
                f"data.truth.{m}.{r}: masks shaped {tuple(masks.shape[1:])} do not fit the {m} input's grid",
                "give one value per pixel (images) or token position (text)",
            )


def check_late_fusion(adapter: ModelAdapter, encoded: dict, logits: torch.Tensor, where: str) -> None:
    """What EMAP's encode-once path relies on, shown on the model itself: fuse(separate(x))
    gives forward(x), and each modality's features do not change when the other modalities
    come from another sample."""
    fix = "the modalities must meet only in fuse; remove the late-fusion declaration (fusion=) if they meet earlier"
    with torch.no_grad():
        features = _step(lambda: adapter.separate(encoded), f"model: separate {where} failed", fix)
        fused = _step(lambda: adapter.fuse(features), f"model: fuse {where} failed", fix)
        if not torch.allclose(fused.float(), logits.float(), rtol=1e-4, atol=1e-4 * float(logits.abs().max().clamp_min(1))):
            raise MmdiagError(f"model: fuse(separate(x)) differs from forward(x) {where} (by {float((fused - logits).abs().max()):.3g}); {fix}")
        first, *others = adapter.modalities
        swapped = {**encoded, **{m: encoded[m].flip(0) for m in others}}  # modality `first` with the others of another sample
        moved = adapter.separate(swapped)
    for m in adapter.modalities:
        expected = features[m] if m == first else features[m].flip(0)
        if not torch.allclose(moved[m].float(), expected.float(), rtol=1e-4, atol=1e-5 * float(expected.abs().max().clamp_min(1))):
            raise MmdiagError(f"model: separate's {m} features change with the other modalities' inputs {where}; {fix}")


def _step(fn, what: str, fix: str):
    try:
        return fn()
    except MmdiagError:
        raise
    except Exception as e:  # the user's model code: its error, in one line
        raise MmdiagError(f"{what} ({type(e).__name__}: {' '.join(str(e).split())[:200]}); {fix}") from None


@torch.no_grad()
def predict(adapter: ModelAdapter, data: SampleSet, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """Logits (N, C) over the whole data set, in batches; NaN output is an error."""
    adapter.to(device).eval()
    out = []
    for rows, inputs in data.batches(fit_batch(batch_size, data.inputs), device):
        logits = adapter(inputs)
        if logits.dim() != 2:
            raise MmdiagError(f"model: forward returned shape {tuple(logits.shape)}; a classifier must return (B, C) logits")
        if not torch.isfinite(logits).all():
            bad = data.ids[rows][~torch.isfinite(logits).all(1).cpu()][0]
            raise MmdiagError(f"model: non-finite output for sample {int(bad)}; check the weights and that input")
        out.append(logits.float().cpu())
    return torch.cat(out)
