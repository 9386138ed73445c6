"""The run plan: what the pre-flight resolves once (plugins loaded, every stage's settings
validated, the cache folder, the device, the data of every split), read by the flow and its tasks
so that nothing is resolved twice."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from mmdiag.pipeline.config import DiagConfig, field_error
from mmdiag.pipeline.errors import MmdiagError
from mmdiag.pipeline.paths import cache_root
from mmdiag.stages import registry


class RunPlan(BaseModel):
    """A config resolved: `settings` holds every registered stage's validated settings (JSON,
    defaults filled in), `device` the device the tasks use, `data` each split's reference
    (flows.tasks.data_ref, with its fingerprint and size)."""

    model_config = ConfigDict(frozen=True)

    config: DiagConfig
    cache: Path
    device: Literal["cpu", "cuda"]
    settings: dict[str, dict[str, Any]]
    data: dict[str, dict[str, Any]] = {}

    @property
    def analysed(self) -> dict[str, Any]:
        """The reference of the split the stages analyse."""
        return self.data[self.config.data.split]


def resolve(config: DiagConfig) -> RunPlan:
    """The plan of a config, before its data is read: plugins loaded, stage settings validated,
    cache folder and device resolved."""
    from mmdiag.pipeline.device import resolve_device

    registry.load_plugins(config.plugins)
    settings = stage_settings(config)
    return RunPlan(config=config, cache=cache_root(config.cache), device=resolve_device(config.device).type, settings=settings)


MAX_SETTING = 10_000_000  # a stage's counts (steps, samples, pairs...): beyond it a run would never end


def stage_settings(config: DiagConfig) -> dict[str, dict[str, Any]]:
    """Every registered stage's settings, validated by its own config class."""
    known = {s.name: s for s in registry.stages()}
    for name in config.stages:
        if name not in known:
            raise MmdiagError(f"stages.{name}: unknown stage; the stages are: {', '.join(known) or 'none registered yet'}")
    out = {}
    for name, stage in known.items():
        given = config.stages.get(name, {})
        if not isinstance(given, dict):
            raise MmdiagError(f"stages.{name}: must be a mapping of settings (got {given!r}); write {{setting: value}}")
        try:
            out[name] = stage.config.model_validate(given).model_dump(mode="json")
        except ValidationError as e:
            line = field_error(e.errors()[0], prefix=f"stages.{name}")
            if e.errors()[0]["type"] == "extra_forbidden":
                line += f" (its settings: {', '.join(stage.config.model_fields)})"
            raise MmdiagError(line) from None
        for key, value in out[name].items():
            if isinstance(value, int) and not isinstance(value, bool) and value > MAX_SETTING:
                raise MmdiagError(f"stages.{name}.{key}: {value} is more than any run can use (at most {MAX_SETTING:,}); set a smaller value")
    return out
