"""Stage results as content-addressed files in the cache, passed between tasks by reference.

A reference is `{"path": ..., "sha256": ..., "meta": {...}}`: small and hashable, so a cached
rerun moves no arrays and a worker on another machine loads what it needs itself. The file holds
only the content (figures and arrays), so recomputing the same figures gives the same hash and
the stages reading them stay cached; how long it took travels in `meta`, beside the content.
Loading checks the hash: a truncated or edited result is an error naming the file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save as save_bytes

from pipeline.errors import MmdiagError
from pipeline.store import atomic_write, file_sha256, read_arrays
from stages.base import StageResult

Ref = dict  # {"path": str, "sha256": str}


def save(folder: Path, result: StageResult, meta: dict | None = None) -> Ref:
    """Write a result under `folder/<sha256>.safetensors` and return its reference."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(v) for k, v in result.arrays.items()} or {"_": np.zeros(0)}
    # one metadata entry: safetensors writes several in a per-process random order, which would
    # change the hash of equal content
    header = {"content": json.dumps({"summary": result.summary, "details": result.details}, allow_nan=False, sort_keys=True)}
    blob = save_bytes(arrays, metadata=header)
    sha = hashlib.sha256(blob).hexdigest()
    final = atomic_write(folder / f"{sha}.safetensors", lambda tmp: tmp.write_bytes(blob))
    return {"path": str(final), "sha256": sha, "meta": {**(meta or {}), **({"timings": result.timings} if result.timings else {})}}


def with_timings(summary: dict, timings: dict) -> dict:
    """The summary with the timings merged in where they belong (nested dicts, key by key)."""
    out = dict(summary)
    for k, v in timings.items():
        out[k] = with_timings(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def content(ref: Ref) -> Ref:
    """The part of a reference that the next stage's result depends on."""
    return {"path": ref["path"], "sha256": ref["sha256"]}


def load(ref: Ref) -> tuple[StageResult, dict]:
    """(result, meta) of a reference, after checking its content hash."""
    path = Path(ref["path"])
    if not path.is_file():
        raise MmdiagError(f"{path}: result file is missing; rerun the stage that wrote it")
    if file_sha256(path) != ref["sha256"]:
        raise MmdiagError(f"{path}: result file does not match its hash (truncated or edited); rerun the stage")
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        header = f.metadata()
    arrays = {k: v for k, v in read_arrays(path).items() if k != "_"}
    content = json.loads(header["content"])
    meta = ref.get("meta", {})
    timings = meta.get("timings", {})
    return StageResult(with_timings(content["summary"], timings), arrays, content["details"], timings), meta
