"""The computation cache: which task, on which inputs and code, gave which result.

Layout of a cache folder (every reference inside it is relative, so the folder can be moved or
copied to another machine and is reused as it is):

    results/<sha256>.safetensors   stage results, named by the hash of their content
    records/<key>.json             one per computation: its task, the result's sha256, meta
    models/<name>.safetensors      trained weights, each with <name>.safetensors.sha256
    runs.json                      the run folders written with this cache (for `prune`): each by
                                   its absolute path and its path relative to the cache
    figures/<key>.txt              the report's charts already drawn (a memo)
    analyses/<key>.json            error analyses already made (a memo)
    prefect/                       Prefect's home (its database and logs)

Prefect's own result cache is not used: its records hold absolute paths (a moved cache fails),
they are pickled (whoever can write a shared cache runs code in every worker) and a damaged one
fails the task. Here a record is JSON, and a record or result that is missing, unreadable or
fails its hash is dropped with one warning line and the computation runs again.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, MutableMapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from mmdiag.flows import results
from mmdiag.pipeline.errors import MmdiagError
from mmdiag.pipeline.store import atomic_write, file_sha256, weights_damage

log = logging.getLogger("mmdiag")

RECORD_SCHEMA = "mmdiag.record/1"
KINDS = ("results", "records", "models", "figures", "analyses", "prefect")
MEMOS = {"figures": "*.txt", "analyses": "*.json"}  # kept while in use; a damaged entry is made again


def key(task: str, inputs: dict, code: str) -> str:
    """The computation's identity: task name, inputs (JSON, canonical order) and code version."""
    text = json.dumps({"task": task, "inputs": inputs, "code": code}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _record_path(cache: Path, k: str) -> Path:
    return cache / "records" / f"{k}.json"


def _drop(cache: Path, k: str, what: str, task: str) -> None:
    log.warning("cache: %s; %s is computed again", what, task)
    _record_path(cache, k).unlink(missing_ok=True)


def lookup(cache: Path, k: str, task: str) -> results.Ref | None:
    """The reference recorded for key `k`, after checking its result file; None on a miss. A
    damaged record is removed (one warning line) and counts as a miss; a damaged result file is
    left for the recomputation to replace atomically (another process may be doing so now)."""
    path = _record_path(cache, k)
    if not path.exists():
        return None
    record, problem = _read_record(path)
    problem = problem or result_damage(cache / "results", record["sha256"])
    if problem:
        _drop(cache, k, problem, task)
        return None
    try:
        os.utime(results.path(cache / "results", record["sha256"]))  # last use, for `prune --unused-since`
    except FileNotFoundError:  # pruned a moment ago
        return None
    except OSError:  # a read-only shared cache: the hit still counts
        pass
    return {"sha256": record["sha256"], "meta": record["meta"]}


def store(cache: Path, k: str, task: str, ref: results.Ref) -> None:
    record = {"schema": RECORD_SCHEMA, "task": task, "sha256": ref["sha256"], "meta": ref.get("meta", {}), "written": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    text = json.dumps(record, indent=1, allow_nan=False)
    atomic_write(_record_path(cache, k), lambda tmp: tmp.write_text(text + "\n"))


before_computing: list[Callable[[str], None]] = []  # told the task's name before a computation (mmdiag.flows.hosting.side_by_side)


def cached(cache: Path, task: str, inputs: dict, code: str, refresh: bool, compute: Callable[[], results.Ref]) -> tuple[results.Ref, bool]:
    """(reference, came from the cache): the recorded result of this computation, or `compute()`
    run and recorded (always run when `refresh`)."""
    k = key(task, inputs, code)
    if not refresh and (ref := lookup(cache, k, task)) is not None:
        return ref, True
    for hook in list(before_computing):
        hook(task)
    ref = compute()
    store(cache, k, task, ref)
    return ref, False


def _read_record(path: Path) -> tuple[dict | None, str | None]:
    """(record, None), or (None, what is wrong with it)."""
    try:
        record = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        return None, f"record {path.name} is unreadable ({type(e).__name__})"
    if not isinstance(record, dict) or record.get("schema") != RECORD_SCHEMA or not isinstance(record.get("sha256"), str) or not isinstance(record.get("meta"), dict):
        return None, f"record {path.name} is not an mmdiag record"
    return record, None


def record_damage(cache: Path, path: Path) -> str | None:
    """What is wrong with one record and the result it names, or None."""
    record, problem = _read_record(path)
    return problem or result_damage(cache / "results", record["sha256"])


def result_damage(folder: Path, sha: str) -> str | None:
    file = results.path(folder, sha)
    if file is None:
        return f"result name {sha[:16]!r} is not a sha256"
    if not file.is_file():
        return f"result {file.name} is missing"
    if file_sha256(file) != sha:
        return f"result {file.name} does not match its hash (truncated or edited)"
    return None


# `mmdiag cache`: info, verify, prune, clear


def _size(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
    return len(files), sum(p.stat().st_size for p in files)


def info(cache: Path) -> dict:
    kinds = {kind: dict(zip(("files", "bytes"), _size(cache / kind))) for kind in KINDS}
    total = dict(zip(("files", "bytes"), _size(cache)))
    kinds["other"] = {k: total[k] - sum(v[k] for v in kinds.values()) for k in total}  # runs.json, Dask scratch
    return {"cache": str(cache), "kinds": kinds, "total": total, "runs": len(known_runs(cache))}


def verify(cache: Path) -> list[str]:
    """Every damaged entry, one line each: records (and the results they name), results
    against their names, trained weights against their recorded hash."""
    damage = [record_damage(cache, p) for p in sorted((cache / "records").glob("*.json"))]
    damage += [result_damage(cache / "results", p.stem) for p in sorted((cache / "results").glob("*.safetensors"))]
    damage += [f"weights {p.name} {w}" for p in sorted((cache / "models").glob("*.safetensors")) if (w := weights_damage(p))]
    return list(dict.fromkeys(d for d in damage if d))


GRACE_S = 3600  # results written or used this recently are never pruned: a run may be using them


@contextmanager
def _runs_lock(cache: Path):
    """runs.json is read, changed and replaced by runs finishing and by `prune`: one at a time."""
    import fcntl

    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "runs.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def register_run(cache: Path, run_dir: Path) -> None:
    """Remember a run folder written with this cache (what `prune` keeps), by its absolute path
    and by its path relative to the cache (found again when both moved together)."""
    folder = Path(run_dir).resolve()
    entry = {"path": str(folder), "relative": os.path.relpath(folder, cache)}
    with _runs_lock(cache):
        runs = [r for r in _run_entries(cache) if r["path"] != entry["path"]]
        text = json.dumps(runs + [entry], indent=1)
        atomic_write(cache / "runs.json", lambda tmp: tmp.write_text(text + "\n"))


def _run_entries(cache: Path) -> list[dict]:
    try:
        runs = json.loads((cache / "runs.json").read_text())
    except (OSError, ValueError):
        return []
    return [r for r in runs if isinstance(r, dict) and isinstance(r.get("path"), str)] if isinstance(runs, list) else []


def known_runs(cache: Path) -> list[str]:
    """The run folders written with this cache that are still where they were (or, relative to
    the cache, where they moved with it)."""
    found = []
    for r in _run_entries(cache):
        for candidate in (cache / r.get("relative", ""), Path(r["path"])):
            if (candidate / "run.json").is_file():
                found.append(str(candidate.resolve()))
                break
    return found


def _referenced(cache: Path) -> set[str]:
    """The results that the run folders still on disk refer to (a sharded stage's parts too)."""
    shas = set()
    for folder in known_runs(cache):
        try:
            run = json.loads((Path(folder) / "run.json").read_text())
            for s in run["stages"].values():
                shas |= {x for x in [s.get("sha256"), *s.get("parts", [])] if isinstance(x, str)}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return shas


class FigureStore(MutableMapping):
    """The report's charts already drawn, {key: PNG data URI}, one file each under
    cache/figures (a memo: a damaged or missing one is drawn again)."""

    PREFIX = "data:image/png;base64,"

    def __init__(self, folder: Path):
        self.folder = folder

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.txt"

    def __getitem__(self, key: str) -> str:
        path = self._path(key)
        try:
            uri = path.read_text()
            if not uri.startswith(self.PREFIX) or not base64.b64decode(uri[len(self.PREFIX) :], validate=True).startswith(b"\x89PNG"):
                raise ValueError
        except (OSError, ValueError):
            raise KeyError(key) from None
        os.utime(path)  # last use, for `prune`
        return uri

    def __setitem__(self, key: str, uri: str) -> None:
        atomic_write(self._path(key), lambda tmp: tmp.write_text(uri))

    def __delitem__(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def __iter__(self):
        return (p.stem for p in self.folder.glob("*.txt"))

    def __len__(self) -> int:
        return sum(1 for _ in self)


def remembered_analysis(folder: Path, inputs: list, analyse: Callable[[], dict]) -> dict:
    """analyse(), or the analysis it gave before on the same inputs (JSON: the code version,
    the stage results' hashes, the data's fingerprint, the summary, the seed), from
    folder/<key>.json. A damaged entry is analysed again."""
    k = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
    path = folder / f"{k}.json"
    try:
        analysis = json.loads(path.read_text())
        if not isinstance(analysis, dict) or set(analysis) != {"errors", "suggestions"}:
            raise ValueError
        os.utime(path)  # last use, for `prune`
        return analysis
    except (OSError, ValueError):
        pass
    analysis = analyse()
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(analysis, separators=(",", ":"))))
    return analysis


def prune(cache: Path, unused_since: datetime | None = None) -> dict:
    """Remove results no run folder refers to (or, with `unused_since`, those not used since
    then) and the records naming them; results used within the last hour are always kept.
    Refused when run folders were recorded but none can be found (moved?): that would remove
    everything."""
    removed = {"results": 0, "records": 0, "bytes": 0}
    with _runs_lock(cache):
        if unused_since is None and _run_entries(cache) and not known_runs(cache):
            raise MmdiagError(
                f"cache prune: none of the {len(_run_entries(cache))} run folders written with {cache} can be found "
                "(moved?), so every result would go; nothing removed. Use --unused-since DATE, or `mmdiag cache clear`"
            )
        keep = _referenced(cache) if unused_since is None else None
        cutoff = time.time() - GRACE_S
        if unused_since is not None:
            cutoff = min(cutoff, unused_since.timestamp())
        gone = set()
        for path in sorted((cache / "results").glob("*.safetensors")):
            used = path.stat().st_mtime
            if used < cutoff and (keep is None or path.stem not in keep):
                removed["bytes"] += path.stat().st_size
                path.unlink()
                gone.add(path.stem)
                removed["results"] += 1
        for path in sorted((cache / "records").glob("*.json")):
            record, problem = _read_record(path)
            if problem or record["sha256"] in gone:
                path.unlink()
                removed["records"] += 1
        for kind, pattern in MEMOS.items():
            for path in sorted((cache / kind).glob(pattern)):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed[kind] = removed.get(kind, 0) + 1
    return removed


OURS = (*KINDS, "dask", "keys", "runs.json", "runs.lock")  # `keys`: Prefect's records, from before mmdiag kept its own


def clear(cache: Path, keep_models: bool = False) -> dict:
    """Remove what mmdiag keeps in the cache folder (but the trained weights with
    `keep_models`); a folder holding none of it is refused, nothing removed."""
    entries = [cache / name for name in OURS if (cache / name).exists() or (cache / name).is_symlink()]
    if not entries and cache.is_dir() and any(cache.iterdir()):
        raise MmdiagError(f"cache clear: {cache} does not look like an mmdiag cache (no results/, records/, models/ or prefect/); nothing removed")
    removed = {}
    for entry in entries:
        if keep_models and entry.name == "models":
            continue
        if entry.is_dir() and not entry.is_symlink():
            files, size = _size(entry)
            shutil.rmtree(entry)
        else:
            files, size = 1, entry.lstat().st_size
            entry.unlink()
        removed[entry.name] = {"files": files, "bytes": size}
    return removed
