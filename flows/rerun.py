"""`mmdiag rerun` and `mmdiag compare`: recompute one stage of a finished run, and say what moved."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mmdiag.pipeline.config import DiagConfig, field_error
from mmdiag.pipeline.errors import MmdiagError
from mmdiag.pipeline.store import SUMMARY_SCHEMA, read_json

# not "rerun the stage": `mmdiag rerun` itself needs a readable run.json
DAMAGED = "the file is damaged or not a run folder's; give a folder written by `mmdiag diagnose`, or run that again"


def load_run(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MmdiagError(f"RUN_DIR: no run folder at {run_dir}; give a folder written by `mmdiag diagnose` or `mmdiag demo`")
    run = read_json(run_dir / "run.json", DAMAGED)
    if not isinstance(run, dict) or not isinstance(run.get("config"), dict):
        raise MmdiagError(f"{run_dir}/run.json: not an mmdiag run record (no config); give a folder written by `mmdiag diagnose`, or run it again")
    return run


def load_summary(run_dir: Path) -> dict:
    summary = read_json(Path(run_dir) / "summary.json", DAMAGED)
    if not isinstance(summary, dict) or summary.get("schema") != SUMMARY_SCHEMA:
        found = summary.get("schema") if isinstance(summary, dict) else type(summary).__name__
        raise MmdiagError(f"{run_dir}/summary.json: not an {SUMMARY_SCHEMA} summary (found {found!r}); run `mmdiag diagnose` again for this run")
    model = summary.get("model")
    if not isinstance(summary.get("stages"), dict) or not isinstance(model, dict) or not {"fingerprint", "accuracy"} <= set(model):
        raise MmdiagError(f"{run_dir}/summary.json: its model or stages block is missing or damaged; run `mmdiag diagnose` again for this run")
    return summary


def parse_sets(stage: str, pairs: list[str]) -> dict[str, Any]:
    """`--set key=value` pairs, values read as YAML scalars (3, 0.5, true, [a, b]); each key
    must be a setting of that stage."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise MmdiagError(f"--set: {pair!r} should look like key=value")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise MmdiagError(f"--set: the value of {key!r} ({value!r}) is not YAML; quote text, write lists as [a, b]") from None
    return checked_settings(stage, out)


def checked_settings(stage: str, changes: dict[str, Any]) -> dict[str, Any]:
    """`changes` to a stage's settings, each key a setting of that stage."""
    from mmdiag.stages import registry

    fields = registry.get(stage).config.model_fields
    for key in changes:
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise MmdiagError(f"--set: stage {stage!r} has no setting {key!r}; its settings are: {known}")
    return dict(changes)


def rerun_config(run_dir: Path, stage: str, sets: list[str] | dict[str, Any]) -> DiagConfig:
    """The run's config with `stage`'s settings changed (`--set key=value` pairs, or a mapping)."""
    run = load_run(run_dir)
    try:
        config = DiagConfig.model_validate(run["config"])
    except (ValidationError, KeyError):
        raise MmdiagError(f"{run_dir}/run.json: its config is not readable by this version; run `mmdiag diagnose` again") from None
    from mmdiag.stages import registry

    registry.load_plugins(config.plugins)
    run_dir = Path(run_dir).absolute()  # `rerun .` names the folder by its own name
    place = {"out": run_dir.parent, "run": run_dir.name}
    if stage == "model":  # the evaluation: no settings of its own; readers recompute if it changed
        if sets:
            raise MmdiagError("--set: the model evaluation has no settings; set batch_size or device in the config instead")
        return _validated(config, place, run_dir)
    registry.get(stage)
    stages = dict(config.stages)
    changes = parse_sets(stage, sets) if isinstance(sets, list) else checked_settings(stage, sets)
    stages[stage] = {**stages.get(stage, {}), **changes}
    return _validated(config, {"stages": stages, **place}, run_dir)


def _validated(config: DiagConfig, update: dict, run_dir: Path) -> DiagConfig:
    try:
        return DiagConfig.model_validate({**config.model_dump(), **update})
    except ValidationError as e:
        raise MmdiagError(f"{run_dir}: {field_error(e.errors()[0])}") from None


def _leaves(obj: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a summary, by dotted path (list items by index or by `where`/`id`)."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            name = v.get("where") or v.get("id") or i if isinstance(v, dict) else i
            out.update(_leaves(v, f"{prefix}[{name}]"))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix] = float(obj)
    return out


IGNORED = ("stages.", "run.")  # timings and provenance move every run; they are not findings


def compare(run_a: Path, run_b: Path, tolerance: float = 1e-9) -> dict:
    """What changed from run A to run B: accuracy, per-slice accuracy, every figure that moved."""
    load_run(run_a), load_run(run_b)
    return compare_summaries(load_summary(run_a), load_summary(run_b), str(run_a), str(run_b), tolerance)


def compare_summaries(a: dict, b: dict, name_a: str = "a", name_b: str = "b", tolerance: float = 1e-9) -> dict:
    """`compare` of two summaries in memory."""
    la, lb = _leaves(a), _leaves(b)
    moved = [
        {"figure": k, "a": la.get(k), "b": lb.get(k), "change": (lb[k] - la[k]) if k in la and k in lb else None}
        for k in sorted(set(la) | set(lb))
        if not k.startswith(IGNORED) and (k not in la or k not in lb or abs(lb[k] - la[k]) > tolerance)
    ]
    slices_a = {s["where"]: s for s in a["model"].get("slices", [])}
    slices_b = {s["where"]: s for s in b["model"].get("slices", [])}
    return {
        "a": name_a,
        "b": name_b,
        "model": {"a": a["model"]["fingerprint"], "b": b["model"]["fingerprint"], "same": a["model"]["fingerprint"] == b["model"]["fingerprint"]},
        "accuracy": {"a": a["model"]["accuracy"], "b": b["model"]["accuracy"], "change": round(b["model"]["accuracy"] - a["model"]["accuracy"], 4)},
        "splits": {s: {"a": a["model"]["splits"].get(s, {}).get("accuracy"), "b": v["accuracy"]} for s, v in b["model"].get("splits", {}).items()},
        "slices": [{"where": w, "a": slices_a[w]["accuracy"], "b": slices_b[w]["accuracy"], "change": round(slices_b[w]["accuracy"] - slices_a[w]["accuracy"], 4)} for w in slices_b if w in slices_a],
        "moved": moved,
    }


def print_comparison(diff: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    same = "same model" if diff["model"]["same"] else f"model {diff['model']['a']} -> {diff['model']['b']}"
    console.print(f"[bold]{diff['a']}[/] -> [bold]{diff['b']}[/] ({same})")
    acc = diff["accuracy"]
    console.print(f"accuracy {acc['a']:.4f} -> {acc['b']:.4f} ({acc['change']:+.4f})")
    table = Table(title="accuracy per split and slice")
    for col in ("where", "a", "b", "change"):
        table.add_column(col)
    for s, v in diff["splits"].items():
        change = "" if v["a"] is None else f"{v['b'] - v['a']:+.4f}"
        table.add_row(f"split {s}", f"{v['a']}", f"{v['b']}", change)
    for s in diff["slices"]:
        table.add_row(s["where"], f"{s['a']:.4f}", f"{s['b']:.4f}", f"{s['change']:+.4f}")
    console.print(table)
    console.print(f"{len(diff['moved'])} summary figures moved")
    for m in diff["moved"]:
        console.print(f"  {m['figure']}: {m['a']} -> {m['b']}")
