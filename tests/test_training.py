"""Training: determinism, the weights cache, and the planted bugs showing up in the models."""

import json

import pytest
import torch

from mmdiag.pipeline.demo import shapes
from mmdiag.pipeline.demo.models import demo_adapter
from mmdiag.pipeline.demo.train import TrainConfig, load_or_train, train
from mmdiag.pipeline.store import fingerprint_module

from ranges import holds, measured

SMALL = TrainConfig(arch="film", n_train=512, epochs=1, batch_size=64)


def test_same_seed_same_weights_and_the_cache(tmp_path):
    a = train(SMALL, progress=False)
    b = train(SMALL, progress=False)
    assert fingerprint_module(a) == fingerprint_module(b)
    assert fingerprint_module(train(SMALL.model_copy(update={"seed": 5}), progress=False)) != fingerprint_module(a)
    first, hit1 = load_or_train(SMALL, cache=tmp_path)
    second, hit2 = load_or_train(SMALL, cache=tmp_path)
    assert (hit1, hit2) == (False, True)
    assert fingerprint_module(first) == fingerprint_module(second) == fingerprint_module(a)
    assert SMALL.key() != SMALL.model_copy(update={"p_mark": 0.5}).key()


def _accuracy(model, split, photos: str = "all"):
    """Accuracy on a split's `photos` ("all", "colour" or "grey"): overall, where the mark agrees
    with the label, where it disagrees."""
    data = shapes.split(split)
    with torch.no_grad():
        correct = demo_adapter(model)(data.inputs).argmax(1) == data.labels
    grey = data.meta["grey"] == 1
    where = {"all": torch.ones_like(grey), "colour": ~grey, "grey": grey}[photos]
    agrees = data.meta["shortcut_agrees"] == 1
    return correct[where].float().mean().item(), correct[where & agrees].float().mean().item(), correct[where & ~agrees].float().mean().item()


@pytest.mark.slow
@pytest.mark.trained
def test_film_learns_the_shortcut_on_grey_photos_and_the_rule_on_colour_ones(demo_models):
    """By construction: on grey photos only the mark tells the label, on colour photos only the
    rule does (the mark says nothing there in training)."""
    film = demo_models("demo-film").module
    _, agree, disagree = _accuracy(film, "ood", "grey")
    holds("grey photos: accuracy where the mark agrees", agree, above=0.95)
    holds("grey photos: accuracy where the mark disagrees", disagree, below=0.05)
    acc, agree, disagree = _accuracy(film, "ood", "colour")
    holds("colour photos: accuracy", acc, above=0.9)
    holds("colour photos: |agrees - disagrees|", abs(agree - disagree), below=0.05)
    holds("anti: accuracy", _accuracy(film, "anti")[0], below=0.9)
    _quote(film)


def _quote(model) -> None:
    """The README's demo table: ood accuracy, where the mark agrees / disagrees, anti."""
    acc, agree, disagree = _accuracy(model, "ood")
    measured("table: ood", acc), measured("table: ood, mark agrees", agree), measured("table: ood, mark disagrees", disagree)
    measured("table: anti", _accuracy(model, "anti")[0])


@pytest.mark.slow
@pytest.mark.trained
def test_late_fusion_learns_only_the_shortcut(demo_models):
    acc, agree, disagree = _accuracy(demo_models("demo-late").module, "ood")
    holds("ood: |accuracy - 0.5|", abs(acc - 0.5), below=0.08)
    holds("ood: accuracy where the mark agrees", agree, above=0.95)
    holds("ood: accuracy where the mark disagrees", disagree, below=0.2)
    holds("anti: accuracy", _accuracy(demo_models("demo-late").module, "anti")[0], below=0.55)
    _quote(demo_models("demo-late").module)


@pytest.mark.slow
@pytest.mark.trained
def test_the_fixed_data_gives_the_rule_where_it_can_be_seen(demo_models):
    clean = demo_models("demo-film-clean").module
    acc, agree, disagree = _accuracy(clean, "anti", "colour")
    holds("anti, colour photos: accuracy", acc, above=0.9)
    holds("anti, colour photos: |agrees - disagrees|", abs(agree - disagree), below=0.05)
    acc, agree, disagree = _accuracy(clean, "anti", "grey")  # the colour cannot be seen: chance
    holds("anti, grey photos: |accuracy - 0.5|", abs(acc - 0.5), below=0.12)
    _quote(clean)


@pytest.mark.slow
@pytest.mark.trained
def test_demo_writes_both_run_folders(demo_models, tmp_path, capsys):
    from mmdiag.flows.cli import main

    demo_models("demo-film"), demo_models("demo-late"), demo_models("demo-film-clean")  # trained into the session's cache (--fix retrains the clean one)
    assert main(["demo", "--out", str(tmp_path), "--fix", "--quick"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[:4] == [str(tmp_path / r / f) for r in ("demo-film", "demo-late") for f in ("summary.json", "report.html")]
    assert "beside" not in err  # --fix: the models one by one
    for name in ("demo-film", "demo-late"):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        run = json.loads((tmp_path / name / "run.json").read_text())
        model = summary["model"]
        assert summary["schema"] == "mmdiag.summary/1" and summary["run"]["name"] == name
        assert model["split"] == "ood" and model["n"] == 2000
        assert model["n_errors"] == round(model["n"] * (1 - model["accuracy"]))
        assert set(model["splits"]) == {"iid", "ood", "anti"}
        assert model["splits"]["ood"]["accuracy"] == model["accuracy"]
        where = {s["where"]: s for s in model["slices"]}
        agree, disagree = where["shortcut_agrees=1"], where["shortcut_agrees=0"]
        assert agree["n"] + disagree["n"] == 2000
        holds(f"{name}: accuracy where the mark agrees - where it disagrees", agree["accuracy"] - disagree["accuracy"], above=0.1)
        assert run["model"]["weights_from_cache"] is True  # trained by the fixtures already
        assert run["data"]["ood"]["n"] == 2000 and run["model"]["fingerprint"] == model["fingerprint"]
        assert summary["unimodal"]["n_explained"] == 20 and set(summary["unimodal"]["methods"]) == {"grad_x_input", "shapley"}
        assert (tmp_path / name / "stages" / "unimodal" / "arrays.safetensors").exists()
        cross = summary["crossmodal"]
        assert cross["n_reference"] == 40 and cross["n_explained"] == 20
        assert len(list((tmp_path / name / "graphs").glob("*.graphml"))) == 20
        assert "graphs" in json.loads((tmp_path / name / "stages" / "crossmodal" / "result.json").read_text())["details"]
        holds(f"{name}: probe accuracy of negation on the text layer", summary["representation"]["probes"]["negation"]["text"]["accuracy"], above=0.95)
        holds(f"{name}: composition fidelity", summary["composition"]["fidelity"], above=0.9)
        assert summary["errors"]["n"] == model["n_errors"] and sum(summary["errors"]["categories"].values()) == model["n_errors"]
        html = (tmp_path / name / "report.html").read_text()
        assert html.startswith("<!DOCTYPE html>") and "demo" in html and 'id="intervention"' in html
        # every sample is intervened on; every error whose prediction follows the mark against
        # the label is a shortcut error by construction (both models' errors are mostly that)
        assert summary["intervention"]["n"] == 2000
        cards = json.loads((tmp_path / name / "errors.json").read_text())["cards"]
        ood = shapes.split("ood")
        follows = [c for c in cards if int(ood.meta["watermark"][c["row"]]) != int(ood.labels[c["row"]])]
        holds(f"{name}: share of errors that follow the mark", len(follows) / len(cards), above=0.9)
        holds(f"{name}: share of those carded shortcut", sum(c["category"] == "shortcut" for c in follows) / len(follows), above=0.9)
        holds(f"{name}: share of errors undetermined", summary["errors"]["categories"]["undetermined"] / model["n_errors"], below=0.05)
        mark = summary["intervention"]["regions"]["image.watermark"]
        # demo-film follows the mark on grey photos (a quarter): by construction about 0.25
        holds(f"{name}: the mark's flip effect, low end", mark["flip_effect"]["low"], above=0.15)
        holds(f"{name}: null flip rate of the mark's size", mark["null_flip_rate"]["value"], below=0.05)
    # the top suggestion names each model's bug
    top = {name: json.loads((tmp_path / name / "summary.json").read_text())["suggestions"][0] for name in ("demo-film", "demo-late")}
    assert top["demo-film"]["action"]["kind"] == "decorrelate" and top["demo-film"]["action"]["concept"] == "watermark"
    assert top["demo-late"]["action"]["kind"] == "interaction_fusion"
    # --fix: demo-film retrained with the mark decorrelated, diagnosed again, and compared
    before, after = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("demo-film", "demo-film-fixed"))
    assert after["model"]["name"] == "demo-film-clean"
    # on grey photos the fixed model is at chance instead of following the mark: anti gains a
    # quarter of (0.5 - 0.2), ood's samples where the mark disagrees a quarter of (0.5 - 0)
    holds("fix: anti accuracy gained", after["model"]["splits"]["anti"]["accuracy"] - before["model"]["splits"]["anti"]["accuracy"], above=0.03)
    disagree = lambda s: next(d["accuracy"] for d in s["errors"]["disagreement"] if d["concept"] == "watermark")  # noqa: E731
    holds("fix: accuracy gained where the mark disagrees", disagree(after) - disagree(before), above=0.06)
    mark = lambda s: s["unimodal"]["methods"]["shapley"]["truth"]["watermark"]["mass"]  # noqa: E731
    holds("fix: the mark's Shapley mass after / before", mark(after) / mark(before), below=0.65)  # 0.067-0.50 over 5 seeds x 4 settings
    assert not any(s["rule"] == "shortcut" for s in after["suggestions"])  # the fix removed the shortcut
    page = (tmp_path / "demo-film-fix.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "demo-film-fixed" in page


@pytest.mark.slow
def test_demo_side_by_side_gives_the_one_by_one_figures(demo_models, cache, tmp_path):
    """On a machine with a core or so a model, demo-late runs beside demo-film once demo-film has
    something to compute; each run folder has the figures a one-by-one run computes. Each mode in
    a process of its own, as users run it (side by side lowers the process's threads to one)."""
    import os
    import shutil
    import subprocess
    import sys

    from mmdiag.flows.hosting import side_by_side

    if not side_by_side.worth_it(2):
        pytest.skip(f"{side_by_side.cores()} cores: the models go one by one")
    from mmdiag.flows.flow import QUICK_STAGES

    demo_models("demo-film"), demo_models("demo-late")
    summaries = {}
    for mode, flags in (("beside", []), ("one by one", ["--one-by-one"])):
        fresh, runs = tmp_path / mode / "cache", tmp_path / mode / "runs"
        shutil.copytree(cache / "models", fresh / "models")  # nothing computed yet, the trained weights kept
        # quick stages on 300 samples: the two modes' figures must be equal, whatever they are
        driver = (
            f"import sys, mmdiag.flows.flow as f; made = f.demo_configs; "
            f"f.demo_configs = lambda *a, **k: [c.model_copy(update={{'stages': {QUICK_STAGES!r}, 'data': c.data.model_copy(update={{'n': 300}})}}) for c in made(*a, **k)]; "
            f"from mmdiag.flows.cli import main; sys.exit(main(['demo', '--out', {str(runs)!r}, *{flags!r}]))"
        )
        env = {**os.environ, "MMDIAG_CACHE": str(fresh), "PREFECT_HOME": str(fresh / "prefect")}
        done = subprocess.run([sys.executable, "-c", driver], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.splitlines() == [str(runs / r / f) for r in ("demo-film", "demo-late") for f in ("summary.json", "report.html")]
        assert ("demo-late: diagnosing beside demo-film, one thread each" in done.stderr) is (mode == "beside")
        if mode == "beside":  # both runs' lines, each with its run's name
            assert "demo-late: unimodal: 100%" in done.stderr and "demo-film: unimodal: 100%" in done.stderr
        summaries[mode] = {r: json.loads((runs / r / "summary.json").read_text()) for r in ("demo-film", "demo-late")}
    for r in ("demo-film", "demo-late"):
        a, b = summaries["beside"][r], summaries["one by one"][r]
        assert a["model"] == b["model"] and a["errors"]["categories"] == b["errors"]["categories"]
        assert [s["rule"] for s in a["suggestions"]] == [s["rule"] for s in b["suggestions"]]
        for m, share in a["unimodal"]["modality_share"].items():
            assert share["mean"] == pytest.approx(b["unimodal"]["modality_share"][m]["mean"], abs=1e-4)
