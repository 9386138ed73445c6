"""The report renders with any subset of stages, is self-contained and small, escapes every
string from the data, and the compare page shows what a fix changed."""

import json
import re
from itertools import combinations
from pathlib import Path

import pytest

from mmdiag.reports import analyse, figures, render, render_compare

import report_fixtures as fx

SUBSETS = [s for k in range(len(fx.STAGES) + 1) for s in combinations(fx.STAGES, k)]


def external_references(html: str) -> list[str]:
    """Every src/href/url() that is not a data: URI or an in-page anchor."""
    refs = re.findall(r'(?:src|href)\s*=\s*["\']?([^"\'\s>]+)', html) + re.findall(r"url\(([^)]*)\)", html)
    return [r for r in refs if not r.startswith(("data:", "#"))]


@pytest.fixture
def quick_figures(monkeypatch):
    """Charts are built but not drawn: the subset tests check the page, not matplotlib."""
    monkeypatch.setattr(figures, "png", lambda fig: "data:image/png;base64,")


@pytest.mark.parametrize("stages", SUBSETS, ids=lambda s: "+".join(s) or "model-only")
def test_renders_with_any_subset_of_stages(stages, quick_figures):
    summary, results, data = fx.run("shortcut", stages=stages)
    analysis = analyse(summary, results, data)
    html = render(summary, results, data, analysis, fx.provenance(summary))
    for stage in fx.STAGES:
        assert (f'<section id="{stage}">' in html) == (stage in stages)
    assert 'id="gallery"' in html and 'id="provenance"' in html
    assert html.count('<article class="err"') == analysis["errors"]["n"]
    assert external_references(html) == []


def test_full_report_is_self_contained_small_and_complete(tmp_path):
    summary, results, data = fx.run("shortcut")
    analysis = analyse(summary, results, data)
    html = render(summary, results, data, analysis, fx.provenance(summary))
    assert external_references(html) == []
    assert 'http-equiv="Content-Security-Policy" content="default-src &#39;none&#39;' in html
    assert len(html.encode()) < 2_000_000
    assert html.count("data:image/png;base64,") >= 2 * analysis["errors"]["n"]  # image + heatmap per error
    top = analysis["suggestions"][0]
    assert f'id="{top["id"]}"' in html and top["title"] in html
    assert "<svg" in html and "filter-slice" in html and "filter-category" in html
    # thumbnails are the image's own size, not upscaled arrays
    thumbs = re.findall(r'class="px" src="(data:[^"]+)"', html)
    assert thumbs and max(map(len, thumbs)) < 4000


def test_every_data_string_is_escaped():
    data = fx.attacked_data()
    summary, results, _ = fx.run("shortcut", data=data)
    analysis = analyse(summary, results, data)
    html = render(summary, results, data, analysis, fx.provenance(summary))
    assert "<script>window.__pwned" not in html and "<img src=x" not in html and "no<b>" not in html
    assert "&lt;script&gt;window.__pwned=1" in html and "no&lt;b&gt;" in html and "yes&amp;" in html
    assert html.count("<script>") == 1  # the page's own


def test_unknown_modality_shows_unit_bars(quick_figures):
    import numpy as np
    import torch

    summary, results, data = fx.run("shortcut", stages=("unimodal",))
    data.inputs["image"] = torch.zeros(len(data), 16)  # a vector modality: no grid, no tokens
    del data.truth["image"]
    html = render(summary, results, data, analyse(summary, results, data), fx.provenance(summary))
    assert 'aria-label="image unit attributions"' in html
    assert np.isfinite(results["unimodal"].arrays["attr.shapley.pred"]).all()


def _write_run(folder: Path, summary: dict) -> Path:
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "run.json").write_text(json.dumps({"config": {}}))
    return folder


def test_compare_page_shows_the_fix(tmp_path):
    from mmdiag.flows.rerun import compare

    runs = {}
    for name, scenario in (("before", "shortcut"), ("after", "clean")):
        summary, results, data = fx.run(scenario)
        analysis = analyse(summary, results, data)
        summary["errors"] = {k: v for k, v in analysis["errors"].items() if k != "cards"}
        summary["suggestions"] = analysis["suggestions"]
        runs[name] = (summary, _write_run(tmp_path / name, summary))
    diff = compare(runs["before"][1], runs["after"][1])
    html = render_compare(runs["before"][0], runs["after"][0], diff)
    assert external_references(html) == []
    assert "Shortcut: the model follows mark" in html
    assert "mark≠label" in html and 'id="moved"' in html
    row = re.search(r"<td>mark≠label</td><td class=\"n\">([\d.]+)</td><td class=\"n\">([\d.]+)</td>", html)
    assert row and float(row.group(2)) > float(row.group(1)) + 0.3


def test_renders_without_provenance(quick_figures):
    summary, results, data = fx.run("clean", stages=("unimodal",))
    html = render(summary, results, data, analyse(summary, results, data), {})
    assert 'id="provenance"' in html and "fixture-model" in html


def test_model_only_report_draws_its_figures():
    summary, results, data = fx.run("shortcut", stages=())
    html = render(summary, results, data, analyse(summary, results, data), fx.provenance(summary))
    assert html.count('alt="Error categories"') == 1 and html.count('alt="Error slices"') == 1


@pytest.mark.parametrize("shape, grid", [((1, 28, 28), (7, 7)), ((3, 224, 224), (14, 14)), ((3, 32, 48), None)])
def test_thumbnails_are_small_for_any_image(shape, grid):
    import base64
    import io

    import numpy as np
    from matplotlib.image import imread

    x = np.random.default_rng(0).random(shape).astype(np.float32)
    heat = None if grid is None else np.random.default_rng(1).normal(size=grid)
    thumbs = figures.thumbnails(x, heat)
    assert (thumbs["overlay"] is None) == (grid is None)
    pixels = imread(io.BytesIO(base64.b64decode(thumbs["raw"].split(",", 1)[1])), format="png")
    assert max(pixels.shape[:2]) <= figures.THUMB and pixels.shape[2] in (3, 4)


def test_a_lone_surrogate_in_a_caption_is_replaced_not_a_failed_write(tmp_path):
    from mmdiag.pipeline.store import write_text

    data = fx.make_data()
    first_error = (fx.predictions(data, "shortcut") != data.labels.numpy()).nonzero()[0][0]
    data.display["caption"][first_error] = "the circle \ud800 is red"
    summary, results, _ = fx.run("shortcut", data=data)
    html = render(summary, results, data, analyse(summary, results, data), fx.provenance(summary))
    page = write_text(tmp_path / "report.html", html)
    assert "\ufffd" in page.read_text(encoding="utf-8")


def test_charts_drawn_before_are_taken_from_the_store_and_give_the_same_page(tmp_path, monkeypatch):
    from mmdiag.flows.cache import FigureStore

    summary, results, data = fx.run("shortcut")
    analysis = analyse(summary, results, data)
    store = FigureStore(tmp_path / "figures")
    with figures.remembered(store):
        first = render(summary, results, data, analysis, fx.provenance(summary))
    assert len(store) >= 5
    monkeypatch.setattr(figures, "png", lambda fig: pytest.fail("a remembered chart was drawn again"))
    with figures.remembered(store):
        assert render(summary, results, data, analysis, fx.provenance(summary)) == first
    damaged = next(iter(store))
    (tmp_path / "figures" / f"{damaged}.txt").write_text("data:image/png;base64,AAAA")  # not a PNG: drawn again
    monkeypatch.undo()
    with figures.remembered(store):
        assert render(summary, results, data, analysis, fx.provenance(summary)) == first
