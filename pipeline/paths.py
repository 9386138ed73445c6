"""Where mmdiag keeps what it computes (no torch: the command line reads it before any import
of the heavy libraries)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(configured: Path | None = None) -> Path:
    """Where trained weights, stage results and cache keys live: the config's `cache`, else
    $MMDIAG_CACHE, else ~/.cache/mmdiag."""
    if configured is None:  # an empty MMDIAG_CACHE counts as unset, never as "here"
        configured = Path(os.environ.get("MMDIAG_CACHE") or Path.home() / ".cache" / "mmdiag")
    return Path(configured).expanduser().resolve()
