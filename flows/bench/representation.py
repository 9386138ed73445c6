"""Stage 3's benchmarks: reading the layers, fitting every probe, and the whole stage."""

from __future__ import annotations

import time


def bench_rows(adapter, data, device) -> list[dict]:
    """Rows for `mmdiag bench` on the given model and data: activation collection (each batch
    with one copy per modality removed), all probes and their controls, and the whole stage.
    Each is timed after one warm-up run."""
    from mmdiag.stages import representation as rep
    from mmdiag.stages.base import Context

    config = rep.RepresentationConfig()
    adapter.to(device).eval()
    names = list(adapter.layers())
    batch = 4096 if device.type == "cuda" else 256
    targets, _, _ = rep.concepts(data.meta)
    n = len(data)

    def timed(fn):
        fn()
        start = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - start

    acts, collect_s = timed(lambda: rep.collect(adapter, data, names, config.decision_layer, config.max_width, batch, device))
    _, probe_s = timed(lambda: rep.fit_probes(acts.layers, targets, config, 0, device))
    _, stage_s = timed(lambda: rep.run(Context(adapter, data, device, 0), config, {}))
    widths = " + ".join(str(a.shape[1]) for a in acts.layers.values())
    n_probes = 2 * len(targets) * len(names)

    def row(name, secs, **extra):
        return {"benchmark": name, "value": round(secs, 4), "unit": "s", "device": device.type, "samples_per_s": round(n / secs), **extra}

    return [
        row(f"representation: read {len(names)} layers ({widths} values) + modality ablations, {n} samples", collect_s, batch=batch),
        row(f"representation: {n_probes} probes ({len(targets)} concepts x {len(names)} layers, with controls), {n} samples", probe_s),
        row(f"representation: whole stage (probes, feature AUROC, top samples, {config.local_method} local view), {n} samples", stage_s),
    ]
