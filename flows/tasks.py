"""The Prefect tasks: preparing the model, evaluating it, and one generic task per stage.

Task inputs are small and hashable (specs, fingerprints, settings, result references); the cache
key is those inputs plus the source of pipeline/, of this package's task code and of the
stage's own modules, so a fix to a stage's code recomputes it and, through the changed result
reference, its dependents.
"""

from __future__ import annotations

import hashlib
import importlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import INPUTS, NO_CACHE, CachePolicy

from flows import results
from pipeline.config import DataSpec, ModelSpec
from pipeline.device import resolve_device
from pipeline.errors import MmdiagError
from pipeline.evaluate import accuracy, model_summary
from pipeline.resolve import load_data, load_model, predict
from pipeline.store import fingerprint_module
from stages import Context, StageResult, registry

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class CodeVersion(CachePolicy):
    """Hash of the code a result depends on: pipeline/, flows' task code, the stage's modules."""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str | None:
        files = sorted((ROOT / "pipeline").rglob("*.py")) + [Path(__file__), Path(results.__file__)]
        stage = (inputs or {}).get("stage")
        if stage:
            files += [Path(importlib.import_module(m).__file__) for m in registry.get(stage).modules]
        h = hashlib.sha256()
        for f in files:
            h.update(f.read_bytes())
        return h.hexdigest()


def policy(cache: Path) -> CachePolicy:
    return (INPUTS - "cache" + CodeVersion()).configure(key_storage=cache / "keys")


# What this process has loaded, by reference: the flow loads the model and data once to
# fingerprint them, and its tasks reuse them; a worker elsewhere loads them on first use.
_loaded: dict[tuple, Any] = {}


def model_ref(spec: ModelSpec, cache: Path, device: str) -> tuple[dict, bool]:
    adapter, cached = load_model(spec, cache=cache, device=device)
    ref = {"spec": spec.model_dump_json(), "fingerprint": fingerprint_module(adapter.module)}
    _loaded[("model", ref["spec"], ref["fingerprint"])] = adapter
    return ref, cached


def data_ref(spec: DataSpec, split: str, seed: int) -> dict:
    data = load_data(spec, split, seed)
    ref = {"spec": spec.model_dump_json(), "split": split, "seed": seed, "n": len(data), "fingerprint": data.fingerprint()}
    _loaded[("data", ref["spec"], split, seed, ref["fingerprint"])] = data
    return ref


def adapter_for(model: dict, cache: Path):
    key = ("model", model["spec"], model["fingerprint"])
    if key not in _loaded:
        ref, _ = model_ref(ModelSpec.model_validate_json(model["spec"]), cache, "cpu")
        if ref["fingerprint"] != model["fingerprint"]:
            raise MmdiagError("model: the weights changed while the run was going on; start the run again")
    return _loaded[key]


def data_for(ref: dict):
    key = ("data", ref["spec"], ref["split"], ref["seed"], ref["fingerprint"])
    if key not in _loaded:
        if data_ref(DataSpec.model_validate_json(ref["spec"]), ref["split"], ref["seed"])["fingerprint"] != ref["fingerprint"]:
            raise MmdiagError(f"data: split {ref['split']!r} is not the data this run was started with; start the run again")
    return _loaded[key]


@task(name="prepare-model", cache_policy=NO_CACHE)
def prepare_model(spec_json: str, cache: str, device: str) -> dict:
    """Load the model; a built-in demo model is trained here on first use (weights cache)."""
    ref, cached = model_ref(ModelSpec.model_validate_json(spec_json), Path(cache), device)
    return {**ref, "weights_from_cache": cached}


@task(name="evaluate", tags=["gpu"])
def evaluate(model: dict, data: dict[str, dict], split: str, batch_size: int, device: str, cache: str) -> results.Ref:
    start = time.perf_counter()
    dev = resolve_device(device)
    adapter = adapter_for(model, Path(cache))
    logits = {s: predict(adapter, data_for(ref), dev, batch_size) for s, ref in data.items()}
    analysed = data_for(data[split])
    per_split = {s: {"n": len(data_for(ref)), "accuracy": accuracy(logits[s], data_for(ref).labels)} for s, ref in data.items()}
    summary = model_summary(analysed, logits[split], split, per_split)
    arrays = {"ids": analysed.ids.numpy(), "labels": analysed.labels.numpy(), "logits": logits[split].numpy()}
    meta = {"seconds": round(time.perf_counter() - start, 3)}
    return results.save(Path(cache) / "results", StageResult(summary, arrays), meta)


@task(name="stage", tags=["gpu"])
def run_stage(
    stage: str,
    settings: dict[str, Any],
    model: dict,
    data: dict,
    evaluation: results.Ref,
    upstream: dict[str, results.Ref],
    seed: int,
    device: str,
    cache: str,
    plugins: list[str] = (),
    shard: list[int] | None = None,
) -> results.Ref:
    """One stage, or shard [i, n] of its samples (a worker on another machine gets here with
    nothing but these arguments: it imports the plugins and loads model and data itself)."""
    start = time.perf_counter()
    registry.load_plugins(plugins)
    entry = registry.get(stage)
    evaluated, _ = results.load(evaluation)
    samples, logits = data_for(data), torch.from_numpy(evaluated.arrays["logits"])
    if shard is not None:
        rows = torch.tensor_split(torch.arange(len(samples)), shard[1])[shard[0]]
        samples, logits = samples.subset(rows), logits[rows]
    ctx = Context(
        adapter=adapter_for(model, Path(cache)).to(resolve_device(device)),
        data=samples,
        device=resolve_device(device),
        seed=seed,
        logits=logits,
    )
    read = {name: results.load(ref)[0] for name, ref in upstream.items()}
    result = entry.run(ctx, entry.config.model_validate(settings), read)
    meta = {"seconds": round(time.perf_counter() - start, 3), "model": model["fingerprint"], "shard": shard}
    return results.save(Path(cache) / "results", result, meta)


def merge_shards(stage: str, parts: list[results.Ref], cache: Path) -> results.Ref:
    """The shards' results combined by the stage's own `merge` (cheap: no model calls)."""
    loaded = [results.load(ref) for ref in parts]
    merged = registry.get(stage).merge([result for result, _ in loaded])
    meta = {**loaded[0][1], "seconds": round(sum(m["seconds"] for _, m in loaded), 3), "shard": None, "shards": len(parts)}
    return results.save(cache / "results", merged, meta)
