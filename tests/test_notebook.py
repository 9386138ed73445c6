"""The Python API: `mmdiag.diagnose` runs the CLI's flow, with its cache, from a notebook."""

import json

import pytest
import yaml

import mmdiag
from mmdiag.flows.cli import main

import frozen_run

QUICK = {"unimodal": {"methods": ["grad_x_input"], "n_correct": 10, "max_errors": 10, "sanity_samples": 0}, "crossmodal": {"n_reference": 40}, "discovery": {"kinds": ["word"]}}


@pytest.mark.slow
def test_a_built_in_model_by_name_in_a_jupyter_kernel_then_the_cli_finds_every_stage_cached(tmp_path, cache, demo_models):
    """In a real kernel (an asyncio loop already running, as Jupyter has it): the call works, the
    cell's output is the inline summary, and the command line's run of the same config after it
    finds every stage in the cache."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    demo_models("demo-late")  # trained once for the session, into the shared weights cache
    settings = {"data": {"name": "shapes", "split": "ood", "n": 200}, "stages": QUICK, "out": str(tmp_path / "nb"), "cache": str(cache)}
    cell = f"import mmdiag\nd = mmdiag.diagnose(model='demo-late', **{settings!r})\nd"
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(cell)])
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = notebook.cells[0].outputs
    assert not [o for o in outputs if o.get("output_type") == "error"]
    html = next(o["data"]["text/html"] for o in outputs if o.get("output_type") == "execute_result")
    path = tmp_path / "nb" / "diagnosis"
    d = mmdiag.Diagnosis.load(path)
    assert d.summary == json.loads((path / "summary.json").read_text())
    assert len(d.errors) == d.summary["model"]["n_errors"] > 0
    # the inline summary names the run, its accuracy, its top suggestion and where the report is
    assert d.suggestions and d.suggestions[0]["title"].replace("'", "&#39;") in html
    assert f"{d.summary['model']['accuracy']:.3f}" in html and str(path / "report.html") in html and "<script" not in html
    # the same run from a config file: every stage comes from the notebook's cache
    config = tmp_path / "cli.yaml"
    config.write_text(yaml.safe_dump({"model": {"name": "demo-late"}, **settings, "out": str(tmp_path / "cli")}))
    assert main(["diagnose", "--config", str(config)]) == 0
    cli = json.loads((tmp_path / "cli" / "diagnosis" / "summary.json").read_text())
    assert all(stage["cached"] for stage in cli["stages"].values())


def test_objects_of_the_process_rerun_and_compare(tmp_path, cache):
    from mmdiag.pipeline.demo.catalog import load_data

    adapter, data = frozen_run.build_model(), load_data("shapes", "ood", 200, 0)
    d = mmdiag.diagnose(adapter, data, stages=frozen_run.STAGES, out=tmp_path / "runs", run="mine", cache=tmp_path / "cache")
    assert d.path == tmp_path / "runs" / "mine" and d.summary["model"]["n"] == 200 and d.config.data.split == "data"
    assert d.stage("unimodal").arrays and set(d.stages) >= {"model", "unimodal", "crossmodal", "intervention"}
    # the same objects again: their factories are named by content, so every stage is cached
    again = mmdiag.diagnose(adapter, data, stages=frozen_run.STAGES, out=tmp_path / "runs", run="again", cache=tmp_path / "cache")
    assert all(stage["cached"] for stage in again.summary["stages"].values())
    # one stage again with a changed setting, into a folder of its own: this run keeps its figures
    fewer = d.rerun("crossmodal", n_reference=20)
    assert fewer.path == tmp_path / "runs" / "mine-crossmodal" and d.summary["crossmodal"]["n_reference"] == 30
    assert not fewer.summary["stages"]["crossmodal"]["cached"] and fewer.summary["stages"]["unimodal"]["cached"]
    moved = {m["figure"]: m for m in d.compare(fewer)["moved"]}
    assert moved["crossmodal.n_reference"]["change"] == -10
    assert d.report(tmp_path / "copy.html").read_text() == (d.path / "report.html").read_text()
    saved = d.save(tmp_path / "kept")
    assert saved.summary == d.summary and (tmp_path / "kept" / "errors.json").is_file()


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: mmdiag.diagnose(42), "model: got int"),
        (lambda: mmdiag.diagnose("mypkg.diag:build"), "data: give the data"),
        (lambda: mmdiag.diagnose("demo-late", stages={"unimodal": {"methods": ["magic"]}}), "stages.unimodal.methods.0"),
        (lambda: mmdiag.diagnose("demo-late", sead=1), "sead"),
    ],
)
def test_bad_arguments_are_one_clear_error(call, field, cache):
    with pytest.raises(mmdiag.MmdiagError, match=field.replace(".", r"\.")):
        call()
