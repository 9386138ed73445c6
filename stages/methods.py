"""The attribution methods, one record each: what stage 1 runs, stage 3's local view may use,
and the report reads.

A method is a function `attribute(game, call) -> (scores, residual)`: scores (B, F), one per
unit (B, F, T for a game with T targets when the record says `shared_targets`), and, for a
method with a completeness identity, the residual sum(scores) - (f(x) - f(baseline)) per sample
(None otherwise). Adding one is one function and one `register(Method(...))` in a module the
config lists under `plugins:` (docs: Extending, "An attribution method").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ValidationError

from mmdiag.pipeline.errors import MmdiagError
from mmdiag.pipeline.registry import Registry
from mmdiag.stages import attribution as attr
from mmdiag.stages import captum_methods as cm

if TYPE_CHECKING:
    from mmdiag.pipeline.adapter import ModelAdapter
    from mmdiag.stages.unimodal import UnimodalConfig


@dataclass
class Call:
    """What a method gets beside the game: stage 1's settings, its own settings (the record's
    `settings` model, from `stages.unimodal.options[name]`), the bottleneck statistics of the
    explained samples (records with `needs_stats`) and a seeded generator."""

    config: UnimodalConfig
    generator: torch.Generator
    stats: attr.BottleneckStats | None = None
    settings: BaseModel | None = None


Attribute = Callable[[attr.Game, Call], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass(frozen=True)
class Method:
    name: str
    attribute: Attribute
    # Shapley values are linear in the game: one set of coalitions scores several target
    # classes, so an error's true class costs no model evaluation (targets (B, T), scores (B, F, T))
    shared_targets: bool = False
    complete: bool = False  # returns a completeness residual (reported as completeness_error)
    needs_stats: bool = False  # reads Call.stats (IBA's noise)
    local: bool = False  # works for stage 3's local view: any game, default settings, no stats
    cards: int | None = None  # rank among the maps the report's cards and heatmaps read (lower first); None: never
    settings: type[BaseModel] | None = None  # the method's own settings, under stages.unimodal.options
    check: Callable[[ModelAdapter, UnimodalConfig], str | None] | None = None  # the pre-flight's one-line complaint, or None
    paper: str = ""


METHODS: Registry[Method] = Registry("attribution method", "stages.unimodal.methods")
register, get, names = METHODS.register, METHODS.get, METHODS.names


def for_cards(available: Callable[[str], bool]) -> str | None:
    """The method whose maps the report reads: the best-ranked one that ran."""
    ranked = sorted((m for m in METHODS if m.cards is not None), key=lambda m: m.cards)
    return next((m.name for m in ranked if available(m.name)), None)


def own_settings(name: str, options: dict[str, Any]) -> BaseModel | None:
    """The method's own settings, validated against its record's model."""
    if name not in METHODS:
        raise MmdiagError(f"stages.unimodal.options: {name!r} is not a registered attribution method; the methods are: {', '.join(names())}")
    method = get(name)
    if method.settings is None:
        if name in options:
            raise MmdiagError(f"stages.unimodal.options.{name}: the method {name!r} has no settings of its own; remove them")
        return None
    try:
        return method.settings.model_validate(options.get(name, {}))
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise MmdiagError(f"stages.unimodal.options.{name}.{where}: {err['msg']}") from None


def attribute(
    name: str, game: attr.Game, config: UnimodalConfig | None = None, stats: attr.BottleneckStats | None = None, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One method's (scores, completeness residual or None) for a game, as stage 1 computes them
    (stage 1's default settings unless `config` is given)."""
    from mmdiag.stages.unimodal import UnimodalConfig

    config = config or UnimodalConfig()
    call = Call(config, generator or torch.Generator().manual_seed(0), stats, own_settings(name, config.options))
    return get(name).attribute(game, call)


# --- the built-in methods ---------------------------------------------------------------------


def gap(game: attr.Game) -> torch.Tensor:
    """f(all units) - f(no units), per sample."""
    ends = game.value(torch.stack([torch.zeros_like(game.present), torch.ones_like(game.present)], 1))
    return ends[:, 1] - ends[:, 0]


def _sampled_shapley(game: attr.Game, call: Call):
    scores = attr.shapley_sampling(game, call.config.shapley_pairs, call.generator)
    return scores, scores.sum(1) - gap(game)


def _kernel_shapley(game: attr.Game, call: Call):
    scores = attr.kernel_shapley(game, call.config.shapley_pairs, call.generator)
    return scores, scores.sum(1) - gap(game)


def _surrogate(kind: str) -> Attribute:
    def run(game: attr.Game, call: Call):
        scores = cm.surrogate(game, kind, call.config.surrogate_samples, call.config.shapley_pairs)
        return scores, (scores.sum(1) - gap(game)) if kind == "kernel_shap" else None

    return run


def _image_layer(game: attr.Game) -> str:
    """The last of the adapter's named layers whose output is an image map (B, C, h, w)."""
    with game.adapter.reading(list(game.adapter.layers())) as seen, torch.no_grad():
        game.adapter.forward({m: t[:1] for m, t in game.encoded.items()})
    maps = [name for name in game.adapter.layers() if name in seen and seen[name].dim() == 4]
    if not maps:
        raise MmdiagError("stages.unimodal.gradcam_layer: none of the model's named layers gives an image map (B, C, h, w); name one in the adapter's layers")
    return maps[-1]


def _grad_cam(game: attr.Game, call: Call):
    name = call.config.gradcam_layer or _image_layer(game)
    layers = game.adapter.layers()
    if name not in layers:
        raise MmdiagError(f"stages.unimodal.gradcam_layer: the model has no layer {name!r}; it has {', '.join(layers) or 'none'}")
    return cm.grad_cam(game, layers[name], name), None


def _iba(game: attr.Game, call: Call):
    c = call.config
    iba = attr.IBAConfig(beta=c.iba_beta, steps=c.iba_steps, copies=c.iba_copies)
    return torch.cat([attr.iba(game, m, call.stats, iba, call.generator) for m in game.modalities], dim=1), None


def _m2ib(game: attr.Game, call: Call):
    c = call.config
    m2ib = attr.IBAConfig(beta=c.m2ib_beta, steps=c.iba_steps, copies=c.iba_copies, smooth=0.0)
    if c.m2ib_layers is None:
        return torch.cat([attr.m2ib(game, m, call.stats, m2ib, call.generator) for m in game.modalities], dim=1), None
    from mmdiag.stages.m2ib_layer import m2ib_layer

    layers = getattr(game.adapter, "m2ib_layers", None) if c.m2ib_layers == "auto" else c.m2ib_layers
    if layers is None:
        raise MmdiagError("stages.unimodal.m2ib_layers: this model's adapter names no default M2IB layers; give {modality: layer} or leave it unset")
    per = [m2ib_layer(game, m, layers[m], m2ib, call.generator) if m in layers else attr.m2ib(game, m, call.stats, m2ib, call.generator) for m in game.modalities]
    return torch.cat(per, dim=1), None


def _shared_space(adapter: ModelAdapter, config: UnimodalConfig) -> str | None:
    if not adapter.has_shared_space:
        return "stages.unimodal.methods: m2ib needs a model with a shared embedding space (e.g. CLIP); remove it for this model"
    return None


for _method in (
    Method("grad_x_input", lambda g, c: (attr.grad_x_input(g), None), local=True, cards=3, paper="Shrikumar et al. 2016"),
    Method("integrated_gradients", lambda g, c: attr.integrated_gradients(g, c.config.ig_steps), complete=True, local=True, cards=1, paper="Sundararajan et al. 2017"),
    Method("occlusion", lambda g, c: (attr.occlusion(g), None), local=True, cards=2, paper="Zeiler and Fergus 2014"),
    Method("shapley", _sampled_shapley, shared_targets=True, complete=True, local=True, cards=0, paper="Castro et al. 2009; MM-SHAP, Parcalabescu and Frank 2023"),
    Method("shapley_kernel", _kernel_shapley, shared_targets=True, complete=True, paper="Lundberg and Lee 2017 (KernelSHAP)"),
    Method("iba", _iba, needs_stats=True, cards=4, paper="Schulz et al. 2020 (IBA)"),
    Method("m2ib", _m2ib, needs_stats=True, cards=5, check=_shared_space, paper="Wang et al. 2023 (M2IB)"),
    Method("lime", _surrogate("lime"), paper="Ribeiro et al. 2016 (Captum)"),
    Method("kernel_shap", _surrogate("kernel_shap"), complete=True, paper="Lundberg and Lee 2017 (Captum)"),
    Method("deeplift", lambda g, c: cm.deeplift(g), complete=True, paper="Shrikumar et al. 2017 (Captum)"),
    Method("deeplift_shap", lambda g, c: (cm.deeplift_shap(g, c.config.deeplift_references, c.generator), None), paper="Lundberg and Lee 2017 (Captum)"),
    Method("lrp", lambda g, c: (cm.lrp(g), None), paper="Bach et al. 2015 (Captum)"),
    Method("grad_cam", _grad_cam, paper="Selvaraju et al. 2017 (Captum)"),
    Method("smoothgrad", lambda g, c: (cm.smoothgrad(g, c.config.smoothgrad_samples, c.config.smoothgrad_noise), None), paper="Smilkov et al. 2017"),
):
    register(_method)
