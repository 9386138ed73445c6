"""A stage's cache key is the hash of what it computed: timings travel beside the content, so
two runs of the same computation (other machine, other load) get equal keys and their readers
stay cached; the flow still reports the timings in summary.json."""

import torch

from mmdiag.flows import results
from mmdiag.pipeline.resolve import predict
from mmdiag.stages import Context, registry

import planted as pl
from inprocess import QUICK


def test_two_runs_of_every_timed_stage_save_under_one_key(tmp_path):
    world = pl.World(label=lambda c: c["colour"], spurious={"zz": 0.9})
    model = pl.train(world, steps=100)
    data = pl.samples(world, 80, seed=3)
    logits = predict(model, data, torch.device("cpu"))
    refs = {}
    for attempt in ("a", "b"):
        found = {}
        for name in ("unimodal", "crossmodal", "intervention"):
            stage = registry.get(name)
            found[name] = stage.run(Context(model, data, torch.device("cpu"), 0, logits), stage.config.model_validate(QUICK[name]), found)
        refs[attempt] = {name: results.save(tmp_path / attempt, r) for name, r in found.items()}
    for name in ("unimodal", "crossmodal", "intervention"):
        assert refs["a"][name]["sha256"] == refs["b"][name]["sha256"], name
    loaded, meta = results.load(refs["b"]["unimodal"], tmp_path / "b")
    assert meta["timings"]["methods"]["shapley"]["seconds"] > 0
    assert loaded.summary["methods"]["shapley"]["seconds"] == meta["timings"]["methods"]["shapley"]["seconds"]  # summary.json keeps them
    cross, _ = results.load(refs["b"]["crossmodal"], tmp_path / "b")
    assert {"seconds", "forward_passes"} <= set(cross.summary["methods"]["mixed_gradients"])
