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
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mmdiag.pipeline.errors import MmdiagError

MAX_SAMPLES = 10_000_000  # per split; beyond it, data must be streamed
MAX_NAME_BYTES = 200  # a run folder's name, leaving room in a 255-byte file name for staging


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
    # image units: about this many SLIC superpixels per image instead of the adapter's own
    # (pipeline.units.Segments); part of the model's cache key
    segments: int | None = Field(default=None, ge=2)

    @model_validator(mode="after")
    def _exactly_one(self):
        return _one_of(self, "model")


class DataSpec(_Strict):
    name: str | None = "shapes"
    factory: str | None = None
    split: str = "ood"
    splits: list[str] | None = None  # None: the built-in data's splits, or `split` alone for a factory
    n: int | None = Field(default=None, gt=0, le=MAX_SAMPLES)

    @model_validator(mode="before")
    @classmethod
    def _factory_replaces_builtin(cls, data: Any):
        if isinstance(data, dict) and data.get("factory") and "name" not in data:
            data = {**data, "name": None}
        return data

    @model_validator(mode="after")
    def _exactly_one(self):
        _one_of(self, "data")
        if self.splits is None:
            self.splits = ["iid", "ood", "anti"] if self.name is not None else [self.split]
        if self.split not in self.splits:
            self.splits = [*self.splits, self.split]
        return self


class RunnerSpec(_Strict):
    kind: Literal["local", "dask"] = "local"  # local: Prefect's thread pool; dask: a Dask cluster
    address: str | None = None  # a running Dask scheduler (tcp://host:8786); None starts a local cluster
    workers: int = Field(default=2, gt=0)  # worker processes of a local Dask cluster
    shards: int = Field(default=1, gt=0, le=1024)  # per-sample stages split into this many mapped tasks


class DiagConfig(_Strict):
    run: str = "diagnosis"
    model: ModelSpec
    data: DataSpec = Field(default_factory=DataSpec)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = Field(default=0, ge=0, lt=2**32)
    batch_size: int = Field(default=256, gt=0, le=1_000_000)
    out: Path = Path("runs")  # relative to the config file's folder
    cache: Path | None = None  # results, records and trained weights; default ~/.cache/mmdiag; relative to the config file
    stages: dict[str, dict[str, Any]] = Field(default_factory=dict)  # per-stage settings, by stage name
    plugins: list[str] = Field(default_factory=list)  # modules imported first (e.g. to register stages)
    runner: RunnerSpec = Field(default_factory=RunnerSpec)

    @field_validator("run")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not v or "/" in v or "\\" in v or v.startswith(".") or not v.isprintable():
            raise ValueError("must be a plain, printable folder name (no '/', no control characters, not starting with '.'); rename the run")
        if len(v.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
            raise ValueError(f"is {len(v.encode('utf-8', 'surrogatepass'))} bytes long; a run name may have at most {MAX_NAME_BYTES}; shorten it")
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("holds a lone surrogate character, which no file system can store; rename the run") from None
        return v


_RANGES = {"greater_than": "> {gt}", "greater_than_equal": ">= {ge}", "less_than": "< {lt}", "less_than_equal": "<= {le}"}


def field_error(err: dict, prefix: str = "") -> str:
    """One pydantic error as "field: what is wrong (got value); what to do"."""
    where = ".".join([*([prefix] if prefix else []), *map(str, err["loc"])]) or "config"
    kind, got = err["type"], err.get("input")
    shown = repr(got) if len(repr(got)) <= 60 else repr(got)[:57] + "..."
    if kind == "extra_forbidden":
        return f"{where}: unknown key; remove it or check its spelling"
    if kind == "missing":
        return f"{where}: required; add it"
    if kind in _RANGES:
        return f"{where}: must be {_RANGES[kind].format(**err['ctx'])} (got {shown}); set a value in range"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"{where}: must be a whole number (got {shown}); write it without quotes or decimals, e.g. 100000 rather than 1e5"
    if kind in ("float_parsing", "float_type"):
        return f"{where}: must be a number (got {shown}); write a number"
    if kind in ("bool_parsing", "bool_type"):
        return f"{where}: must be true or false (got {shown})"
    if kind == "literal_error":
        return f"{where}: must be {err['ctx']['expected']} (got {shown}); choose one of those"
    if kind in ("string_type", "list_type", "dict_type", "model_type", "model_attributes_type", "path_type"):
        wanted = {"string_type": "text", "list_type": "a list", "dict_type": "a mapping", "path_type": "a path"}.get(kind, "a mapping of keys")
        return f"{where}: must be {wanted} (got {shown}); fix its YAML"
    if kind == "too_short":
        return f"{where}: must not be empty; give at least one entry"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}" + ("" if kind == "value_error" else f" (got {shown}); fix this value")


def _first_error(e: ValidationError, source: str) -> MmdiagError:
    more = f" (and {len(e.errors()) - 1} more problems)" if len(e.errors()) > 1 else ""
    return MmdiagError(f"{source}: {field_error(e.errors()[0])}{more}")


def parse_config(data: Any, source: str = "config") -> DiagConfig:
    if not isinstance(data, dict):
        raise MmdiagError(f"{source}: expected a mapping of keys (run, model, data...), got {type(data).__name__}")
    try:
        return DiagConfig.model_validate(data)
    except ValidationError as e:
        raise _first_error(e, source) from None


class _UniqueKeys(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            repeated = key in seen
        except TypeError:  # an unhashable key: PyYAML's own error says so
            break
        if repeated:
            raise MmdiagError(f"{loader.name}: line {key_node.start_mark.line + 1}: key {key!r} is given twice; keep one")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_yaml(path: Path):
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise MmdiagError(f"{path}: not a text file (not UTF-8); give a YAML config") from None
    except OSError as e:
        raise MmdiagError(f"{path}: cannot be read ({e.strerror}); check its permissions") from None
    loader = None
    try:
        loader = _UniqueKeys(text)  # the reader refuses control characters here already
        loader.name = str(path)
        return loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise MmdiagError(f"{path}: not valid YAML{where}; fix the syntax") from None
    finally:
        if loader is not None:
            loader.dispose()


def load_config(path: str | Path) -> DiagConfig:
    """A config file; every relative path in it (out, cache, model.weights) is relative to the
    folder that holds the file, wherever the command runs."""
    path = Path(path)
    if path.is_dir():
        raise MmdiagError(f"--config: {path} is a folder; give the path of a YAML config file")
    if not path.is_file():
        raise MmdiagError(f"--config: no file at {path}; give the path of a YAML config")
    config = parse_config(read_yaml(path) or {}, source=str(path))
    here = path.resolve().parent
    config.out = here / config.out.expanduser()
    if config.cache is not None:
        config.cache = here / config.cache.expanduser()
    if config.model.weights is not None:
        config.model.weights = here / config.model.weights.expanduser()
    return config


def import_callable(ref: str, field: str) -> Callable:
    module_name, _, attr = ref.partition(":")
    if not attr or not module_name:
        raise MmdiagError(f"{field}: {ref!r} should look like 'package.module:callable'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise MmdiagError(f"{field}: cannot import {module_name!r} ({e}); check the module path") from None
    except SyntaxError as e:
        raise MmdiagError(f"{field}: {module_name!r} has a syntax error ({e.msg}, line {e.lineno}); fix the module") from None
    except Exception as e:  # the module's own code failed while it was imported
        raise MmdiagError(f"{field}: importing {module_name!r} raised {type(e).__name__}: {' '.join(str(e).split())}; fix the module") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise MmdiagError(f"{field}: {module_name!r} has no callable {attr!r}")
    return fn


def call_factory(ref: str, field: str, offered: dict[str, Any], required: tuple[str, ...] = ()) -> Any:
    """Call a user's factory with the keyword arguments its signature asks for (all of
    `offered` if it takes **kwargs; `required` always); its own errors become one line."""
    import inspect

    fn = import_callable(ref, field)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = dict(offered)
    else:
        kwargs = {k: v for k, v in offered.items() if k in params or k in required}
    try:
        return fn(**kwargs)
    except MmdiagError:
        raise
    except Exception as e:
        raise MmdiagError(f"{field}: {ref} raised {type(e).__name__}: {' '.join(str(e).split())}; fix the factory") from None
