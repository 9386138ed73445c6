"""Extension points are registries: a method registered by a plugin module (tests/toy_method.py)
runs in stage 1 and stage 3's local view, its own settings are validated, its maps reach the
report, and its code is part of the cache keys; the per-error rule and the finding that
docs/extending.md shows (tests/toy_rules.py) reach the cards and the suggestions; a plugin stage
shows its own report section."""

import json

import pytest
import torch

import mmdiag
from mmdiag.stages import methods

import frozen_run

TOY = {"methods": ["leave_one_in", "grad_x_input"], "options": {"leave_one_in": {"scale": 2.0}}, "n_correct": 8, "max_errors": 8, "sanity_samples": 0}
STAGES = {**frozen_run.STAGES, "unimodal": TOY, "representation": {"local_method": "leave_one_in"}}


def test_a_registered_method_rule_and_finding_reach_the_stages_cards_suggestions_and_report(tmp_path, cache, monkeypatch):
    import importlib
    import re
    from pathlib import Path

    from mmdiag.reports import evidence, suggest

    doc = (Path(__file__).parent.parent / "docs" / "extending.md").read_text()
    source = (Path(__file__).parent / "toy_rules.py").read_text()
    examples = [b for b in re.findall(r"```python\n(.*?)```", doc, re.S) if "RULES.register" in b or "FINDINGS.register" in b]
    assert len(examples) == 2 and all(b in source for b in examples)  # what the page shows is what runs here
    for registry in (evidence.RULES, suggest.FINDINGS):  # this test's registrations stay in it
        monkeypatch.setattr(registry, "_records", dict(registry._records))
    import toy_rules

    importlib.reload(toy_rules)
    # the frozen network with its logits scaled: the same predictions, each made with near certainty
    d = mmdiag.diagnose(
        {"factory": "toy_rules:overconfident_model"}, {"name": "shapes", "split": "ood", "n": 200}, plugins=["toy_method"], stages=STAGES, out=tmp_path / "runs", cache=tmp_path / "cache"
    )
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
    assert d.errors
    checked = 0
    for card in d.errors:  # the rules are tried until one is the cause
        order = [c["rule"] for c in card["checked"]]
        if "perception" in order:  # in its place, just ahead of perception
            assert order.index("low_margin") + 1 == order.index("perception")
        for mine in (c for c in card["checked"] if c["rule"] == "low_margin"):
            assert mine["fired"] == (mine["figures"]["margin"] < 0.05) and card["category"] != "low_margin"  # an association: never the cause
            checked += 1
    assert checked
    # the errors are made with near certainty: the calibration finding fires, with its own figures
    found = next(s for s in d.suggestions if s["rule"] == "overconfident")
    sure = d.summary["model"]["n_errors"] / d.summary["model"]["n"]
    assert found["title"] == "Calibrate the model" and found["figures"]["error_rate"] > found["figures"]["expected"]
    assert abs(found["figures"]["error_rate"] - sure) < 0.05  # nearly every prediction is a confident one


def test_registered_code_is_part_of_the_cache_keys_of_what_runs_it():
    from mmdiag.stages import registry

    import toy_method

    unimodal = registry.get("unimodal").extensions
    mine, builtin = {"methods": ["leave_one_in", "shapley"]}, {"methods": ["shapley", "occlusion"]}
    before = unimodal(mine)
    assert before and unimodal(builtin) == ""  # mmdiag's own methods: their modules are in the key already
    methods.register(methods.Method("leave_one_in", lambda g, c: toy_method.leave_one_in(g, c), settings=toy_method.LeaveOneInSettings))
    try:
        assert unimodal(mine) != before and unimodal(builtin) == ""  # an edit reruns what runs it, nothing else
    finally:
        methods.register(methods.Method("leave_one_in", toy_method.leave_one_in, settings=toy_method.LeaveOneInSettings, local=True, cards=-1))
    assert unimodal(mine) == before


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"leave_one_in": {"scale": -1}}, "stages.unimodal.options.leave_one_in.scale: "),
        ({"grad_x_input": {"steps": 3}}, "stages.unimodal.options.grad_x_input: the method 'grad_x_input' has no settings of its own"),
        ({"magic": {}}, "stages.unimodal.options: 'magic' is not a registered attribution method"),
    ],
)
def test_a_methods_own_settings_are_checked(options, message):
    from mmdiag.stages.unimodal import UnimodalConfig

    import toy_method  # noqa: F401

    with pytest.raises(mmdiag.MmdiagError, match=message.replace(".", r"\.").replace("(", r"\(")):
        UnimodalConfig(options=options)


SECTION = """
from pathlib import Path

from mmdiag.reports import sections

sections.SECTIONS.register(sections.Section(
    "third", "Doubling", lambda summary, results, ev: {"doubled": summary["third"]["doubled"], "margins": len(results["first"].arrays["margin"])},
    Path(__file__).with_name("third.html.j2")))
"""


def test_a_plugin_stage_contributes_a_report_section(toy, tmp_path, monkeypatch):
    from mmdiag.flows.cli import main
    from mmdiag.reports import sections

    cfg, run, _ = toy
    monkeypatch.setattr(sections, "SECTIONS", sections.Registry("report section", "report sections"))  # this test's registrations stay in it
    (tmp_path / "toy_section.py").write_text(SECTION)
    (tmp_path / "third.html.j2").write_text('<section id="{{ name }}"><h2>{{ title }}</h2><p>doubled: {{ section.doubled|num }} over {{ section.margins }} margins</p></section>\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg.write_text(cfg.read_text().replace("plugins: [toy_stages]", "plugins: [toy_stages, toy_section]"))
    assert main(["diagnose", "--config", str(cfg)]) == 0
    html, summary = (run / "report.html").read_text(), json.loads((run / "summary.json").read_text())
    assert '<a href="#third">Doubling</a>' in html  # in the navigation
    assert f'<section id="third"><h2>Doubling</h2><p>doubled: {summary["third"]["doubled"]:.3f} over 300 margins</p></section>' in html


def test_mmdiag_stages_lists_every_registry_with_the_plugins_registrations(capsys):
    from mmdiag.flows.cli import main

    assert main(["stages", "--plugins", "toy_method"]) == 0
    out = capsys.readouterr().out.splitlines()
    listed = {line.split(": ", 1)[0]: line.split(": ", 1)[1].split(", ") for line in out if line.split(": ", 1)[0].endswith(("methods", "tried", "rules", "sections"))}
    assert "leave_one_in" in listed["attribution methods"] and "shapley" in listed["attribution methods"]
    assert listed["per-error rules, in the order tried"][:4] == ["prior", "shortcut", "ignored_modality", "label"]
    assert "label_noise" in listed["finding rules"] and listed["report sections"][0] == "discovery"
    assert main(["stages", "--plugins", "no_such_module"]) == 2
    assert "plugins: cannot import 'no_such_module'" in capsys.readouterr().err
