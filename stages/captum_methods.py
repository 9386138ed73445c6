"""Captum's attribution methods on our game: the same units, baselines and targets as every
other method of stage 1, each returning a (B, F) tensor over the players.

Only the glue to the game is ours: feature masks that are the units (special tokens in a feature
of their own whose removal keeps them), baselines that are the units' baselines, the scores read
back per unit, the model evaluations counted. Where a method's assumptions do not hold for a
model, it is refused with one line that says why.
"""

from __future__ import annotations

import itertools
import warnings
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from mmdiag.pipeline.errors import MmdiagError
from mmdiag.stages.attribution import Game


class _Forward(nn.Module):
    """The model as Captum's layer-hooking methods want it: a module whose forward takes one
    tensor per modality; it counts the model inputs it evaluates."""

    def __init__(self, game: Game):
        super().__init__()
        self.net = game.adapter.module
        self.game = game

    def forward(self, *tensors: Tensor) -> Tensor:
        self.game.passes += tensors[0].shape[0]
        return self.game.adapter.forward(dict(zip(self.game.modalities, tensors)))


def _inputs(game: Game) -> tuple[Tensor, ...]:
    return tuple(game.encoded[m].detach() for m in game.modalities)


def _per_unit(game: Game, attrs: tuple[Tensor, ...], mean: bool = False) -> Tensor:
    """Element-wise attributions pooled per unit: summed, or averaged where every element of a
    unit carries the unit's score (perturbation methods)."""
    out = []
    for m, a in zip(game.modalities, attrs):
        u = game.units[m]
        pooled = u.pool(a.detach())
        out.append(pooled / u.pool(torch.ones_like(a)).clamp_min(1) if mean else pooled)
    return torch.cat(out, dim=1) * game.present


def _gradient_cost(game: Game, before: int) -> None:
    game.backward += game.passes - before


# --- surrogate models: LIME and KernelSHAP over the units as interpretable features


def _sample_masks(game: Game, i: int) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], Tensor]:
    """Feature masks of sample i over its present units (renumbered 0..n-1; elements of no unit
    get feature n, whose baseline is their own value), its baselines, and the slots (n,)."""
    one = game.sample(i)
    slots = one.present[0].nonzero().flatten()  # over all players, modality after modality
    renumber = torch.full((one.n_players + 1,), len(slots), dtype=torch.long, device=slots.device)
    renumber[slots] = torch.arange(len(slots), device=slots.device)
    offsets = [0, *itertools.accumulate(one.sizes)]
    masks, baselines = [], []
    for m, off in zip(one.modalities, offsets):
        u, x = one.units[m], one.encoded[m]
        mask = u.mask.expand(x.shape[0], *u.mask.shape[1:])
        masks.append(renumber[torch.where(mask < 0, torch.full_like(mask, one.n_players), mask + off)].expand_as(x).contiguous())
        baselines.append(torch.where(mask.expand_as(x) < 0, x, u.baseline[:1]).detach())
    return tuple(masks), tuple(baselines), slots


@contextmanager
def _seeded(generator: torch.Generator):
    """Captum draws from torch's global generator: seeded here from the sample's own stream,
    and put back as it was afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        yield


def surrogate(game: Game, method: str, samples: int | None, pairs: int) -> Tensor:
    """Captum's Lime or KernelShap on each sample, `samples` perturbations over its present
    units (None: what Shapley sampling with `pairs` spends on it, 2 pairs (n - 1) + 2). LIME: Captum's exponential kernel on the cosine distance, fitted by unregularised
    weighted least squares (Captum's default Lasso shrinks small scores to exactly 0), so that
    on a linear model it recovers coefficient x (x - baseline) exactly; KernelSHAP: Captum's
    Shapley-kernel regression (additivity is not enforced: its completeness error says how far)."""
    from captum._utils.models.linear_model import SkLearnLinearRegression
    from captum.attr import KernelShap, Lime

    forward = _Forward(game)
    explainer = Lime(forward, interpretable_model=SkLearnLinearRegression()) if method == "lime" else KernelShap(forward)
    out = torch.zeros(len(game.target), game.n_players, device=game.target.device)
    for i, g in enumerate(game.streams(None).generators):
        masks, baselines, slots = _sample_masks(game, i)
        one = tuple(x[i : i + 1] for x in _inputs(game))
        with _seeded(g):
            attrs = explainer.attribute(
                one,
                baselines=baselines,
                target=int(game.target[i]),
                feature_mask=masks,
                n_samples=samples or 2 * pairs * max(len(slots) - 1, 1) + 2,
                perturbations_per_eval=max(1, game.batch_size),
                return_input_shape=False,
            )
        out[i, slots] = attrs[0, : len(slots)].detach().to(out.dtype)
    return out


# --- DeepLIFT, DeepLiftShap, LRP: rules that propagate through the model's layers

CONSERVATION_TOLERANCE = 0.01  # relative: |sum(attr) - (f(x) - f(ref))| / |f(x) - f(ref)|


def _conserved(name: str, delta: Tensor, gap: Tensor, why: str) -> None:
    error = float(delta.abs().mean() / gap.abs().mean().clamp_min(1e-12))
    if error > CONSERVATION_TOLERANCE:
        raise MmdiagError(f"stages.unimodal.methods: {name} does not hold on this model (its scores miss f(x) - f(reference) by {error:.0%}: {why}); remove {name} for this model")


DEEPLIFT_WHY = "a nonlinearity that is not an nn.Module Captum's DeepLift knows (torch.relu, attention, GELU...) is treated as linear"


def deeplift(game: Game) -> tuple[Tensor, Tensor]:
    """Captum's DeepLift (rescale rule) from the all-removed input; (scores, completeness
    residual). Refused when its summation-to-delta fails on the model."""
    from captum.attr import DeepLift

    forward, before = _Forward(game), game.passes
    base = game.removed()
    with _quiet_captum():
        attrs, delta = DeepLift(forward).attribute(_inputs(game), baselines=tuple(base[m].detach() for m in game.modalities), target=game.target, return_convergence_delta=True)
    _gradient_cost(game, before)
    scores = _per_unit(game, attrs)
    _conserved("deeplift", delta.detach(), _ends_gap(game, base), DEEPLIFT_WHY)
    return scores, delta.detach()


def deeplift_shap(game: Game, references: int, generator: torch.Generator | None) -> Tensor:
    """Captum's DeepLiftShap: DeepLift averaged over a distribution of references, here the
    all-removed input and `references - 1` other samples of the batch with the units of the
    explained sample's own unit layout (the data as background, as SHAP does)."""
    from captum.attr import DeepLiftShap

    b = len(game.target)
    base = game.removed()
    picks = torch.randperm(b, generator=generator)[: max(references - 1, 0)].to(game.target.device)
    refs = tuple(torch.cat([base[m][:1], game.encoded[m][picks]]).detach() for m in game.modalities)
    forward, before = _Forward(game), game.passes
    with _quiet_captum():
        attrs, delta = DeepLiftShap(forward).attribute(_inputs(game), baselines=refs, target=game.target, return_convergence_delta=True)
    _gradient_cost(game, before)
    with torch.no_grad():
        ref_logits = game.adapter.forward(dict(zip(game.modalities, refs))).float()
        mean_ref = ref_logits[:, game.target].mean(0)
        game.passes += refs[0].shape[0]
    gap = game.target_logit({m: t.detach() for m, t in game.encoded.items()}).detach() - mean_ref
    _conserved("deeplift_shap", delta.detach().reshape(b, -1).mean(1), gap, DEEPLIFT_WHY)
    return _per_unit(game, attrs)


def lrp(game: Game) -> Tensor:
    """Captum's LRP (epsilon rule on linear, convolution and pooling layers), relevance of f(x)
    pooled per unit. Refused, with the layer named, for models with layers it has no rule for."""
    from captum.attr import LRP
    from captum.attr._core.lrp import SUPPORTED_LAYERS_WITH_RULES, SUPPORTED_NON_LINEAR_LAYERS
    from captum.attr._utils.lrp_rules import IdentityRule

    forward = _Forward(game)
    called = _leaves_called(game)
    unused = []
    for name, module in game.adapter.module.named_modules():
        if list(module.children()) or hasattr(module, "rule"):
            continue
        if module not in called:
            module.rule = IdentityRule()  # never reached: any rule will do
            unused.append(module)
        elif type(module) not in SUPPORTED_LAYERS_WITH_RULES and type(module) not in SUPPORTED_NON_LINEAR_LAYERS:
            _drop_rules(unused)
            raise MmdiagError(
                f"stages.unimodal.methods: lrp has no rule for the model's layer {name!r} ({type(module).__name__}); Captum's LRP "
                "supports Linear, Conv2d, pooling, BatchNorm2d, ReLU, Tanh and Dropout layers; remove lrp for this model"
            )
    before = game.passes
    try:
        with _quiet_captum():
            attrs = LRP(forward).attribute(_inputs(game), target=game.target)
    finally:
        _drop_rules(unused)
    _gradient_cost(game, before)
    return _per_unit(game, attrs)


def _drop_rules(modules) -> None:
    for module in modules:
        del module.rule


def _leaves_called(game: Game) -> set[nn.Module]:
    """The leaf modules one forward pass of the first sample goes through."""
    seen: set[nn.Module] = set()
    handles = [m.register_forward_hook(lambda mod, *_: seen.add(mod)) for m in game.adapter.module.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            game.adapter.forward({m: t[:1] for m, t in game.encoded.items()})
    finally:
        for h in handles:
            h.remove()
    return seen


def _ends_gap(game: Game, base: dict[str, Tensor]) -> Tensor:
    with torch.no_grad():
        return (game.target_logit({m: t.detach() for m, t in game.encoded.items()}) - game.target_logit(base)).detach()


@contextmanager
def _quiet_captum():
    """Captum warns on every call that it sets hooks on the model's activations."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(hooks|non-linear|Setting forward|did not already require gradients).*")
        yield


# --- Grad-CAM and SmoothGrad


def grad_cam(game: Game, layer: nn.Module, layer_name: str) -> Tensor:
    """Captum's LayerGradCam on an image layer (B, C, h, w): ReLU of the channel-weighted map,
    upsampled (bilinear) to the image and averaged per patch. It scores the image's units only;
    the other modalities' units get 0."""
    from captum.attr import LayerAttribution, LayerGradCam

    images = [m for m in game.modalities if game.encoded[m].dim() == 4]
    if len(images) != 1:
        raise MmdiagError(f"stages.unimodal.methods: grad_cam needs exactly one image modality (B, C, H, W); this model has {len(images)}; remove grad_cam")
    image = images[0]
    forward, before = _Forward(game), game.passes
    with _quiet_captum():
        cam = LayerGradCam(forward, layer).attribute(_inputs(game), target=game.target, relu_attributions=True)
    if cam.dim() != 4:
        raise MmdiagError(f"stages.unimodal.gradcam_layer: layer {layer_name!r} gives {cam.dim()}-D output, not an image map (B, C, h, w); name a convolutional layer")
    _gradient_cost(game, before)
    x = game.encoded[image]
    cam = LayerAttribution.interpolate(cam.detach(), tuple(x.shape[2:]), "bilinear").expand_as(x) / x.shape[1]
    per = {m: torch.zeros(len(game.target), game.units[m].n, device=x.device) for m in game.modalities}
    u = game.units[image]
    per[image] = u.pool(cam) / u.pool(torch.ones_like(cam) / x.shape[1]).clamp_min(1e-12)
    return torch.cat([per[m] for m in game.modalities], dim=1) * game.present


def smoothgrad(game: Game, samples: int, noise: float) -> Tensor:
    """Captum's NoiseTunnel (SmoothGrad) around gradient x (input - baseline), as our
    grad_x_input: the mean over `samples` noisy copies, noise of `noise` x the sample's own
    range (Smilkov et al.), added to the units' elements only (special tokens stay as they
    are). One sample at a time, its noise from its own stream."""
    return game.in_chunks(1, lambda one: _smoothgrad(one, samples, noise))


def _smoothgrad(game: Game, samples: int, noise: float) -> Tensor:
    from captum.attr import InputXGradient, NoiseTunnel

    mods = game.modalities
    base = game.removed()
    inside = {m: game.units[m].elements.expand_as(game.encoded[m]).to(game.encoded[m].dtype) for m in mods}

    class Shifted(_Forward):  # the input is x - baseline: InputXGradient then gives grad x (x - baseline)
        def forward(self, *deltas):
            r = deltas[0].shape[0] // len(game.target)  # NoiseTunnel repeats each sample r times in a row
            return super().forward(*(base[m].detach().repeat_interleave(r, 0) + d * inside[m].repeat_interleave(r, 0) for m, d in zip(mods, deltas)))

    forward, before = Shifted(game), game.passes
    deltas = tuple((game.encoded[m] - base[m]).detach() for m in mods)
    stdevs = tuple(float(noise * (game.encoded[m].max() - game.encoded[m].min()).clamp_min(1e-12)) for m in mods)
    with _quiet_captum(), _seeded(game.streams(None).generators[0]):
        attrs = NoiseTunnel(InputXGradient(forward)).attribute(
            deltas,
            nt_type="smoothgrad",
            nt_samples=samples,
            nt_samples_batch_size=max(1, game.batch_size),
            stdevs=stdevs,
            target=game.target,
        )
    _gradient_cost(game, before)
    return _per_unit(game, tuple(a * inside[m] for m, a in zip(mods, attrs)))
