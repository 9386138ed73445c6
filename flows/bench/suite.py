"""`mmdiag bench`: the project's benchmarks, as a table and as JSON.

Each row: what was measured, the figure, its unit, and the device. Training runs cold (an
empty weights cache) so that the figure is the real cost.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from mmdiag.flows.bench import attribution, composition, label_issues, m2ib, representation
from mmdiag.flows.bench.timing import per_input_forward, per_input_gradient, print_rows, timed
from mmdiag.pipeline.device import resolve_device
from mmdiag.pipeline.store import write_json


def run(device_name: str = "auto") -> list[dict]:
    from mmdiag.pipeline.demo import shapes
    from mmdiag.pipeline.demo.catalog import MODELS
    from mmdiag.pipeline.demo.models import demo_adapter
    from mmdiag.pipeline.demo.train import load_or_train
    from mmdiag.pipeline.resolve import predict

    device = resolve_device(device_name)
    rows = []

    def row(name, value, unit, **extra):
        rows.append({"benchmark": name, "value": round(value, 4), "unit": unit, "device": device.type, **extra})

    n_total = 8000 + 3 * 2000
    _, secs = timed(lambda: [shapes.split(s) for s in ("train", "iid", "ood", "anti")])
    row("data generation (8,000 + 3 x 2,000 samples)", secs, "s", samples_per_s=round(n_total / secs))
    with tempfile.TemporaryDirectory() as cache:
        import lightning  # noqa: F401  (import cost is not training cost)

        models = {}
        for name in ("demo-film", "demo-late"):
            config = MODELS[name]
            (models[name], _), secs = timed(lambda: load_or_train(config, cache=Path(cache), device=device.type))
            row(f"train {name} ({config.epochs} epochs x {config.n_train} samples)", secs, "s")
        (_, hit), secs = timed(lambda: load_or_train(MODELS["demo-film"], cache=Path(cache)))
        row("load demo-film from the weights cache", secs, "s", cached=hit)
    ood = shapes.split("ood")
    adapter = demo_adapter(models["demo-film"])
    predict(adapter, ood, device)  # warm-up
    _, secs = timed(lambda: predict(adapter, ood, device))
    row("evaluate demo-film on ood (2,000 samples)", secs, "s", samples_per_s=round(len(ood) / secs))
    rows += _demo_rows(device.type)
    rows += attribution_rows(adapter, ood, device)
    rows += attribution.estimator_rows(adapter.module, ood, device)
    rows += crossmodal_rows(adapter, ood, device)
    rows += intervention_rows(adapter, ood, device)
    rows += discovery_rows(adapter, ood, device)
    rows += representation.bench_rows(adapter, ood, device)
    rows += composition.composition_rows(adapter, ood, device)
    rows += m2ib.bench_rows(device)
    rows += label_issues.bench_rows()
    return rows


def attribution_rows(adapter, data, device, n: int = 64) -> list[dict]:
    """Stage 1's methods on the same model and samples (n = the stage's default batch of samples):
    every method's cost per sample and wall time over the floor (inputs evaluated x time per
    input), our batched Shapley sampling against the shap package as MM-SHAP runs it, batched
    IBA against one sample at a time."""
    import torch

    from mmdiag.stages import attribution as attr
    from mmdiag.stages.methods import attribute
    from mmdiag.stages.unimodal import UnimodalConfig

    rows = []

    def row(name, value, unit, **extra):
        rows.append({"benchmark": name, "value": None if value is None else round(value, 4), "unit": unit, "device": device.type, **extra})

    samples = attribution.explained(adapter, data, device, n)
    encoded, units, target = samples

    def game():
        return attr.Game(adapter, encoded, units, target, attr.default_batch(device))

    # the floors: seconds per model input in a full batch, forward only and forward + backward
    batch = game().batch_size  # the stage's forward batch on this device
    per_input = per_input_forward(adapter, encoded, batch)
    row(f"forward, per model input in a batch of {batch} (floor)", per_input * 1e6, "us")
    per_grad = per_input_gradient(adapter, encoded, batch)
    row(f"forward + backward, per model input in a batch of {batch} (floor)", per_grad * 1e6, "us")

    rows += attribution.method_rows(adapter, samples, device, per_input, per_grad)
    config = UnimodalConfig(shapley_pairs=10)
    stats = attr.BottleneckStats.of(encoded)
    attribute("shapley", game(), config, stats, torch.Generator().manual_seed(0))  # warm-up
    (ours, _), ours_secs = timed(lambda: attribute("shapley", game(), config, stats, torch.Generator().manual_seed(0)))
    ours_secs /= n

    try:
        import numpy as np
        import shap
    except ImportError:
        row("shap permutation explainer (not installed: pip install shap)", None, "s")
        return rows
    k = 2  # shap runs one input per forward pass (~40 s a sample here): two samples time it
    values, start = [], time.perf_counter()
    for i in range(k):
        one = game().sample(i)

        def f(masks):  # MM-SHAP's setup: each masked input through the model on its own
            return np.array([float(one.value(torch.as_tensor(mk[None, None] > 0.5, device=device))[0, 0]) for mk in masks])

        def masker(mask, x):
            return (x * mask).reshape(1, -1)

        masker.shape = (1, one.n_players)
        explainer = shap.explainers.Permutation(f, masker)
        evals = 10 * (2 * one.n_players + 1)  # 10 permutations, each forward and reversed
        values.append(explainer(np.ones((1, one.n_players)), max_evals=evals, batch_size=1, silent=True).values[0])
    shap_secs = (time.perf_counter() - start) / k
    corr = float(np.corrcoef(np.concatenate(values), ours[:k].cpu().numpy().ravel())[0, 1])
    row("shap Permutation (MM-SHAP setup, 10 antithetic permutations): seconds per sample", shap_secs, "s", speedup_of_ours=round(shap_secs / ours_secs, 1), correlation_with_ours=round(corr, 3))

    g = game()
    iba_config = attr.IBAConfig()
    attr.iba(game().sample(0), "image", stats, iba_config, torch.Generator().manual_seed(0))  # warm-up
    _, batched = timed(lambda: attr.iba(g, "image", stats, iba_config, torch.Generator().manual_seed(0)))

    def one_at_a_time():
        whole = game()
        for i in range(n):
            attr.iba(whole.sample(i), "image", stats, iba_config, torch.Generator().manual_seed(0))

    _, looped = timed(one_at_a_time)
    # what batching can save at most when the model's arithmetic dominates: the cost per input of a
    # forward + backward at the loop's batch (the noise copies of one sample) over the batched run's
    step_batch = iba_config.samples_per_step(g.batch_size) * iba_config.copies
    ceiling = per_input_gradient(adapter, encoded, iba_config.copies) / per_input_gradient(adapter, encoded, step_batch)
    row(
        "IBA, image, 10 steps x 10 noise draws: seconds per sample, batched",
        batched / n,
        "s",
        speedup_over_one_at_a_time=round(looped / batched, 1),
        inputs_per_step=step_batch,
        compute_ratio_one_over_batched=round(ceiling, 2),
    )
    return rows


def crossmodal_rows(adapter, data, device, n_reference: int = 200, n: int = 32) -> list[dict]:
    """Stage 2's methods on the same model: EMAP's N^2 recombined inputs in large batches
    against one input per forward pass (MultiViz), and the mixed-gradient block by torch.func
    against loops of double backward passes (over units, batched over samples; and MultiViz's
    one sample at a time). The loops are timed on a part of the work and scaled up."""
    import torch

    from mmdiag.stages import attribution as attr
    from mmdiag.stages import interaction as inter

    rows = []

    def row(name, value, unit, **extra):
        rows.append({"benchmark": name, "value": round(value, 4), "unit": unit, "device": device.type, **extra})

    adapter.to(device).eval()
    ref = data.subset(torch.arange(n_reference))
    with torch.no_grad():
        encoded = {m: t.detach() for m, t in adapter.encode({m: x.to(device) for m, x in ref.inputs.items()}).items()}
    batch = attr.default_batch(device)
    inter.recombination_table(adapter.forward, {m: t[:20] for m, t in encoded.items()}, batch)  # warm-up
    (_, passes), batched = timed(lambda: inter.recombination_table(adapter.forward, encoded, batch))
    sample = 400

    def one_at_a_time():
        with torch.no_grad():
            for k in range(sample):
                adapter.forward({"image": encoded["image"][k % n_reference : k % n_reference + 1], "text": encoded["text"][k // n_reference : k // n_reference + 1]})

    _, looped = timed(one_at_a_time)
    looped *= passes / sample
    row(f"EMAP, {n_reference} x {n_reference} recombined inputs, batched", batched, "s", inputs=passes, speedup_over_one_per_pass=round(looped / batched, 1), one_per_pass_s=round(looped, 2))

    inputs = {m: x[:n].to(device) for m, x in ref.inputs.items()}
    enc = {m: t[:n] for m, t in encoded.items()}
    units = adapter.units(inputs, enc)
    with torch.no_grad():
        target = adapter.forward(enc).argmax(1)
    game = lambda: attr.Game(adapter, enc, units, target, batch)  # noqa: E731
    inter.mixed_gradients(game(), "image", "text")  # warm-up
    g = game()
    _, ours = timed(lambda: inter.mixed_gradients(g, "image", "text"))
    per_grad = per_input_gradient(adapter, enc, batch)
    floor = g.backward * per_grad
    _, loop_units = timed(lambda: inter.mixed_gradients_looped(game(), "image", "text"))
    k = 4
    _, loop_samples = timed(lambda: [inter.mixed_gradients_looped(game().sample(i), "image", "text") for i in range(k)])
    loop_samples *= n / k
    row(
        f"mixed-gradient image x text block, torch.func: seconds per sample ({n} samples)",
        ours / n,
        "s",
        speedup_over_unit_loop=round(loop_units / ours, 1),
        speedup_over_per_sample_unit_loop=round(loop_samples / ours, 1),
        over_floor=round(ours / floor, 2),
    )
    return rows


def intervention_rows(adapter, data, device) -> list[dict]:
    """The intervention stage on every sample of the analysed split: model inputs per sample
    (regions x (1 + null sets) + 2^M + counterfactuals), seconds, and wall over the floor
    (inputs x the time of one input in a batch of the stage's size)."""
    from mmdiag.pipeline.resolve import predict
    from mmdiag.stages import attribution as attr
    from mmdiag.stages import intervention as iv
    from mmdiag.stages.base import Context

    logits = predict(adapter, data, device)
    config = iv.InterventionConfig()
    iv.run(Context(adapter, data.subset(range(64)), device, 0, logits[:64]), config, {})  # warm-up
    result, secs = timed(lambda: iv.run(Context(adapter, data, device, 0, logits), config, {}))
    encoded = adapter.encode({m: x[:64].to(device) for m, x in data.inputs.items()})
    floor = result.details["forward_passes"] * per_input_forward(adapter, encoded, attr.default_batch(device))
    passes = result.summary["forward_passes_per_sample"]
    return [
        {
            "benchmark": f"interventions, demo-film, all {len(data):,} ood samples ({len(result.details['regions'])} regions x (1 + {config.null_sets} null sets), "
            f"2^2 modality coalitions, {len(result.details['counterfactuals'])} counterfactuals)",
            "value": round(secs, 3),
            "unit": "s",
            "device": device.type,
            "forward_passes_per_sample": passes,
            "seconds_per_sample": round(secs / len(data), 5),
            "wall_over_floor": round(secs / floor, 2),
        }
    ]


def discovery_rows(adapter, data, device) -> list[dict]:
    """Discovery on every sample of the analysed split, its annotations stripped (what a user
    brings): candidates, model inputs per sample, seconds, wall over the floor."""
    from mmdiag.pipeline import SampleSet
    from mmdiag.pipeline.resolve import predict
    from mmdiag.stages import discovery as dc

    bare = SampleSet(data.inputs, data.labels, class_names=data.class_names, display=data.display)
    logits = predict(adapter, bare, device)
    config = dc.DiscoveryConfig()
    dc.discover(adapter, bare.subset(range(64)), logits[:64], config, device=device)  # warm-up
    found, secs = timed(lambda: dc.discover(adapter, bare, logits, config, device=device))
    encoded = adapter.encode({m: x[:64].to(device) for m, x in data.inputs.items()})
    floor = found.forward_passes * per_input_forward(adapter, encoded, config.eval_batch)
    kinds = {k: sum(f.kind == k for f in found.features) for k in config.kinds}
    top = max(found.reliable, key=lambda f: f.stats["flip_effect"] * f.stats["n"], default=None)
    return [
        {
            "benchmark": f"discovery, demo-film, all {len(data):,} ood samples, no annotations ({', '.join(f'{n} {k}s' for k, n in kinds.items())}; {len(found.reliable)} reliable)",
            "value": round(secs, 3),
            "unit": "s",
            "device": device.type,
            "forward_passes_per_sample": round(found.forward_passes / len(data), 1),
            "seconds_per_sample": round(secs / len(data), 5),
            "wall_over_floor": round(secs / floor, 2),
            "strongest": top.id if top else None,
        }
    ]


def _demo_rows(device: str) -> list[dict]:
    """`mmdiag demo` end to end in a fresh process: cold (empty cache and Prefect home), fully
    cached, and cold with the trained weights kept, one model after the other and side by side.
    A cached run computes nothing, so its wall time is the flow's own overhead: process start,
    imports, the temporary Prefect server, cache look-ups, writing the runs."""
    import os
    import shutil
    import subprocess
    import sys

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_HOME"} | {"MMDIAG_CACHE": str(cache)}
        command = [sys.executable, "-m", "mmdiag.flows.cli", "demo", "--out", str(Path(tmp) / "runs"), "--device", device]
        runs = [
            ("cold (trains both models, new Prefect home)", []),
            ("fully cached rerun (= flow overhead)", []),
            ("cold, trained weights cached, new Prefect home, one by one (--one-by-one)", ["--one-by-one"]),
            ("cold, trained weights cached, new Prefect home, the default (side by side where a model has one or two cores)", []),
        ]
        for i, (label, flags) in enumerate(runs):
            if i >= 2:  # all but the trained weights forgotten
                for entry in cache.iterdir():
                    if entry.name != "models":
                        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            start = time.perf_counter()
            subprocess.run(command + flags, env=env, check=True, capture_output=True)
            secs = time.perf_counter() - start
            stages = [json.loads((Path(tmp) / "runs" / r / "summary.json").read_text())["stages"] for r in ("demo-film", "demo-late")]
            computed = sum(s["seconds"] or 0 for st in stages for s in st.values() if not s["cached"])
            rows.append({"benchmark": f"mmdiag demo, {label}", "value": round(secs, 3), "unit": "s", "device": device, "stage_compute_s": round(computed, 3)})
        for r in ("demo-film", "demo-late"):
            report = json.loads((Path(tmp) / "runs" / r / "run.json").read_text())["report"]
            rows.append({"benchmark": f"error analysis + report.html for {r} (2,000 samples)", "value": report["seconds"], "unit": "s", "device": device, "html_mb": round(report["bytes"] / 1e6, 2)})
    return rows


def main(json_path: Path = Path("bench.json"), device: str = "auto") -> int:
    rows = run(device)
    print_rows(rows)
    write_json(json_path, {"rows": rows})
    print(json.dumps({"written": str(json_path), "rows": len(rows)}))
    return 0
