"""Stage results as content-addressed files in the cache, passed between tasks by reference.

A reference is `{"sha256": ..., "meta": {...}}`, the file being `<results folder>/<sha256>.safetensors`:
small, hashable and free of paths (a cache folder can move), so a cached rerun moves no arrays
and a worker on another machine loads what it needs from its own cache folder. The file holds
only the content (figures and arrays), so recomputing the same figures gives the same hash and
the stages reading them stay cached; how long it took travels in `meta`, beside the content.
Loading checks the hash: a truncated or edited result is an error naming the file.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
from safetensors.numpy import save as save_bytes

from mmdiag.pipeline.errors import MmdiagError
from mmdiag.pipeline.store import atomic_write, file_sha256, read_arrays
from mmdiag.stages.base import StageResult

Ref = dict  # {"sha256": str, "meta": dict}


def path(folder: Path, sha: str) -> Path | None:
    """Where the result with this content hash lives (None for a name that is not a sha256)."""
    return Path(folder) / f"{sha}.safetensors" if isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha) else None


def save(folder: Path, result: StageResult, meta: dict | None = None) -> Ref:
    """Write a result under `folder/<sha256>.safetensors` and return its reference."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(v) for k, v in result.arrays.items()} or {"_": np.zeros(0)}
    # one metadata entry: safetensors writes several in a per-process random order, which would
    # change the hash of equal content
    header = {"content": json.dumps({"summary": result.summary, "details": result.details}, allow_nan=False, sort_keys=True)}
    blob = save_bytes(arrays, metadata=header)
    sha = hashlib.sha256(blob).hexdigest()
    atomic_write(path(folder, sha), lambda tmp: tmp.write_bytes(blob))
    return {"sha256": sha, "meta": {**(meta or {}), **({"timings": result.timings} if result.timings else {})}}


def with_timings(summary: dict, timings: dict) -> dict:
    """The summary with the timings merged in where they belong (nested dicts, key by key)."""
    out = dict(summary)
    for k, v in timings.items():
        out[k] = with_timings(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def content(ref: Ref) -> Ref:
    """The part of a reference that the next stage's result depends on."""
    return {"sha256": ref["sha256"]}


def load(ref: Ref, folder: Path) -> tuple[StageResult, dict]:
    """(result, meta) of a reference, after checking its content hash."""
    file = path(folder, ref["sha256"])
    if file is None or not file.is_file():
        raise MmdiagError(f"{file}: result file is missing; run the diagnosis again (it is recomputed)")
    if file_sha256(file) != ref["sha256"]:
        raise MmdiagError(f"{file}: result file does not match its hash (truncated or edited); run the diagnosis again (it is recomputed)")
    from safetensors import safe_open

    with safe_open(str(file), framework="numpy") as f:
        header = f.metadata()
    arrays = {k: v for k, v in read_arrays(file).items() if k != "_"}
    content = json.loads(header["content"])
    meta = ref.get("meta", {})
    timings = meta.get("timings", {})
    return StageResult(with_timings(content["summary"], timings), arrays, content["details"], timings), meta
