"""Three small stages that form a chain (first -> second -> third), used to test the flow.

Each computation appends its stage name to $TOY_LOG, an independent record of what ran; with
$TOY_BLOCK naming a stage, that stage waits forever (to be killed mid-stage); with
$TOY_DEAF as well, it ignores the interrupt too (a computation that cannot be stopped).
"""

import os
import time

import numpy as np

from mmdiag.stages import Stage, StageConfig, StageResult, registry


class FirstConfig(StageConfig):
    scale: float = 1.0


class SecondConfig(StageConfig):
    offset: float = 0.0
    chunk: int = 8  # how the work is split: changes the key, never the figures


def _record(name):
    if os.environ.get("TOY_LOG"):
        with open(os.environ["TOY_LOG"], "a") as f:
            f.write(name + "\n")
    if os.environ.get("TOY_PIDS"):
        with open(os.environ["TOY_PIDS"], "a") as f:
            f.write(f"{name} {os.getpid()}\n")
    while os.environ.get("TOY_BLOCK") == name:
        try:
            time.sleep(0.05)
        except (KeyboardInterrupt, SystemExit):
            if not os.environ.get("TOY_DEAF"):
                raise


def first(ctx, config, upstream):
    _record("first")
    margin = (ctx.logits[:, 1] - ctx.logits[:, 0]).numpy() * config.scale
    return StageResult({"mean_margin": round(float(margin.mean()), 6)}, {"margin": margin})


def merge_first(parts):
    margin = np.concatenate([p.arrays["margin"] for p in parts])
    return StageResult({"mean_margin": round(float(margin.mean()), 6)}, {"margin": margin})


def second(ctx, config, upstream):
    _record("second")
    value = upstream["first"].summary["mean_margin"] + config.offset
    return StageResult({"shifted": round(value, 6)})


def third(ctx, config, upstream):
    _record("third")
    return StageResult({"doubled": round(2 * upstream["second"].summary["shifted"], 6)})


def build_model(seed: int = 0):
    """An untrained demo network with fixed weights: a model in milliseconds."""
    import torch

    from mmdiag.pipeline.demo.models import LateFusionNet, demo_adapter

    torch.manual_seed(seed)
    return demo_adapter(LateFusionNet().eval())


def register_all():
    registry.register(Stage("first", first, FirstConfig, writes=("first.mean_margin",), modules=(__name__,), merge=merge_first))
    registry.register(Stage("second", second, SecondConfig, reads=("first",), modules=(__name__,)))
    registry.register(Stage("third", third, reads=("second",), modules=(__name__,)))


if os.environ.get("TOY_ONLY"):  # a flow in a subprocess: the toy chain alone, as the in-process tests have it
    registry._STAGES.clear()
if not any(s.name == "first" for s in registry.stages()):
    register_all()
