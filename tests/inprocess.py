"""The diagnosis without Prefect, for tests: every registered stage in order on one adapter and
data set, the summary assembled as the flow assembles it, then the report's analysis."""

from __future__ import annotations

import torch

from mmdiag.flows import results as results_io
from mmdiag.pipeline.evaluate import model_summary
from mmdiag.pipeline.resolve import predict
from mmdiag.reports import analyse
from mmdiag.stages import Context, StageResult, extended, registry

QUICK = {
    "discovery": {},
    "unimodal": {"methods": ["grad_x_input", "integrated_gradients", "shapley"], "n_correct": 30, "max_errors": 120, "ig_steps": 16, "shapley_pairs": 2, "sanity_samples": 0},
    "crossmodal": {"n_reference": 60},
    "representation": {},
    "composition": {},
    "intervention": {},
}


def diagnose(adapter, data, settings: dict | None = None, stages: tuple[str, ...] | None = None) -> tuple[dict, dict, dict]:
    """(summary, stage results, analysis) of one model on one data set, stages run in-process."""
    settings = {**QUICK, **(settings or {})}
    device = torch.device("cpu")
    logits = predict(adapter, data, device)
    results = {"model": StageResult(model_summary(data, logits, "test", {}, adapter.fusion), {"ids": data.ids.numpy(), "labels": data.labels.numpy(), "logits": logits.numpy()})}
    summary = {"model": results["model"].summary}
    for stage in registry.stages():
        if stages is not None and stage.name not in stages:
            continue
        read = {r: results[r] for r in stage.reads if r in results}
        ctx = Context(adapter, extended(data, read), device, 0, logits)
        result = stage.run(ctx, stage.config.model_validate(settings.get(stage.name, {})), read)
        results[stage.name] = result
        summary[stage.name] = results_io.with_timings(result.summary, result.timings)  # as the flow writes it
    return summary, results, analyse(summary, results, extended(data, results))
