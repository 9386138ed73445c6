"""Where mmdiag keeps what it computes (no torch: the command line reads it before any import
of the heavy libraries)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mmdiag.pipeline.errors import MmdiagError


def cache_root(configured: Path | None = None) -> Path:
    """Where trained weights, stage results and cache keys live: the config's `cache`, else
    $MMDIAG_CACHE, else ~/.cache/mmdiag."""
    if configured is None:  # an empty MMDIAG_CACHE counts as unset, never as "here"
        configured = Path(os.environ.get("MMDIAG_CACHE") or Path.home() / ".cache" / "mmdiag")
    return Path(configured).expanduser().resolve()


def writable(folder: Path, field: str) -> None:
    """A folder the run can write into: an existing folder, or one that can be created in the
    nearest existing one. Tried with a nameless file there, not read from the permission bits,
    which say nothing for root, a read-only mount or /proc; nothing is created or left."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise MmdiagError(f"{field}: {folder} is a file, not a folder; give a folder")
    probe = folder
    while not probe.is_dir():
        if probe.is_symlink():  # a dangling link: mkdir would fail on it after the whole run
            raise MmdiagError(f"{field}: {probe} is a link to {os.readlink(probe)}, which is not a folder; create that folder or give another")
        if probe.exists():
            raise MmdiagError(f"{field}: cannot write to {folder}: {probe} is a file; give a folder you can write to")
        probe = probe.parent
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise MmdiagError(f"{field}: cannot write to {probe} ({e.strerror or e}); give a folder you can write to") from None
