"""The run store: the only code that writes a run folder.

Every file is written to a temporary name and renamed into place, so a crash never leaves a
half-written result; a run folder is built beside its final place and swapped in when complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch
from torch import nn

from mmdiag.pipeline.errors import MmdiagError
from mmdiag.pipeline.paths import cache_root  # noqa: F401  (re-exported: the stages' and flows' import)

SUMMARY_SCHEMA = "mmdiag.summary/1"

log = logging.getLogger("mmdiag")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` and rename tmp onto `path`; on any failure nothing appears at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_writer()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: Path, text: str) -> Path:
    """UTF-8 text, atomically; a lone surrogate (from a caption, say) becomes U+FFFD instead of
    failing the write."""
    clean = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")  # pairs joined, lone ones -> U+FFFD
    return atomic_write(path, lambda tmp: tmp.write_text(clean, encoding="utf-8"))


def write_json(path: Path, obj: Any, compact: bool = False) -> Path:
    """JSON, atomically; indented for people, or `compact` for large files read by programs."""
    layout = {"separators": (",", ":")} if compact else {"indent": 2}
    text = json.dumps(obj, sort_keys=False, allow_nan=False, default=_jsonable, **layout)
    return atomic_write(path, lambda tmp: tmp.write_text(text + "\n"))


def read_json(path: Path, fix: str = "the file is damaged, rerun the stage") -> Any:
    """JSON from a file; a missing file, or one that is not UTF-8 JSON, is one line naming it
    (and `fix`)."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise MmdiagError(f"{path}: file not found; check the run folder") from None
    except UnicodeDecodeError as e:
        raise MmdiagError(f"{path}: not valid JSON (not UTF-8 text: byte 0x{e.object[e.start]:02x} at offset {e.start}); {fix}") from None
    except json.JSONDecodeError as e:
        raise MmdiagError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); {fix}") from None


def write_arrays(path: Path, arrays: Mapping[str, Any]) -> Path:
    """Named arrays as safetensors (never pickle: a run folder must be safe to open)."""
    data = {k: np.ascontiguousarray(v.detach().cpu().numpy() if torch.is_tensor(v) else np.asarray(v)) for k, v in arrays.items()}
    return atomic_write(path, lambda tmp: save_file(data, str(tmp)))


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise MmdiagError(f"{path}: file not found; check the run folder") from None
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise MmdiagError(f"{path}: damaged array file ({e}); rerun the stage") from None


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if torch.is_tensor(obj):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


class ContentHash:
    """`fingerprint_tensors` fed a block of rows at a time: a data set streamed from disk gets
    the same fingerprint as the same data held in memory."""

    def __init__(self):
        self._parts: dict[str, tuple] = {}  # name -> (sha256 of the bytes, dtype, rows, row shape)

    def update(self, name: str, rows: torch.Tensor) -> None:
        rows = rows.detach().cpu().contiguous()
        h, dtype, n, shape = self._parts.get(name) or (hashlib.sha256(), rows.dtype, 0, tuple(rows.shape[1:]))
        if (rows.dtype, tuple(rows.shape[1:])) != (dtype, shape):
            raise ValueError(f"{name}: rows of {rows.dtype} {tuple(rows.shape[1:])} after rows of {dtype} {shape}")
        h.update(rows.reshape(-1).view(torch.uint8).numpy().tobytes())
        self._parts[name] = (h, dtype, n + len(rows), shape)

    def hexdigest(self) -> str:
        h = hashlib.sha256()
        for name, (part, dtype, n, shape) in sorted(self._parts.items()):
            h.update(f"{name}:{dtype}:{(n, *shape)}:{part.hexdigest()};".encode())
        return h.hexdigest()[:16]


def fingerprint_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    """Content hash of named tensors (names, dtypes, shapes and every byte)."""
    h = ContentHash()
    for name, t in tensors.items():
        h.update(name, t.reshape(1, *t.shape) if t.dim() == 0 else t)
    return h.hexdigest()


def fingerprint_module(module: nn.Module) -> str:
    """Content hash of a model's weights and buffers: one changed value changes it."""
    return fingerprint_tensors(module.state_dict())


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_weights(path: Path, state: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Trained weights for the cache, with their hash beside them (`<file>.sha256`)."""
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_torch(state, str(tmp), metadata=metadata))
    digest = file_sha256(path)
    atomic_write(_hash_file(path), lambda tmp: tmp.write_text(digest + "\n"))


def _hash_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def weights_damage(path: Path) -> str | None:
    """What is wrong with cached weights: content that fails the recorded hash, or (weights
    written before hashes were recorded) a file that does not parse."""
    try:
        expected = _hash_file(path).read_text().strip()
    except OSError:
        try:
            load_torch(str(path))
            return None
        except Exception as e:  # safetensors' own error types
            return f"are unreadable ({e})"
    return None if file_sha256(path) == expected else "do not match their recorded hash (truncated or edited)"


def load_weights(path: Path) -> dict[str, torch.Tensor] | None:
    """Cached weights, or None when there are none; damaged ones are removed with one warning
    line (the caller trains again)."""
    if not path.exists():
        return None
    problem = weights_damage(path)
    if problem is None:
        try:
            state = load_torch(str(path))
            if not _hash_file(path).exists():
                digest = file_sha256(path)
                atomic_write(_hash_file(path), lambda tmp: tmp.write_text(digest + "\n"))
            return state
        except Exception as e:  # safetensors' own error types
            problem = f"are unreadable ({e})"
    log.warning("cache: trained weights %s %s; they are trained again", path.name, problem)
    path.unlink(missing_ok=True)
    _hash_file(path).unlink(missing_ok=True)
    return None


class RunStore:
    """One run folder: run.json, summary.json, stages/STAGE/, graphs/, report.html."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def write_json(self, rel: str, obj: Any, compact: bool = False) -> Path:
        return write_json(self.path(rel), obj, compact)

    def read_json(self, rel: str) -> Any:
        return read_json(self.path(rel))

    def write_arrays(self, rel: str, arrays: Mapping[str, Any]) -> Path:
        return write_arrays(self.path(rel), arrays)

    def read_arrays(self, rel: str) -> dict[str, np.ndarray]:
        return read_arrays(self.path(rel))


_STALE = re.compile(r"^\.(.*)\.([A-Za-z0-9-]+)-(\d+)\.[^./]+\.(partial|old|tmp)$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def _writer() -> str:
    """Who writes a temporary file or folder: host and pid (a shared folder has writers on
    other machines, whose pids mean nothing here)."""
    return f"{_host()}-{os.getpid()}"


def clean_stale(folder: Path) -> list[Path]:
    """Remove the staging folders and temporary files that a killed process of this host left
    in `folder` (their names carry host and pid; those of live processes, and of other hosts,
    are left alone). A previous run folder set aside just before a kill (`.old`) is put back
    when the new one never arrived."""
    removed = []
    for entry in Path(folder).iterdir() if Path(folder).is_dir() else []:
        match = _STALE.match(entry.name)
        if not match or match.group(2) != _host() or _pid_alive(int(match.group(3))):
            continue
        kept = entry / match.group(1)
        if match.group(4) == "old" and kept.is_dir() and not (Path(folder) / match.group(1)).exists():
            os.replace(kept, Path(folder) / match.group(1))
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextmanager
def new_run(out: Path, name: str) -> Iterator[RunStore]:
    """Build a run folder beside its final place and swap it in only when the block succeeds:
    a failed or interrupted run leaves the previous folder (or none) untouched. A run folder that
    is a symbolic link is written where it points (the link stays a link)."""
    out = Path(out)
    final = out / name
    if final.is_symlink():
        final = final.resolve()
        out, name = final.parent, final.name
    out.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.{_writer()}.", suffix=".partial", dir=out))
    os.chmod(staging, 0o777 & ~_umask())
    try:
        yield RunStore(staging)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{name}.{_writer()}.", suffix=".old", dir=out))
            os.replace(final, old / name)
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
