"""The diagnosis config: YAML validated by pydantic, unknown keys rejected.

    run: film-ood            # run folder name under `out`
    model:
      name: demo-film        # a built-in model, or
      factory: mypkg.diag:build_adapter   # a callable returning a ModelAdapter
      weights: model.safetensors          # optional state dict loaded into adapter.module
    data:
      name: shapes           # built-in data, or
      factory: mypkg.diag:load_split      # a callable (split, n, seed) -> SampleSet
      split: ood             # the split the stages analyse
      splits: [iid, ood, anti]            # every split whose accuracy is reported
      n: null                # cap on samples per split
    device: auto             # auto | cpu | cuda
    seed: 0
    batch_size: 256
    out: runs
    cache: null              # default ~/.cache/mmdiag (or $MMDIAG_CACHE)
    stages: {}               # per-stage settings: {stage name: {setting: value}}
    plugins: []              # modules imported first, e.g. to register your own stages
    runner:                  # where tasks run
      kind: local            # local (threads) | dask (needs PREFECT_API_URL: a Prefect server)
      address: null          # a Dask scheduler to use; null starts a local cluster of `workers`
      workers: 2
      shards: 1              # split per-sample stages into this many mapped tasks
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import MmdiagError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _one_of(obj, what: str):
    if (obj.name is None) == (obj.factory is None):
        raise ValueError(f"give exactly one of {what}.name (a built-in) or {what}.factory (module:callable)")
    return obj


class ModelSpec(_Strict):
    name: str | None = None
    factory: str | None = None
    weights: Path | None = None

    @model_validator(mode="after")
    def _exactly_one(self):
        return _one_of(self, "model")


class DataSpec(_Strict):
    name: str | None = "shapes"
    factory: str | None = None
    split: str = "ood"
    splits: list[str] = Field(default_factory=lambda: ["iid", "ood", "anti"])
    n: int | None = Field(default=None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _factory_replaces_builtin(cls, data: Any):
        if isinstance(data, dict) and data.get("factory") and "name" not in data:
            data = {**data, "name": None}
        return data

    @model_validator(mode="after")
    def _exactly_one(self):
        if self.split not in self.splits:
            self.splits = [*self.splits, self.split]
        return _one_of(self, "data")


class RunnerSpec(_Strict):
    kind: Literal["local", "dask"] = "local"  # local: Prefect's thread pool; dask: a Dask cluster
    address: str | None = None  # a running Dask scheduler (tcp://host:8786); None starts a local cluster
    workers: int = Field(default=2, gt=0)  # worker processes of a local Dask cluster
    shards: int = Field(default=1, gt=0)  # per-sample stages split into this many mapped tasks


class DiagConfig(_Strict):
    run: str = "diagnosis"
    model: ModelSpec
    data: DataSpec = Field(default_factory=DataSpec)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    batch_size: int = Field(default=256, gt=0)
    out: Path = Path("runs")
    cache: Path | None = None  # results, Prefect cache keys and trained weights; default ~/.cache/mmdiag
    stages: dict[str, dict[str, Any]] = Field(default_factory=dict)  # per-stage settings, by stage name
    plugins: list[str] = Field(default_factory=list)  # modules imported first (e.g. to register stages)
    runner: RunnerSpec = Field(default_factory=RunnerSpec)

    @field_validator("run")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError("must be a plain folder name (no '/', not starting with '.')")
        return v


def _first_error(e: ValidationError, source: str) -> MmdiagError:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "config"
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        msg = "unknown key; remove it or check its spelling"
    elif kind == "missing":
        msg = "required; add it"
    else:
        msg = msg.removeprefix("Value error, ")
        if "input" in err and kind not in ("value_error", "assertion_error"):
            msg = f"{msg} (got {err['input']!r})"
    more = f" (and {len(e.errors()) - 1} more problems)" if len(e.errors()) > 1 else ""
    return MmdiagError(f"{source}: {where}: {msg}{more}")


def parse_config(data: Any, source: str = "config") -> DiagConfig:
    if not isinstance(data, dict):
        raise MmdiagError(f"{source}: expected a mapping of keys (run, model, data...), got {type(data).__name__}")
    try:
        return DiagConfig.model_validate(data)
    except ValidationError as e:
        raise _first_error(e, source) from None


def load_config(path: str | Path) -> DiagConfig:
    path = Path(path)
    if not path.is_file():
        raise MmdiagError(f"--config: no file at {path}; give the path of a YAML config")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise MmdiagError(f"{path}: not valid YAML{where}; fix the syntax") from None
    config = parse_config(data or {}, source=str(path))
    if config.model.weights is not None and not config.model.weights.is_absolute():
        config.model.weights = path.parent / config.model.weights
    return config


def import_callable(ref: str, field: str) -> Callable:
    module_name, _, attr = ref.partition(":")
    if not attr:
        raise MmdiagError(f"{field}: {ref!r} should look like 'package.module:callable'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise MmdiagError(f"{field}: cannot import {module_name!r} ({e}); check the module path") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise MmdiagError(f"{field}: {module_name!r} has no callable {attr!r}")
    return fn
