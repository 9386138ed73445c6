"""The Python API: `diagnose(model, data, **settings) -> Diagnosis`.

The same flow as `mmdiag diagnose`, with the same cache and the same keys: a notebook run and a
command-line run of the same model and data share their cached stages. `model` and `data` are
what a config's `model:` and `data:` take (a built-in name, a factory reference, a mapping), or
objects of this process (an adapter, a sample set); every other setting is a config key
(`stages=`, `seed=`, `device=`, `out=`, `run=`, ...).

An object of this process reaches the flow's tasks as a factory of this module named by the
object's content (`mmdiag.flows.diagnosis:model_<fingerprint>`), so the same weights or samples
give the same cache keys in any session. Prefect's temporary server starts with the first call
and stops when the Python process ends, as the command line's does (Prefect's event client in
this process keeps the server's address: a server stopped under a live kernel would leave it
retrying).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmdiag.pipeline.errors import MmdiagError

_HELD: dict[str, Callable] = {}  # factories of this process's objects, by the name a config gives them


def __getattr__(name: str) -> Callable:
    try:
        return _HELD[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r} (an object held by another Python process?)") from None


def _model_spec(model: Any) -> dict:
    from mmdiag.pipeline.adapter import ModelAdapter, setup
    from mmdiag.pipeline.store import fingerprint_module

    if isinstance(model, ModelAdapter):  # named by its weights and its settings (answers, prompt, units...)
        name = f"model_{fingerprint_module(model.module)}_{setup(model)[:16]}"
        _HELD[name] = lambda: model
        return {"factory": f"{__name__}:{name}"}
    if isinstance(model, str):
        return {"factory": model} if ":" in model else {"name": model}
    if isinstance(model, dict):
        return model
    raise MmdiagError(f"model: got {type(model).__name__}; give a ModelAdapter, a built-in model's name, a factory 'package.module:callable' or a config's model mapping")


def _data_spec(data: Any, model: dict) -> dict:
    from mmdiag.pipeline.data import SampleSet

    if data is None:
        from mmdiag.pipeline.demo.catalog import MODELS, data_for

        if model.get("name") in MODELS:
            return {"name": data_for(model["name"])}
        raise MmdiagError("data: give the data to analyse (a SampleSet, a streamed source or a config's data mapping)")
    if isinstance(data, SampleSet):  # streamed sources are sample sets too
        name = f"data_{data.fingerprint()}"
        _HELD[name] = lambda split, n, seed: data
        return {"factory": f"{__name__}:{name}", "split": "data", "splits": ["data"]}
    if isinstance(data, str):
        return {"factory": data} if ":" in data else {"name": data}
    if isinstance(data, dict):
        return data
    raise MmdiagError(f"data: got {type(data).__name__}; give a SampleSet, a streamed source or a config's data mapping")


def config_for(model: Any, data: Any = None, **settings):
    """The DiagConfig a `diagnose` call runs (checked as a config file is)."""
    from mmdiag.pipeline.config import parse_config

    spec = _model_spec(model)
    config = parse_config({"model": spec, "data": _data_spec(data, spec), **settings}, source="diagnose()")
    if config.runner.kind == "dask" and any(s.get("factory", "").startswith(f"{__name__}:") for s in (config.model.model_dump(), config.data.model_dump())):
        raise MmdiagError("runner.kind: dask runs tasks in other processes, which cannot see an object of this one; name the model and data by a factory 'package.module:callable' instead")
    return config


def _run(config, **flags) -> Diagnosis:
    import logging

    from mmdiag.flows import logs
    from mmdiag.flows.flow import run

    if not logging.getLogger("mmdiag").handlers:
        logs.setup()
    return Diagnosis.load(run(config, **flags))


def diagnose(model: Any, data: Any = None, **settings) -> Diagnosis:
    """Diagnose `model` on `data`; the run folder is written as `mmdiag diagnose` writes it
    (`out`/`run`, by default ./runs/diagnosis).

    `model`: a `ModelAdapter`, a built-in model's name (`"demo-late"`), a factory reference
    (`"mypkg.diag:build"`) or a config's model mapping. `data`: a `SampleSet` or streamed
    source, a config's data mapping (`{"name": "shapes", "split": "ood", "n": 400}`), or
    nothing for a built-in model (its own data). `settings`: the config's other keys.
    """
    return _run(config_for(model, data, **settings))


@dataclass
class Diagnosis:
    """One run: its summary, suggestions and error cards in memory, the run folder on disk."""

    path: Path
    summary: dict
    config: Any  # the run's DiagConfig
    _errors: list | None = field(default=None, repr=False)

    @classmethod
    def load(cls, path: str | Path) -> Diagnosis:
        """A run folder written by `mmdiag diagnose`, `mmdiag demo` or `diagnose()`."""
        from mmdiag.flows.rerun import load_run, load_summary
        from mmdiag.pipeline.config import DiagConfig

        path = Path(path)
        return cls(path, load_summary(path), DiagConfig.model_validate(load_run(path)["config"]))

    def __repr__(self) -> str:
        top = self.suggestions[0]["title"] if self.suggestions else "no suggestion"
        return f"Diagnosis({str(self.path)!r}, accuracy={self.summary['model']['accuracy']}, errors={self.summary['model'].get('n_errors')}, top: {top})"

    @property
    def suggestions(self) -> list[dict]:
        """The ranked debugging suggestions, most important first."""
        return self.summary.get("suggestions") or []

    @property
    def errors(self) -> list[dict]:
        """One evidence card per error (errors.json)."""
        if self._errors is None:
            from mmdiag.pipeline.store import read_json

            self._errors = read_json(self.path / "errors.json")["cards"]
        return self._errors

    def stage(self, name: str):
        """A stage's result as the run folder keeps it: a StageResult (summary, arrays, details)."""
        from mmdiag.pipeline.store import read_arrays, read_json
        from mmdiag.stages.base import StageResult

        folder = self.path / "stages" / name
        if not folder.is_dir():
            raise MmdiagError(f"stage: this run has no stage {name!r}; it has {', '.join(sorted(p.name for p in (self.path / 'stages').iterdir()))}")
        kept = read_json(folder / "result.json")
        arrays = read_arrays(folder / "arrays.safetensors") if (folder / "arrays.safetensors").is_file() else {}
        return StageResult(kept["summary"], arrays, kept.get("details") or {})

    @property
    def stages(self) -> dict:
        """Every stage's result, by stage name (the model evaluation as `model`)."""
        return {p.name: self.stage(p.name) for p in sorted((self.path / "stages").iterdir()) if p.is_dir()}

    def report(self, path: str | Path | None = None) -> Path:
        """The HTML report: the run folder's, or a copy written to `path`."""
        if path is None:
            return self.path / "report.html"
        from mmdiag.pipeline.store import write_text

        return write_text(Path(path), (self.path / "report.html").read_text())

    def save(self, folder: str | Path) -> Diagnosis:
        """A copy of the run folder at `folder` (what the command line writes)."""
        folder = Path(folder)
        if folder.exists():
            raise MmdiagError(f"save: {folder} exists; give a new folder")
        shutil.copytree(self.path, folder)
        return Diagnosis.load(folder)

    def rerun(self, stage: str, run: str | None = None, **changes) -> Diagnosis:
        """This run with `stage` recomputed (its settings changed by `changes`), as `mmdiag
        rerun` does, into a new run folder (`run`, by default `<run>-<stage>`) beside this one,
        so that this object and its folder keep what they showed."""
        from mmdiag.flows.rerun import rerun_config

        config = rerun_config(self.path, stage, changes).model_copy(update={"run": run or f"{self.path.name}-{stage}"})
        return _run(config, refresh=(stage,))

    def compare(self, other: Diagnosis) -> dict:
        """What changed from this run to `other` (`mmdiag compare`'s figures)."""
        from mmdiag.flows.rerun import compare_summaries

        return compare_summaries(self.summary, other.summary, str(self.path), str(other.path))

    def _repr_html_(self) -> str:
        from mmdiag.reports import render_inline

        return render_inline(self.summary, str(self.path / "report.html"))
