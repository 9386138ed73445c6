"""Benchmark: label mistakes by confident learning (reports/label_issues.py) against cleanlab's
`find_label_issues` (the reference, installed by the bench extra: AGPL-3.0, so never a
dependency of mmdiag) on planted label noise: the same flags, precision and recall, time."""

from __future__ import annotations

import time

import numpy as np


def planted(n: int, k: int, rate: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probabilities of a decent model, given labels with `rate` flipped to another class, which)."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k)) + 3.0 * np.eye(k)[true]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    given = np.where(rng.random(n) < rate, (true + rng.integers(1, k, n)) % k, true)
    return probs, given, given != true


def _share(hits: np.ndarray, of: np.ndarray) -> float | None:
    return round(float(hits.sum() / of.sum()), 4) if of.any() else None


def bench_rows() -> list[dict]:
    """On the CPU: the computation is numpy, whatever the device."""
    from mmdiag.reports import label_issues as li

    rows = []
    for n, k in ((2000, 2), (20000, 10)):
        probs, given, wrong = planted(n, k, 0.1)
        start = time.perf_counter()
        ours = li.find(probs, given)
        secs = time.perf_counter() - start
        extra = {"precision": _share(ours & wrong, ours), "recall": _share(ours & wrong, wrong)}
        try:
            from cleanlab.filter import find_label_issues
        except ImportError:
            extra["cleanlab"] = "not installed (pip install -e '.[bench]')"
        else:
            start = time.perf_counter()
            theirs = find_label_issues(given, probs)
            extra.update(
                cleanlab_s=round(time.perf_counter() - start, 4),
                same_flags=round(float((ours == theirs).mean()), 5),
                cleanlab_precision=_share(theirs & wrong, theirs),
                cleanlab_recall=_share(theirs & wrong, wrong),
            )
        rows.append({"benchmark": f"label mistakes by confident learning, {n:,} samples x {k} classes, 10% flipped: ours vs cleanlab", "value": round(secs, 4), "unit": "s", "device": "cpu", **extra})
    return rows
