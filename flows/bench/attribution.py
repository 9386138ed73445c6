"""Benchmarks of stage 1's methods side by side, and of the Shapley estimators against exact
values: `python -m mmdiag.flows.bench.attribution [JSON]` prints these rows alone and writes them to JSON
(default bench-attribution.json); they are part of `mmdiag bench`."""

from __future__ import annotations

import time

from mmdiag.pipeline.store import write_json

METHODS = (
    "grad_x_input",
    "smoothgrad",
    "grad_cam",
    "integrated_gradients",
    "occlusion",
    "shapley",
    "shapley_kernel",
    "lime",
    "kernel_shap",
    "iba",
    "deeplift",
    "deeplift_shap",
    "lrp",
)
SLOW = ("lime", "kernel_shap")  # Captum fits a linear model per sample: timed on fewer samples


def explained(adapter, data, device, n: int):
    """The first n samples as every benchmark of stage 1 plays them: encoded inputs, their
    units and the predicted classes."""
    import torch

    adapter.to(device).eval()
    inputs = {m: x.to(device) for m, x in data.subset(torch.arange(n)).inputs.items()}
    with torch.no_grad():
        encoded = {m: t.detach() for m, t in adapter.encode(inputs).items()}
        target = adapter.forward(encoded).argmax(1)
    return encoded, adapter.units(inputs, encoded), target


def method_rows(adapter, samples, device, per_input: float, per_grad: float, n_slow: int = 16, model: str = "demo-film", methods=METHODS) -> list[dict]:
    """Every stage-1 method on the same samples and targets of `model`: model inputs per
    sample, seconds per sample, wall time over the floor (inputs evaluated x the time per
    input in a full batch, forward or forward + backward), or the refusal where the method
    does not apply to the model."""
    import torch

    from mmdiag.pipeline.errors import MmdiagError
    from mmdiag.stages import attribution as attr
    from mmdiag.stages.methods import attribute
    from mmdiag.stages.unimodal import UnimodalConfig

    encoded, units, target = samples
    n = len(target)
    stats = attr.BottleneckStats.of(encoded)
    config = UnimodalConfig()
    rows = []
    for method in methods:
        k = n_slow if method in SLOW else n
        game = attr.Game(adapter, encoded, units, target, attr.default_batch(device)).rows(slice(0, k))
        try:
            attribute(method, game.rows(slice(0, 2)), config, stats, torch.Generator().manual_seed(0))  # warm-up
            start = time.perf_counter()
            attribute(method, game, config, stats, torch.Generator().manual_seed(0))
            secs = time.perf_counter() - start
        except MmdiagError as e:
            rows.append({"benchmark": f"{method} on {model}: refused", "value": None, "unit": "s", "device": device.type, "why": str(e).split(": ", 2)[-1][:120]})
            continue
        floor = (game.passes - game.backward) * per_input + game.backward * per_grad
        rows.append(
            {
                "benchmark": f"{method} on {model}: seconds per sample",
                "value": round(secs / k, 5),
                "unit": "s",
                "device": device.type,
                "forward_inputs": round(game.passes / k, 1),
                "backward_inputs": round(game.backward / k, 1),
                "over_floor": round(secs / floor, 2) if floor else None,
                "samples": k,
            }
        )
    return rows


def estimator_rows(adapter_module, data, device, n: int = 16, seeds: int = 3, budgets=(5, 10, 20)) -> list[dict]:
    """Relative L2 error against exact Shapley values (2^n coalitions enumerated) at equal
    model evaluations: our antithetic permutation sampler (`shapley`), our KernelSHAP
    (`shapley_kernel`), and shap's Permutation and Kernel explainers (if installed), on demo-film
    with 16 px patches (4 image units and the words: 9-12 players). Budget k pairs = 2k(n-1)+2
    evaluations; 5 pairs is the stage's default (1x)."""
    import numpy as np
    import torch

    from mmdiag.pipeline.demo.models import demo_adapter
    from mmdiag.stages import attribution as attr

    adapter = demo_adapter(adapter_module, patch=16)
    encoded, units, target = explained(adapter, data, device, n)

    def game():
        return attr.Game(adapter, encoded, units, target, attr.default_batch(device))

    exact = attr.by_present(game(), lambda sub, c: attr.shapley_from_values(c.value(attr.coalitions(c.n, device).expand(c.index.shape[0], -1, -1)), c.n))
    present = game().present

    def error(phi):
        phi = torch.as_tensor(phi, dtype=exact.dtype, device=exact.device)
        return float(((phi - exact).norm(dim=1) / exact.norm(dim=1)).mean())

    try:
        import shap
    except ImportError:
        shap = None

    def shap_values(kind, pairs, seed):
        np.random.seed(seed)
        out = torch.zeros_like(exact)
        whole = game()
        for i in range(n):
            one = whole.rows(slice(i, i + 1))
            slots = present[i].nonzero().flatten()
            c = attr.Compact(one, slots[None])
            budget = 2 * pairs * (len(slots) - 1) + 2

            def f(masks):
                keep = torch.as_tensor(np.asarray(masks) > 0.5, device=device)[None]
                return c.value(keep)[0].cpu().numpy()

            ones = np.ones((1, len(slots)))
            if kind == "permutation":
                masker = lambda mask, x: (x * mask).reshape(1, -1)  # noqa: E731
                masker.shape = (1, len(slots))
                values = shap.explainers.Permutation(f, masker, seed=seed)(ones, max_evals=budget, silent=True).values[0]
            else:
                values = shap.KernelExplainer(f, np.zeros((1, len(slots)))).shap_values(ones, nsamples=budget, silent=True)[0]
            out[i, slots] = torch.as_tensor(np.asarray(values).reshape(-1), dtype=out.dtype, device=out.device)
        return out

    rows = []
    estimators = {"ours: shapley (antithetic permutations)": attr.shapley_sampling, "ours: shapley_kernel (KernelSHAP, exact additivity)": attr.kernel_shapley}
    for pairs in budgets:
        found = {}
        for name, estimate in estimators.items():
            found[name] = np.mean([error(estimate(game(), pairs, torch.Generator().manual_seed(s))) for s in range(seeds)])
        if shap is not None:
            for kind in ("permutation", "kernel"):
                found[f"shap {kind.capitalize()}Explainer"] = np.mean([error(shap_values(kind, pairs, s)) for s in range(seeds)])
        evals = float((2 * pairs * (present.sum(1) - 1) + 2).float().mean())
        for name, value in found.items():
            rows.append(
                {
                    "benchmark": f"Shapley error vs exact at {pairs // budgets[0]}x ({evals:.0f} evaluations/sample): {name}",
                    "value": round(value, 4),
                    "unit": "rel. L2",
                    "device": device.type,
                    "players": f"{int(present.sum(1).min())}-{int(present.sum(1).max())}",
                    "seeds": seeds,
                }
            )
    if shap is None:
        rows.append({"benchmark": "shap explainers (not installed: pip install 'mmdiag[bench]')", "value": None, "unit": "rel. L2", "device": device.type})
    return rows


def main(json_path: str = "bench-attribution.json") -> int:
    import json
    import sys

    from mmdiag.flows.bench.timing import per_input_forward, per_input_gradient, print_rows
    from mmdiag.pipeline.demo import shapes
    from mmdiag.pipeline.demo.catalog import load_model
    from mmdiag.pipeline.device import resolve_device
    from mmdiag.stages.attribution import default_batch

    device = resolve_device("auto")
    adapter = load_model("demo-film")[0]
    ood = shapes.split("ood")
    samples = explained(adapter, ood, device, 64)
    batch = default_batch(device)
    floors = per_input_forward(adapter, samples[0], batch), per_input_gradient(adapter, samples[0], batch)
    rows = method_rows(adapter, samples, device, *floors) + estimator_rows(adapter.module, ood, device)
    print_rows(rows)
    write_json(json_path, {"rows": rows})
    print(json.dumps({"written": json_path, "rows": len(rows)}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(*sys.argv[1:2]))
