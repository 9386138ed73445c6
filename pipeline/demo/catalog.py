"""The built-in models and data, by the names a config uses."""

from __future__ import annotations

import functools
from pathlib import Path

from mmdiag.pipeline.adapter import ModelAdapter
from mmdiag.pipeline.data import SampleSet
from mmdiag.pipeline.demo import shapes, vlm
from mmdiag.pipeline.demo.models import demo_adapter
from mmdiag.pipeline.demo.train import TrainConfig, load_or_train
from mmdiag.pipeline.demo.vlm import VLMTrainConfig

# Each model's bug holds by construction, whatever the seed (docs/getting-started.md, "The demo"; the ranges over
# seeds and numeric settings: `make portability`). FiLM sees the mark agree with the label only
# on grey photos, where nothing else tells the label: it learns the shortcut there and the rule
# on colour photos (10 epochs of 64: every seed escapes the plateau of the rule's easy half).
# Late fusion cannot learn the rule at all, so it learns the shortcut alone. The transformer,
# trained as FiLM, learns the rule's easy half on colour photos (both shapes of one colour: an
# interaction of the colour and "not") and the shortcut on grey ones.
FILM = dict(arch="film", p_mark_colour=0.5, epochs=10, batch_size=64)
MODELS = {
    "demo-film": TrainConfig(**FILM, p_mark=0.8),
    "demo-late": TrainConfig(arch="late", p_mark=0.8),
    # the fix the report leads to: the corner mark decorrelated from the label
    "demo-film-clean": TrainConfig(**FILM, p_mark=0.5),
    "demo-late-clean": TrainConfig(arch="late", p_mark=0.5),
    # early fusion by joint self-attention (nn.TransformerEncoderLayer): `mmdiag demo --models demo-transformer`
    "demo-transformer": TrainConfig(**{**FILM, "arch": "transformer"}, p_mark=0.8),
    # a tiny LLaVA answering yes/no questions about the shapes (pipeline.demo.vlm)
    "demo-vlm": VLMTrainConfig(p_mark=0.8),
    "demo-vlm-clean": VLMTrainConfig(p_mark=0.5),
}


DATA = {"shapes": shapes.split, "shapes-vqa": vlm.split}


def data_for(model: str) -> str:
    """The built-in data a built-in model reads: the VLM takes the shapes as questions."""
    return "shapes-vqa" if isinstance(MODELS[model], VLMTrainConfig) else "shapes"


def load_model(name: str, cache: Path | None = None, device: str = "cpu") -> tuple[ModelAdapter, bool]:
    config = MODELS[name]
    if isinstance(config, VLMTrainConfig):
        model, cached = vlm.load_or_train(config, cache=cache, device=device)
        return vlm.adapter(model), cached
    module, cached = load_or_train(config, cache=cache, device=device)
    return demo_adapter(module), cached


@functools.lru_cache(maxsize=8)
def load_data(name: str, split: str, n: int | None, seed: int) -> SampleSet:
    """A built-in split, generated once per process (`mmdiag demo` diagnoses two models on the
    same splits)."""
    return DATA[name](split, n=n, seed=seed)


def apply_fix(name: str, action: dict) -> str:
    """The built-in model that a suggestion's action gives when applied to model `name`: the
    same architecture and seed, retrained on data changed as the action says. The demo can
    apply one change: decorrelating the corner mark from the label (p = 0.5)."""
    from mmdiag.pipeline.errors import MmdiagError

    if name not in MODELS:
        raise MmdiagError(f"--fix: {name!r} is not a built-in demo model")
    if action.get("kind") != "decorrelate" or action.get("concept") != "watermark":
        raise MmdiagError(f"--fix: the demo can retrain only with the corner mark decorrelated from the label; the top suggestion asks for {action}")
    fixed = MODELS[name].model_copy(update={"p_mark": 0.5})
    return next(other for other, config in MODELS.items() if config == fixed)
