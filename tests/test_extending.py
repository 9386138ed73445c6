"""Extension points are registries: a method registered by a plugin module (tests/toy_method.py)
runs in stage 1 and stage 3's local view, its own settings are validated, its maps reach the
report, and its code is part of the cache keys."""

import json

import pytest
import torch

import mmdiag
from mmdiag.pipeline.registry import extensions
from mmdiag.stages import methods

import frozen_run

TOY = {"methods": ["leave_one_in", "grad_x_input"], "options": {"leave_one_in": {"scale": 2.0}}, "n_correct": 8, "max_errors": 8, "sanity_samples": 0}
STAGES = {**frozen_run.STAGES, "unimodal": TOY, "representation": {"local_method": "leave_one_in"}}


def test_a_registered_method_runs_in_stage_1_stage_3_and_the_report(tmp_path, cache):
    d = mmdiag.diagnose({"factory": "frozen_run:build_model"}, {"name": "shapes", "split": "ood", "n": 200}, plugins=["toy_method"],
                        stages=STAGES, out=tmp_path / "runs", cache=tmp_path / "cache")
    quality = d.summary["unimodal"]["methods"]["leave_one_in"]
    assert quality["deletion_auc"] is not None and quality["completeness_error"] is None  # it claims no completeness
    uni = d.stage("unimodal")
    toy, present = torch.from_numpy(uni.arrays["attr.leave_one_in.pred"]), torch.from_numpy(uni.arrays["present"]).bool()
    assert (toy[~present] == 0).all() and toy[present].abs().sum() > 0
    # the report reads the best-ranked method that ran (the toy ranks first): heatmap and cards
    html = (d.path / "report.html").read_text()
    assert "leave_one_in" in html and "Mean |attribution| on image (leave_one_in)" in html
    cards = json.loads((d.path / "errors.json").read_text())["cards"]
    assert {c["perception"]["method"] for c in cards if "method" in c.get("perception", {})} == {"leave_one_in"}
    assert d.summary["representation"]["local"]["method"] == "leave_one_in"
    # its own setting reaches it: half the scale, half the scores, from a rerun of stage 1 alone
    half = d.rerun("unimodal", options={"leave_one_in": {"scale": 1.0}})
    assert not half.summary["stages"]["unimodal"]["cached"]
    torch.testing.assert_close(2 * torch.from_numpy(half.stage("unimodal").arrays["attr.leave_one_in.pred"]), toy)


def test_registered_code_is_part_of_the_cache_keys():
    import toy_method

    before = extensions()
    assert before  # a record registered outside mmdiag
    methods.register(methods.Method("leave_one_in", lambda g, c: toy_method.leave_one_in(g, c), settings=toy_method.LeaveOneInSettings))
    try:
        assert extensions() != before
    finally:
        methods.register(methods.Method("leave_one_in", toy_method.leave_one_in, settings=toy_method.LeaveOneInSettings, local=True, cards=-1))
    assert extensions() == before


@pytest.mark.parametrize(("options", "message"), [
    ({"leave_one_in": {"scale": -1}}, "stages.unimodal.options.leave_one_in.scale: "),
    ({"grad_x_input": {"steps": 3}}, "stages.unimodal.options.grad_x_input: the method 'grad_x_input' has no settings of its own"),
    ({"magic": {}}, "stages.unimodal.options: 'magic' is not a registered attribution method"),
])
def test_a_methods_own_settings_are_checked(options, message):
    import toy_method  # noqa: F401

    from mmdiag.stages.unimodal import UnimodalConfig

    with pytest.raises(mmdiag.MmdiagError, match=message.replace(".", r"\.").replace("(", r"\(")):
        UnimodalConfig(options=options)
