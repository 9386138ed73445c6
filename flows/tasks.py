"""The Prefect tasks: preparing the model, evaluating it, and one generic task per stage.

Task inputs are small and hashable (specs, fingerprints, settings, result references); the cache
key (flows.cache) is those inputs, except where the cache lives, plus the source of pipeline/,
of this package's task code and of the stage's own modules, so a fix to a stage's code
recomputes it and, through the changed result reference, its dependents. A task answered from
the cache ends in Prefect's "Cached" state.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from mmdiag.flows import cache as store
from mmdiag.flows import results
from mmdiag.flows.progress import Reporter
from mmdiag.pipeline.adapter import setup
from mmdiag.pipeline.config import DataSpec, ModelSpec, import_callable
from mmdiag.pipeline.errors import MmdiagError
from mmdiag.pipeline.evaluate import accuracy, model_summary
from mmdiag.pipeline.resolve import load_data, load_model, predict
from mmdiag.pipeline.store import fingerprint_module
from mmdiag.stages import Context, StageResult, extended, registry

log = logging.getLogger("mmdiag")

ROOT = Path(__file__).resolve().parent.parent


def code_version(stage: str | None = None, packages: tuple[str, ...] = (), extensions: str = "") -> str:
    """Hash of the code a result depends on: pipeline/, flows' task code, the stage's modules,
    the whole of `packages` (folders of the project) and the fingerprint of the registered
    extensions it runs (Registry.fingerprint)."""
    files = sorted((ROOT / "pipeline").rglob("*.py")) + [Path(__file__), Path(results.__file__), Path(store.__file__)]
    files += [f for package in packages for f in sorted((ROOT / package).rglob("*.py"))]
    if stage:
        files += [Path(importlib.import_module(m).__file__) for m in registry.get(stage).modules]
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    h.update(extensions.encode())
    return h.hexdigest()


def _keyed(model: dict) -> dict:
    """The model as a cache key sees it: where its weights file lives does not matter (their
    content is in the fingerprint), so a moved project stays cached; a user's factory adds the
    source of its module (`setup`)."""
    spec = json.loads(model["spec"])
    out = {"spec": {k: v for k, v in spec.items() if k != "weights"}, "fingerprint": model["fingerprint"]}
    return {**out, "setup": model["setup"]} if model.get("setup") else out


def model_setup(spec: ModelSpec, adapter) -> str:
    """What the results depend on besides the weights, for a user's factory ("" for a built-in
    model): the adapter's settings (pipeline.adapter.setup: a VLM's answers and prompt, class
    names, units) and the source of the factory's module, so that an edit to either does not
    reuse results of the model as it was."""
    if spec.factory is None:
        return ""
    h = hashlib.sha256(setup(adapter).encode())
    import_callable(spec.factory, "model.factory")  # the module named in the spec, imported
    path = getattr(sys.modules[spec.factory.partition(":")[0]], "__file__", None)
    if path and Path(path).exists():
        h.update(Path(path).read_bytes())
    return h.hexdigest()


def _answer(cache: Path, name: str, inputs: dict, stage: str | None, refresh: bool, compute):
    """The task's return: the recorded result (state "Cached") or the computed one."""
    entry = registry.get(stage) if stage else None
    extensions = entry.extensions(inputs["settings"]) if entry is not None and entry.extensions is not None else ""
    ref, hit = store.cached(cache, name, inputs, code_version(stage, extensions=extensions), refresh, compute)
    return Completed(data=ref, name="Cached") if hit else ref


# What this process has loaded, by reference: the flow loads the model and data once to
# fingerprint them, and its tasks reuse them; a worker elsewhere loads them on first use.
_loaded: dict[tuple, Any] = {}


def model_ref(spec: ModelSpec, cache: Path, device: str) -> tuple[dict, bool]:
    adapter, cached = load_model(spec, cache=cache, device=device)
    ref = {"spec": spec.model_dump_json(), "fingerprint": fingerprint_module(adapter.module), "setup": model_setup(spec, adapter)}
    _loaded[("model", ref["spec"], ref["fingerprint"])] = adapter
    return ref, cached


def data_ref(spec: DataSpec, split: str, seed: int, cache: Path | None = None) -> dict:
    data = load_data(spec, split, seed, cache)
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


def data_for(ref: dict, cache: Path | None = None):
    key = ("data", ref["spec"], ref["split"], ref["seed"], ref["fingerprint"])
    if key not in _loaded:
        if data_ref(DataSpec.model_validate_json(ref["spec"]), ref["split"], ref["seed"], cache)["fingerprint"] != ref["fingerprint"]:
            raise MmdiagError(f"data: split {ref['split']!r} is not the data this run was started with; start the run again")
    return _loaded[key]


# The model the pre-flight loaded and checked, for the flow's first task (taken once, so a later
# run in this process loads its model afresh)
_handed: dict[str, tuple[dict, bool]] = {}


def hand_over(spec: ModelSpec, ref: dict, cached: bool) -> None:
    _handed[spec.model_dump_json()] = (ref, cached)


@task(name="prepare-model", cache_policy=NO_CACHE, persist_result=False)
def prepare_model(spec_json: str, cache: str, device: str) -> dict:
    """The model: the one the pre-flight loaded, or loaded here (a built-in demo model is
    trained on first use, into the weights cache)."""
    ref, cached = _handed.pop(spec_json, None) or model_ref(ModelSpec.model_validate_json(spec_json), Path(cache), device)
    return {**ref, "weights_from_cache": cached}


@task(name="evaluate", cache_policy=NO_CACHE, persist_result=False)
def evaluate(model: dict, data: dict[str, dict], split: str, batch_size: int, device: str, cache: str, refresh: bool = False):
    inputs = {"model": _keyed(model), "data": data, "split": split, "batch_size": batch_size, "device": device}
    return _answer(Path(cache), "evaluate", inputs, None, refresh, lambda: _evaluate(model, data, split, batch_size, device, Path(cache)))


def _evaluate(model: dict, data: dict[str, dict], split: str, batch_size: int, device: str, cache: Path) -> results.Ref:
    start = time.perf_counter()
    dev = torch.device(device)  # resolved by the run plan
    adapter = adapter_for(model, cache)
    log.info("evaluate: the model on %s", ", ".join(f"{s} ({len(data_for(ref, cache)):,} samples)" for s, ref in data.items()))
    logits = {s: predict(adapter, data_for(ref, cache), dev, batch_size) for s, ref in data.items()}
    analysed = data_for(data[split], cache)
    per_split = {s: {"n": len(data_for(ref, cache)), "accuracy": accuracy(logits[s], data_for(ref, cache).labels)} for s, ref in data.items()}
    summary = model_summary(analysed, logits[split], split, per_split, adapter.fusion)
    arrays = {"ids": analysed.ids.numpy(), "labels": analysed.labels.numpy(), "logits": logits[split].numpy()}
    meta = {"seconds": round(time.perf_counter() - start, 3)}
    return results.save(cache / "results", StageResult(summary, arrays), meta)


@task(name="stage", cache_policy=NO_CACHE, persist_result=False)
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
    refresh: bool = False,
):
    """One stage, or shard [i, n] of its samples (a worker on another machine gets here with
    nothing but these arguments: it imports the plugins and loads model and data itself)."""
    registry.load_plugins(plugins)
    inputs = dict(stage=stage, settings=settings, model=model, data=data, evaluation=evaluation, upstream=upstream, seed=seed, device=device, plugins=list(plugins), shard=shard)
    return _answer(Path(cache), "stage", {**inputs, "model": _keyed(model)}, stage, refresh, lambda: _run_stage(**inputs, cache=Path(cache)))


def _run_stage(stage, settings, model, data, evaluation, upstream, seed, device, plugins, shard, cache: Path) -> results.Ref:
    start = time.perf_counter()
    entry = registry.get(stage)
    evaluated, _ = results.load(evaluation, cache / "results")
    read = {name: results.load(ref, cache / "results")[0] for name, ref in upstream.items()}
    samples, logits = extended(data_for(data, cache), read), torch.from_numpy(evaluated.arrays["logits"])
    if shard is not None:
        rows = torch.tensor_split(torch.arange(len(samples)), shard[1])[shard[0]]
        samples, logits = samples.view(rows), logits[rows]
    ctx = Context(
        adapter=adapter_for(model, cache).to(torch.device(device)),
        data=samples,
        device=torch.device(device),
        seed=seed,
        logits=logits,
        progress=Reporter(stage if shard is None else f"{stage} shard {shard[0] + 1}/{shard[1]}"),
    )
    ctx.progress("starting", 0.0)  # the first line comes at once: a stage's first step can take seconds
    result = entry.run(ctx, entry.config.model_validate(settings), read)
    ctx.progress("done", 1.0)
    meta = {"seconds": round(time.perf_counter() - start, 3), "model": model["fingerprint"], "shard": shard}
    return results.save(cache / "results", result, meta)


def merge_shards(stage: str, parts: list[results.Ref], cache: Path) -> results.Ref:
    """The shards' results combined by the stage's own `merge` (cheap: no model calls)."""
    loaded = [results.load(ref, cache / "results") for ref in parts]
    merged = registry.get(stage).merge([result for result, _ in loaded])
    meta = {
        **loaded[0][1],
        "seconds": round(sum(m["seconds"] for _, m in loaded), 3),
        "shard": None,
        "shards": len(parts),
        "parts": [ref["sha256"] for ref in parts],
    }  # kept by `mmdiag cache prune` with the merge
    return results.save(cache / "results", merged, meta)
