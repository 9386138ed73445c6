"""A whole diagnosis on a model that needs no training: its summary.json is kept in
tests/data/frozen-summary.json, written before the code moved into the `mmdiag` package, and
tests/test_frozen_run.py checks that every figure is still the same."""


def build_model():
    """An untrained FiLM demo network with fixed weights (seed 1 predicts both classes)."""
    import torch

    from mmdiag.pipeline.demo.models import FiLMNet, demo_adapter

    torch.manual_seed(1)
    return demo_adapter(FiLMNet().eval())


STAGES = {
    "unimodal": {"methods": ["grad_x_input", "integrated_gradients", "shapley"], "n_correct": 8, "max_errors": 8, "shapley_pairs": 1, "sanity_samples": 0},
    "crossmodal": {"n_reference": 30, "shapley_draws": 4},
    "discovery": {"kinds": ["word", "transform"]},
}


def config(out, cache) -> dict:
    return {"run": "frozen", "model": {"factory": "frozen_run:build_model"}, "data": {"name": "shapes", "split": "ood", "n": 200}, "seed": 0, "out": str(out), "cache": str(cache), "stages": STAGES}
