"""What every stage shares: its context, its result, and its registry entry.

A stage is a plain function `run(ctx, config, upstream) -> StageResult`: callable from a
notebook or a test without Prefect. The flow (flows/) wraps each registered stage in a task.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from mmdiag.pipeline.adapter import ModelAdapter
from mmdiag.pipeline.data import SampleSet


class StageConfig(BaseModel):
    """Base of every stage's settings: unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class Context:
    adapter: ModelAdapter
    data: SampleSet  # the analysed split
    device: torch.device
    seed: int = 0
    logits: torch.Tensor | None = None  # the model's logits on `data`, from evaluation
    progress: Callable[[str, float], None] = lambda what, fraction: None


class Heartbeat:
    """Progress inside a long step: at most once every `every` seconds, the step's label with
    the model inputs evaluated so far, at the fraction the step started from. A Game (`tick`)
    or a batch loop calls it with each batch's input count."""

    def __init__(self, progress: Callable[[str, float], None], every: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.progress, self.every, self.clock = progress, every, clock
        self.what, self.at, self.inputs, self.last = "", 0.0, 0, clock()

    def step(self, what: str, at: float) -> None:
        self.what, self.at, self.inputs = what, at, 0

    def __call__(self, inputs: int) -> None:
        self.inputs += inputs
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            self.progress(f"{self.what}: {self.inputs:,} model inputs", self.at)


@dataclass
class StageResult:
    """Small JSON-able headline figures (they go to summary.json), named arrays, and JSON-able
    details that are too big or too fine for summary.json (per-sample graphs, unit labels):
    the report reads those from stages/STAGE/result.json. Timings stay out of the figures, so
    the same computation gives the same result (and cache key) on any machine."""

    summary: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    # how long its parts took, shaped like `summary` (e.g. {"methods": {"shapley": {"seconds": 1.2}}}):
    # kept beside the content, never part of its hash, merged into summary.json by the flow
    timings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Context, StageConfig, dict[str, StageResult]], StageResult]
    config: type[StageConfig] = StageConfig
    reads: tuple[str, ...] = ()  # names of the earlier stages whose results it reads
    writes: tuple[str, ...] = ()  # the summary.json keys it fills, for `mmdiag stages`
    modules: tuple[str, ...] = ()  # modules whose source is part of its cache key
    # Per-sample stages can be split into shards (`runner.shards`), run as mapped tasks, and
    # combined by `merge`, which must give what one run over all samples gives.
    merge: Callable[[list[StageResult]], StageResult] | None = None
    # Extra files the result adds to the run folder ({relative path: text}, e.g. GraphML under
    # graphs/); the flow writes them, so the stage itself stays free of I/O.
    files: Callable[[StageResult], dict[str, str]] | None = None
    # What can be checked on the model, the analysed split and the settings alone (a Context
    # without logits): the pre-flight calls it, so a mistake fails before any stage runs.
    check: Callable[[Context, StageConfig], None] | None = None
    # A stage whose result adds to the data every later stage and the report see (discovery:
    # the features it found become concepts): extends(data, result) -> data. The registry makes
    # every later stage read it, so their cache keys follow its result.
    extends: Callable[[SampleSet, StageResult], SampleSet] | None = None
    # The TypedDict of its summary (stages/summaries.py): the flow checks the summary against it
    # and the documentation's summary.json page lists its keys; None: an untyped dict.
    summary: type | None = None
    # The registered extensions it runs with these settings (their code, as a fingerprint: part
    # of its cache key beside `modules`), e.g. the attribution methods a config names.
    extensions: Callable[[dict[str, Any]], str] | None = None


def extended(data: SampleSet, read: dict[str, StageResult]) -> SampleSet:
    """The data as a stage that read these results sees it."""
    from mmdiag.stages import registry

    for name, result in read.items():
        stage = registry.get(name) if name in {s.name for s in registry.stages()} else None
        if stage is not None and stage.extends is not None:
            data = stage.extends(data, result)
    return data
