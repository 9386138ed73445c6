"""Stage 1 on the demo: the planted shortcut and the negation must show up, and bad input."""

import pytest
import torch

from mmdiag.pipeline import FeatureGroups, SampleSet, TorchAdapter
from mmdiag.pipeline.demo import shapes
from mmdiag.pipeline.errors import MmdiagError
from mmdiag.pipeline.resolve import predict
from mmdiag.stages.base import Context
from mmdiag.stages.unimodal import UnimodalConfig, run

from ranges import holds

QUICK = dict(methods=["integrated_gradients", "shapley"], n_correct=80, max_errors=40, shapley_pairs=3, ig_steps=64, sanity_samples=0)


def _run(adapter, data, **settings):
    logits = predict(adapter, data, torch.device("cpu"))
    return run(Context(adapter, data, torch.device("cpu"), 0, logits), UnimodalConfig(**settings), {})


def _photos(grey: int, n: int = 120):
    data = shapes.split("ood", n=1200)
    return data.subset((data.meta["grey"] == grey).nonzero().flatten()[:n])


@pytest.mark.slow
@pytest.mark.trained
def test_demo_film_attribution_finds_the_mark_and_the_negation(demo_models):
    """The mark decides on grey photos, "not" on colour ones (where the FiLM model has the rule)."""
    grey, colour = _photos(1), _photos(0)
    film = _run(demo_models("demo-film"), grey, **QUICK).summary
    clean = _run(demo_models("demo-film-clean"), grey, **QUICK).summary
    rule = _run(demo_models("demo-film"), colour, **QUICK).summary
    for method in ("integrated_gradients", "shapley"):
        mark = film["methods"][method]["truth"]["watermark"]
        holds(f"{method}, grey photos: enrichment of the mark", mark["enrichment"], above=5)  # the mark is 1 of 64 patches
        holds(f"{method}, grey photos: how often the mark is the top patch", mark["top1_rate"], above=0.8)
        # the model trained without the shortcut puts far less on the mark: 0.032-0.33 over 5 seeds x 4 settings
        holds(f"{method}, grey photos: the mark's mass, clean / shortcut model", clean["methods"][method]["truth"]["watermark"]["mass"] / mark["mass"], below=0.4)
        holds(f"{method}, colour photos: how often 'not' is the top word", rule["methods"][method]["truth"]["negation"]["top1_rate"], above=0.6)
    assert film["methods"]["shapley"]["completeness_error"] < 1e-5
    assert film["methods"]["integrated_gradients"]["completeness_error"] < 0.05
    shares = rule["modality_share"]
    assert shares["image"]["mean"] + shares["text"]["mean"] == pytest.approx(1, abs=1e-3)
    holds("colour photos: mean |interaction| of the modality ablation", rule["modality_ablation"]["interaction"]["abs_mean"], above=0.1)  # FiLM combines the modalities


def test_every_method_runs_and_reports_quality(demo_models_untrained):
    adapter, data = demo_models_untrained
    result = _run(adapter, data, n_correct=6, max_errors=6, shapley_pairs=1, ig_steps=4, iba_steps=2, iba_copies=2, sanity_samples=4, batch_size=5)
    s = result.summary
    assert set(s["methods"]) == {"grad_x_input", "integrated_gradients", "occlusion", "shapley", "iba"}
    for name, m in s["methods"].items():
        assert 0 <= m["deletion_auc"] <= 1 and 0 <= m["insertion_auc"] <= 1
        assert m["sanity_rank_corr"] is not None and m["forward_passes"] > 0
        assert (m["completeness_error"] is None) == (name not in ("integrated_gradients", "shapley"))
        assert {"named_shape", "other_shape", "negation"} <= set(m["truth"])
    n = s["n_explained"]
    assert result.arrays["attr.shapley.true"].shape == (n, 64 + 9)


def test_the_captum_methods_and_the_kernel_estimator_run_in_the_stage(demo_models_untrained):
    adapter, data = demo_models_untrained
    methods = ["shapley_kernel", "lime", "kernel_shap", "grad_cam", "smoothgrad"]
    result = _run(adapter, data, methods=methods, n_correct=4, max_errors=4, shapley_pairs=1, smoothgrad_samples=2, sanity_samples=3, batch_size=5)
    s = result.summary["methods"]
    assert list(s) == methods
    for name, m in s.items():
        assert 0 <= m["deletion_auc"] <= 1 and m["sanity_rank_corr"] is not None and m["forward_passes"] > 0
        assert (m["completeness_error"] is None) == (name not in ("shapley_kernel", "kernel_shap"))
    assert s["shapley_kernel"]["completeness_error"] < 1e-5  # exact additivity
    n = result.summary["n_explained"]
    assert (result.arrays["attr.grad_cam.pred"][:, 64:] == 0).all() and result.arrays["attr.grad_cam.pred"].shape == (n, 64 + 9)
    with pytest.raises(MmdiagError, match="lrp has no rule for the model's layer 'text' \\(MeanPool\\)"):
        _run(adapter, data, methods=["lrp"], n_correct=2, max_errors=2, sanity_samples=0)
    with pytest.raises(MmdiagError, match="deeplift does not hold on this model"):
        _run(adapter, data, methods=["deeplift"], n_correct=2, max_errors=2, sanity_samples=0)


@pytest.fixture(scope="module")
def demo_models_untrained():
    from mmdiag.pipeline.demo.models import FiLMNet, demo_adapter

    torch.manual_seed(0)
    return demo_adapter(FiLMNet().eval()), shapes.split("ood", n=60)


class LogSum(torch.nn.Module):
    def forward(self, x):
        total = x["a"].sum(1) + x["b"].sum(1)
        return torch.stack([torch.log(total), -torch.log(total)], 1)


def _tabular(n=6, positive=True):
    g = torch.Generator().manual_seed(0)
    a = torch.rand(n, 2, generator=g) + (1 if positive else 0)
    return SampleSet(inputs={"a": a, "b": torch.rand(n, 2, generator=g) + 1}, labels=torch.tensor([0, 1] * (n // 2)), class_names=["x", "y"])


def test_non_finite_outputs_are_skipped_and_reported():
    # removing every unit makes the sum 0 and log(0) = -inf: Shapley values are not finite
    adapter = TorchAdapter(LogSum(), ("a", "b"), units={"a": FeatureGroups([0, 1]), "b": FeatureGroups([0, 1])})
    result = _run(adapter, _tabular(), methods=["shapley", "grad_x_input"], n_correct=6, sanity_samples=0, curve_points=2)
    skipped = result.summary["skipped"]
    assert len(skipped) == result.summary["n_explained"] and skipped[0]["reason"].startswith("non-finite")
    assert result.summary["methods"]["shapley"]["deletion_auc"] is None  # no figure from no samples
    import json

    json.dumps(result.summary, allow_nan=False)  # what the run store writes


def test_bad_settings_and_samples():
    with pytest.raises(Exception, match="methods"):
        UnimodalConfig(methods=["saliency_magic"])
    adapter = TorchAdapter(LogSum(), ("a", "b"), units={"a": FeatureGroups([-1, -1]), "b": FeatureGroups([0, 1])})
    with pytest.raises(MmdiagError, match="no units in modality 'a'"):
        _run(adapter, _tabular(), methods=["grad_x_input"], sanity_samples=0)
    data = _tabular()
    data.truth = {"audio": {"voice": torch.ones(6, 2, dtype=torch.bool)}}
    good = TorchAdapter(LogSum(), ("a", "b"), units={"a": FeatureGroups([0, 1]), "b": FeatureGroups([0, 1])})
    with pytest.raises(MmdiagError, match="data.truth: modality 'audio'"):
        _run(good, data, methods=["grad_x_input"], sanity_samples=0)
