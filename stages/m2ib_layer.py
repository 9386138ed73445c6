"""M2IB with the bottleneck on a hidden layer of one tower (Wang et al. 2023), for adapters that
expose their towers' layers as bottleneck sites (`adapter.bottleneck_site`, e.g. CLIP).

The paper puts the bottleneck after layer 9 of CLIP's 12-layer towers, where the hidden states
still belong to tokens and patches but already carry context; `stages.attribution.m2ib` puts it
on the encoded input. Written by hand (no library has M2IB); the optimisation is the same as
`bottleneck_attribution`'s: Z = lambda * R + (1 - lambda) * eps on the layer's output R, the fit
term the cosine similarity of the tower's embedding with the other modality's clean embedding,
Adam at lr 1 for 10 steps with 10 noise draws. The hidden state is computed once and only the
rest of the tower runs at each step.

Unlike the released code (eps ~ N(0, I) on the raw R), eps follows each sample's own per-channel
mean and spread over its positions at that layer, so the noise is on the scale of the
representation and a sample's map does not depend on its batch mates.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mmdiag.pipeline.errors import MmdiagError
from mmdiag.stages.attribution import Adam, Game, IBAConfig, default_batch

M2IB = IBAConfig(beta=0.1, steps=10, lr=1.0, copies=10, smooth=0.0)  # the paper's code


def m2ib_layer(game: Game, modality: str, layer: str, config: IBAConfig = M2IB, generator: torch.Generator | None = None) -> Tensor:
    """Capacity per unit of `modality`, in bits, (B, n), with the bottleneck after `layer`."""
    if not hasattr(game.adapter, "bottleneck_site"):
        raise MmdiagError("stages.unimodal.m2ib_layers: this model's adapter exposes no hidden layers for M2IB; leave m2ib_layers unset (the bottleneck then sits on the inputs)")
    return game.in_chunks(config.samples_per_step(game.batch_size), lambda part: _m2ib_layer(part, modality, layer, config, generator))


def _m2ib_layer(game: Game, modality: str, layer: str, config: IBAConfig, generator: torch.Generator | None) -> Tensor:
    adapter = game.adapter
    encoded = {m: t.detach() for m, t in game.encoded.items()}
    with torch.no_grad():
        clean = adapter.shared_embeddings(encoded)
        site = adapter.bottleneck_site(modality, layer, encoded)
    others = [e for m, e in clean.items() if m != modality]
    if not others:
        raise MmdiagError("stages.unimodal.methods: m2ib needs a second modality to fit the embedding to")
    k = config.copies
    other = torch.stack(others).mean(0).repeat_interleave(k, 0)
    r = site.hidden.detach()
    inside = site.inside[..., None].to(r.dtype)
    count = inside.sum(1, keepdim=True).clamp_min(1)
    mu = (r * inside).sum(1, keepdim=True) / count
    sigma = (((r - mu) ** 2 * inside).sum(1, keepdim=True) / count).sqrt().clamp_min(0.01)
    normalised = (r - mu) / sigma
    alpha = torch.full_like(r, config.init, requires_grad=True)
    opt = Adam(alpha, lr=config.lr)
    # one generator per sample, on the device, seeded from the sample's own stream
    noise_gens = [torch.Generator(r.device).manual_seed(int(torch.randint(2**62, (1,), generator=g))) for g in game.streams(generator).generators]
    copies = lambda t: t.repeat_interleave(k, 0)  # noqa: E731

    def bottleneck():
        lam = torch.where(inside > 0, torch.sigmoid(alpha), 1.0)
        capacity = -0.5 * (1 + torch.log((1 - lam) ** 2 + 1e-12) - (lam * normalised) ** 2 - (1 - lam) ** 2)
        return lam, capacity * inside  # KL per element, in nats

    per_sample = count.flatten() * r.shape[-1]  # elements the bottleneck acts on
    for _ in range(config.steps):
        lam, capacity = bottleneck()
        lam_k = copies(lam)
        draws = torch.cat([torch.randn((k, *r.shape[1:]), generator=g, device=r.device, dtype=r.dtype) for g in noise_gens])
        eps = copies(mu) + copies(sigma) * draws
        z = lam_k * copies(r) + (1 - lam_k) * eps
        fit = -torch.nn.functional.cosine_similarity(site.rest(z), other, dim=-1).sum() / k
        loss = fit + config.beta * (capacity.flatten(1).sum(1) / per_sample).sum()
        opt.step(torch.autograd.grad(loss, [alpha])[0])  # not the model's parameters
        game.passes += len(z)
        game.backward += len(z)
    with torch.no_grad():
        per_position = bottleneck()[1].sum(-1) / math.log(2)
    return pool(per_position, site.unit, game.units[modality].n)


def pool(per_position: Tensor, unit: Tensor, n: int) -> Tensor:
    """Sum per-position values into units (-1: none), (B, n)."""
    out = torch.zeros(len(unit), n + 1, dtype=per_position.dtype, device=per_position.device)
    return out.scatter_add_(1, torch.where(unit < 0, n, unit), per_position)[:, :n]


def upsample(scores: Tensor, grid: tuple[int, int], size: tuple[int, int], mode: str = "bilinear") -> Tensor:
    """Per-patch scores (B, rows * cols) as a map over the image's own pixels (B, H, W)."""
    maps = scores.reshape(len(scores), 1, *grid).float()
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return torch.nn.functional.interpolate(maps, size=size, mode=mode, **kwargs)[:, 0]


def m2ib_maps(adapter, inputs: dict[str, Tensor], layers: dict[str, str] | None = None, config: IBAConfig = M2IB, seed: int = 0) -> dict[str, Tensor]:
    """M2IB maps of a batch of image-text pairs, each modality's bottleneck after its layer
    (default: the adapter's `m2ib_layers`): "text" per token position (B, L), "image" per patch
    (B, rows, cols) and "image_pixels" upsampled to the image's own size (B, H, W), in bits."""
    encoded = {m: t.detach() for m, t in adapter.encode(inputs).items()}
    units = adapter.units(inputs, encoded)
    device = encoded["image"].device
    game = Game(adapter, encoded, units, torch.zeros(len(next(iter(encoded.values()))), dtype=torch.long, device=device), default_batch(device))
    generator = torch.Generator().manual_seed(seed)
    layers = layers or adapter.m2ib_layers
    out = {m: m2ib_layer(game, m, layers[m], config, generator) for m in adapter.modalities}
    h, w = encoded["image"].shape[2:]
    grid = (h // adapter.patch, w // adapter.patch)
    out["image_pixels"] = upsample(out["image"], grid, (h, w))
    out["image"] = out["image"].reshape(-1, *grid)
    return out
