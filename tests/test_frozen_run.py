"""Behaviour does not change under refactoring: a whole diagnosis of an untrained model (no
training, so the same on every run) gives the summary.json kept from before the code moved
into the `mmdiag` package, figure by figure (timings, dates and cache keys aside). Changed on
purpose since, and rewritten then: a found transform's null is six random draws, not one (its
null figures and the forward passes); each modality's readout figures (`readout_gain`,
`model_gain`, `unused`, `beyond_answer`) added; the per-error `interaction` cause read from
the additive part's answer, not a fixed 10% share (47 errors, not 8; undetermined 11, not 50); the composition association against random
features, not a fixed 25% push (1 association-only card, not 11); discovery's priors
(`priors`, `slices_tested`: none found; 4 more model inputs per sample; a `prior` count of 0
among the error causes)."""

import json
import math
from pathlib import Path

import yaml

from mmdiag.flows.cli import main

import frozen_run

KEPT = Path(__file__).parent / "data" / "frozen-summary.json"
VARIES = {"seconds", "created", "key"}  # a cache key hashes the stage's code, which refactoring changes


def differences(kept, now, path="") -> list[str]:
    if isinstance(kept, dict) and isinstance(now, dict):
        out = [f"{path}/{k}: only in one" for k in set(kept) ^ set(now) if k not in VARIES]
        return out + [d for k in set(kept) & set(now) - VARIES for d in differences(kept[k], now[k], f"{path}/{k}")]
    if isinstance(kept, list) and isinstance(now, list):
        if len(kept) != len(now):
            return [f"{path}: {len(kept)} items, now {len(now)}"]
        return [d for i, (a, b) in enumerate(zip(kept, now)) for d in differences(a, b, f"{path}[{i}]")]
    if isinstance(kept, float) and isinstance(now, (int, float)):
        # summary figures are rounded to 4 digits: a last-digit change across thread counts
        return [] if math.isclose(kept, now, rel_tol=1e-2, abs_tol=2e-3) else [f"{path}: {kept} -> {now}"]
    return [] if kept == now else [f"{path}: {kept!r} -> {now!r}"]


def test_a_run_gives_the_summary_kept_from_before_the_move(tmp_path, cache):
    config = tmp_path / "frozen.yaml"
    config.write_text(yaml.safe_dump(frozen_run.config(tmp_path / "runs", tmp_path / "cache")))
    assert main(["diagnose", "--config", str(config)]) == 0
    now = json.loads((tmp_path / "runs" / "frozen" / "summary.json").read_text())
    assert differences(json.loads(KEPT.read_text()), now) == []


def test_the_comparison_sees_a_changed_figure():
    kept = {"a": {"b": [0.5, "x"], "seconds": 1.0}}
    assert differences(kept, {"a": {"b": [0.5004, "x"], "seconds": 9.0}}) == []
    assert differences(kept, {"a": {"b": [0.6, "x"]}}) == ["/a/b[0]: 0.5 -> 0.6"]
    assert differences(kept, {"a": {"b": [0.5, "y"]}}) == ["/a/b[1]: 'x' -> 'y'"]
