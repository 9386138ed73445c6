"""M2IB's cost per image-text pair on a CLIP of ViT-B/32's size (transformers' CLIPConfig
defaults: vision 768 wide, 12 layers, 32 px patches on 224 px images; text 512 wide, 12 layers),
with random weights: the cost does not depend on them, and nothing is downloaded. The paper
reports 1.2 s per pair on an RTX 8000."""

from __future__ import annotations

import time

import torch


def clip_b32(seed: int = 0):
    """A ViT-B/32-sized CLIPAdapter with random weights."""
    from transformers import CLIPConfig, CLIPModel

    from mmdiag.pipeline.hf import CLIPAdapter

    torch.manual_seed(seed)
    return CLIPAdapter(CLIPModel(CLIPConfig()))


def pairs(adapter, n: int, length: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """n random image-text pairs: normalised pixels, and captions of `length` tokens with the
    start and end tokens."""
    g = torch.Generator().manual_seed(seed)
    size = adapter.image_size
    words = torch.randint(1, adapter.bos_id, (n, length - 2), generator=g)
    ids = torch.cat([torch.full((n, 1), adapter.bos_id), words, torch.full((n, 1), adapter.eos_id)], dim=1)
    return {"image": torch.randn(n, 3, size, size, generator=g), "text": ids}


def bench_rows(device: torch.device, n_pairs: int | None = None) -> list[dict]:
    """M2IB with the bottleneck after layer 9 of each tower (the paper's setting: 10 Adam
    steps x 10 noise draws per modality), all pairs of a batch optimised together; timed after
    a warm-up on one pair. Default batch: 4 pairs on a CPU (about a minute on 2 cores), 32 on CUDA."""
    from mmdiag.stages.m2ib_layer import m2ib_maps

    n = n_pairs or (32 if device.type == "cuda" else 4)
    adapter = clip_b32().to(device).eval()
    batch = {m: t.to(device) for m, t in pairs(adapter, n).items()}

    def run(inputs):
        m2ib_maps(adapter, inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()

    run({m: t[:1] for m, t in batch.items()})
    start = time.perf_counter()
    run(batch)
    secs = time.perf_counter() - start
    layers = adapter.m2ib_layers
    return [
        {
            "benchmark": f"m2ib per image-text pair, ViT-B/32-sized CLIP, bottleneck after {layers['image']} and {layers['text']}, batch of {n}",
            "value": round(secs / n, 4),
            "unit": "s",
            "device": device.type,
            "pairs": n,
            "batch_seconds": round(secs, 3),
            "threads": torch.get_num_threads(),
            "paper": "1.2 s per pair (RTX 8000)",
        }
    ]
