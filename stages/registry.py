"""The registered stages, in the order the flow runs them."""

from __future__ import annotations

import dataclasses

from mmdiag.stages.base import Stage

_STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    """Add a stage after the ones registered so far. Its `reads` must name earlier stages; it
    also reads every earlier stage that extends the data (it sees the data as they leave it)."""
    for name in stage.reads:
        if name not in _STAGES:
            raise ValueError(f"stage {stage.name!r} reads {name!r}, which is not registered before it")
    extending = tuple(s.name for s in _STAGES.values() if s.extends is not None and s.name not in stage.reads and s.name != stage.name)
    if extending:
        stage = dataclasses.replace(stage, reads=(*extending, *stage.reads))
    _STAGES[stage.name] = stage
    return stage


def load_plugins(modules: list[str]) -> None:
    """Import the modules a config names under `plugins` (they register their stages)."""
    import importlib

    from mmdiag.pipeline.errors import MmdiagError

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise MmdiagError(f"plugins: cannot import {module!r} ({e})") from None


def stages() -> list[Stage]:
    return list(_STAGES.values())


def get(name: str) -> Stage:
    from mmdiag.pipeline.errors import MmdiagError

    if name not in _STAGES:
        known = ", ".join(_STAGES) or "none registered yet"
        raise MmdiagError(f"--stage: unknown stage {name!r}; the stages are: {known}")
    return _STAGES[name]


def downstream(name: str) -> list[str]:
    """The stages that read `name`, directly or through others."""
    out: list[str] = []
    for stage in _STAGES.values():
        if name in stage.reads or any(r in out for r in stage.reads):
            out.append(stage.name)
    return out
