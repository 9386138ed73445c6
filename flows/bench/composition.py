"""Stage 4's benchmark: our elastic-net path against the reference implementation.

The reference is the `glm-saga` package (MultiViz stage 4's solver: proximal SAGA, lr 0.1, up
to 500 epochs per point) when it is installed, otherwise scikit-learn's saga elastic net.
Both fit the same standardised features, the same split, the same lambdas (glm_saga's own
formula for lambda_max), and both run with the same number of CPU threads.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import time
import warnings

import numpy as np
import torch

from mmdiag.stages.composition import CompositionConfig, choose, fit_path, heldout_split, standardise


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _glm_saga(z_fit, y_fit, n_classes: int, config: CompositionConfig, device) -> tuple[torch.Tensor, list, int]:
    """(lambdas, (weights, bias) per path point, points that hit the epoch limit) from glm_saga
    with MultiViz's settings."""
    from glm_saga.elasticnet import IndexedTensorDataset, glm_saga

    linear = torch.nn.Linear(z_fit.shape[1], n_classes).to(device)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    loader = torch.utils.data.DataLoader(IndexedTensorDataset(z_fit.cpu(), y_fit.cpu()), batch_size=256, shuffle=True, generator=torch.Generator().manual_seed(0))
    log = io.StringIO()
    with contextlib.redirect_stdout(log), warnings.catch_warnings():  # it prints a line per point
        warnings.simplefilter("ignore")
        out = glm_saga(linear, loader, 0.1, 500, config.alpha, epsilon=config.eps, k=config.n_lambdas, do_zero=False, n_classes=n_classes)
    lambdas = torch.tensor([float(p["lam"]) for p in out["path"]])
    return lambdas, [(p["weight"], p["bias"]) for p in out["path"]], log.getvalue().count("did not converge")


def _sklearn(z_fit, y_fit, lambdas, config: CompositionConfig) -> tuple[torch.Tensor, list, int]:
    """(lambdas, (weights, bias) per path point, points that hit max_iter) from scikit-learn's
    saga along our lambdas, warm-started: C = 1 / (n lambda) gives the same objective."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    x, y = z_fit.cpu().numpy(), y_fit.cpu().numpy()
    model = LogisticRegression(solver="saga", l1_ratio=config.alpha, warm_start=True, max_iter=500, tol=1e-4)
    out = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        for lam in lambdas.tolist():
            model.set_params(C=1 / (len(x) * lam)).fit(x, y)
            out.append(_binary_as_two(model))
    return lambdas, out, sum(issubclass(w.category, ConvergenceWarning) for w in caught)


def _binary_as_two(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, bias) per class: for two classes scikit-learn fits one vector w, shown as the
    centred pair (-w/2, w/2) (its ridge term then counts |w|^2 where ours counts |w|^2 / 2)."""
    w, b = torch.as_tensor(model.coef_, dtype=torch.float32), torch.as_tensor(model.intercept_, dtype=torch.float32)
    return (torch.cat([-w / 2, w / 2]), torch.cat([-b / 2, b / 2])) if len(w) == 1 else (w, b)


def _excess(z, y, ours, theirs, lam: float, alpha: float) -> float:
    """How much higher the reference's objective is than ours at one lambda, relatively."""

    def objective(w, b):
        ce = torch.nn.functional.cross_entropy(z @ w.T + b, y)
        return float(ce + lam * (alpha * w.abs().sum() + (1 - alpha) / 2 * (w * w).sum()))

    return objective(*theirs) / objective(*ours) - 1


def _reference(name: str) -> str:
    if name != "auto":
        return name
    return "glm-saga" if importlib.util.find_spec("glm_saga") else "sklearn"


def _scores(points, z_held, y_held) -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out fidelity, n_features) per path point of (weights, bias)."""
    weights = torch.stack([w.cpu() for w, _ in points])
    bias = torch.stack([b.cpu() for _, b in points])
    fidelity = ((z_held.cpu() @ weights.transpose(1, 2) + bias[:, None]).argmax(2) == y_held.cpu()).double().mean(1)
    return fidelity, (weights != 0).any(1).sum(1)


def bench_rows(features: torch.Tensor, predictions: torch.Tensor, device: torch.device, reference: str = "auto") -> list[dict]:
    """Seconds for the whole path, ours and the reference's, their ratio, and fidelity at equal
    sparsity. `reference`: auto (glm-saga when installed), glm-saga or sklearn."""
    config, reference = CompositionConfig(), _reference(reference)
    z, _, _, kept = standardise(features.float().cpu())
    classes = predictions.unique()
    y = torch.searchsorted(classes, predictions.cpu())
    held = heldout_split(y, config.holdout, 0, [str(c) for c in classes.tolist()])
    z_fit, y_fit, z_held, y_held = (t.to(device) for t in (z[~held], y[~held], z[held], y[held]))

    def timed(fn):  # waits for the GPU
        return _timed(lambda: (fn(), torch.cuda.synchronize() if device.type == "cuda" else None)[0])

    timed(lambda: fit_path(z_fit, y_fit, z_held, y_held, len(classes), config.model_copy(update={"n_lambdas": 2})))  # warm-up
    path, ours = timed(lambda: fit_path(z_fit, y_fit, z_held, y_held, len(classes), config))
    if reference == "glm-saga":
        (lambdas, points, unconverged), theirs = timed(lambda: _glm_saga(z_fit, y_fit, len(classes), config, device))
    else:
        (lambdas, points, unconverged), theirs = timed(lambda: _sklearn(z_fit, y_fit, path.lambdas, config))
    fidelity, n_features = _scores(points, z_held, y_held)
    chosen = choose(path, config.margin)
    k = int(path.n_features[chosen])
    within = n_features <= k  # equal sparsity: the reference's best point with at most our features
    excess = [_excess(z_fit.cpu(), y_fit.cpu(), (w, b), point, lam, config.alpha) for lam, w, b, point in zip(path.lambdas.tolist(), path.weights, path.bias, points)]
    shape = {"samples": len(z), "features": int(kept.sum()), "classes": len(classes), "points": config.n_lambdas}
    name = {"glm-saga": "glm-saga (proximal SAGA, lr 0.1, <= 500 epochs a point)", "sklearn": "scikit-learn saga"}[reference]

    def row(benchmark, value, unit, **extra):
        return {"benchmark": benchmark, "value": round(value, 4), "unit": unit, "device": device.type, **extra}

    return [
        row("composition path, ours (proximal gradient, BB steps)", ours, "s", **shape, steps=path.steps),
        row(f"composition path, {name}", theirs, "s", **shape, same_lambdas=bool(torch.allclose(lambdas.double(), path.lambdas, rtol=1e-4)), unconverged_points=unconverged),
        row(f"composition path: {reference} seconds / ours", theirs / ours, "x"),
        row(
            f"composition fidelity at equal sparsity (<= {k} features), ours",
            float(path.fidelity[chosen]),
            "fraction",
            reference=reference,
            reference_fidelity=round(float(fidelity[within].max()), 4) if within.any() else None,
            reference_objective_excess_median=round(float(np.median(excess)), 5),
            reference_objective_excess_max=round(float(np.max(excess)), 5),
        ),
    ]


def composition_rows(adapter, data, device: torch.device) -> list[dict]:
    """bench_rows on a model's decision-level features over `data` (flows/bench/suite.py: the demo
    FiLM model on the ood split, like attribution_rows)."""
    from mmdiag.pipeline.resolve import predict

    predictions = predict(adapter, data, device).argmax(1)
    with torch.no_grad(), adapter.reading(["decision"]) as seen:
        decision = torch.cat([(adapter(inputs), seen["decision"].cpu())[1] for _, inputs in data.batches(512, device)])
    return bench_rows(decision, predictions, device)
