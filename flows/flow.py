"""The diagnosis flow: model -> evaluation -> every registered stage -> the run folder.

All file I/O of a run happens here, after the tasks: the run folder is assembled from the
stages' result references and swapped in whole (pipeline.store.new_run).
"""

from __future__ import annotations

import logging
import os
import platform
import signal
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mmdiag.flows import summary as summary_types
from mmdiag.flows.hosting.server import TemporaryServer
from mmdiag.flows.hosting.settings import configure, quiet_user_errors
from mmdiag.flows.hosting.watchdog import watch_this_process
from mmdiag.flows.plan import RunPlan, resolve
from mmdiag.pipeline.config import DiagConfig, ModelSpec
from mmdiag.pipeline.errors import MmdiagError
from mmdiag.pipeline.paths import writable
from mmdiag.pipeline.store import SUMMARY_SCHEMA, cache_root, clean_stale, new_run, write_text
from mmdiag.stages import extended, registry

log = logging.getLogger("mmdiag")


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("mmdiag", "torch", "lightning", "prefect", "captum", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def gpu_tags(device: str) -> list[str]:
    """The tags of the tasks that use the device: `gpu` on a GPU, where a Prefect tag
    concurrency limit (`prefect concurrency-limit create gpu 1`) can keep tasks from sharing its
    memory; none on a CPU, where a tagged task would ask the server for a slot at every start
    (0.3-0.6 s each on a 2-core machine, 12 tasks in `mmdiag demo`) for nothing."""
    return ["gpu"] if device == "cuda" else []


def _flow_body(plan: RunPlan, refresh: list[str], stage_model: dict | None) -> str:
    from prefect.artifacts import create_markdown_artifact

    from mmdiag.flows import results, tasks

    config, cache, settings, device, data = plan.config, plan.cache, plan.settings, plan.device, plan.data
    prepared = tasks.prepare_model(config.model.model_dump_json(), str(cache), device)
    model = {k: prepared[k] for k in ("spec", "fingerprint", "setup")}  # what the results depend on
    common = dict(seed=config.seed, device=device, cache=str(cache), plugins=config.plugins)
    evaluation = tasks.evaluate.with_options(tags=gpu_tags(device))(model, data, config.data.split, config.batch_size, device, str(cache), refresh="model" in refresh, return_state=True)
    refs: dict[str, dict] = {"model": evaluation.result()}  # with meta; results.content() for inputs
    status = {"model": _status(evaluation.name == "Cached", refs["model"], model["fingerprint"])}
    for stage in registry.stages():
        stage_task = tasks.run_stage.with_options(name=stage.name, tags=gpu_tags(device))
        upstream = {r: results.content(refs[r]) for r in stage.reads}
        inputs = dict(
            settings=settings[stage.name],
            data=plan.analysed,
            evaluation=results.content(refs["model"]),
            upstream=upstream,
            **common,
        )
        if not (stage_model and stage.name == stage_model["stage"]):
            refs[stage.name], cached = _compute(stage, stage_task, model, {**inputs, "refresh": stage.name in refresh}, config.runner.shards, cache)
            status[stage.name] = _status(cached, refs[stage.name], model["fingerprint"])
        else:
            # `rerun --model`: this stage alone is computed again for the new model; the others
            # keep the results they have for the old one, and the run says so.
            new = {k: v for k, v in tasks.prepare_model(stage_model["spec"], str(cache), device).items() if k != "weights_from_cache"}
            refs[stage.name], cached = _compute(stage, stage_task, new, inputs, config.runner.shards, cache)
            status[stage.name] = _status(cached, refs[stage.name], new["fingerprint"])

    loaded = {name: results.load(ref, cache / "results") for name, ref in refs.items()}
    summary = _summary(config, device, loaded, status)
    path = _write_run(plan, summary, loaded, status, prepared, tasks.data_for(plan.analysed))
    from mmdiag.flows.cache import register_run

    register_run(cache, path)
    create_markdown_artifact(key=_artifact_key(config.run), markdown=_markdown(summary, path), description="mmdiag run")
    return str(path)


def _compute(stage, stage_task, model: dict, inputs: dict, shards: int, cache: Path) -> tuple[dict, bool]:
    """(result reference, came from cache): one task, or one mapped task per shard of the
    samples (spread over the task runner's workers) and their merge."""
    from prefect import unmapped

    from mmdiag.flows.tasks import merge_shards

    if shards == 1 or stage.merge is None:
        state = stage_task(stage.name, model=model, return_state=True, **inputs)
        return state.result(), state.name == "Cached"
    static = {k: unmapped(v) for k, v in inputs.items()}
    futures = stage_task.map(unmapped(stage.name), model=unmapped(model), shard=[[i, shards] for i in range(shards)], **static)
    parts = [f.result() for f in futures]
    return merge_shards(stage.name, parts, cache), all(f.state.name == "Cached" for f in futures)


def _status(cached: bool, ref: dict, model_fingerprint: str) -> dict:
    # key: the content hash of the result; equal keys mean the same figures and arrays
    parts = {"parts": ref["meta"]["parts"]} if "parts" in ref.get("meta", {}) else {}
    return {"cached": cached, "key": ref["sha256"][:16], "sha256": ref["sha256"], "model": model_fingerprint, **parts}


def _summary(config: DiagConfig, device: str, loaded: dict, status: dict) -> dict:
    model_block = loaded["model"][0].summary
    fingerprints = {s["model"] for s in status.values()}
    summary = {
        "schema": SUMMARY_SCHEMA,
        "run": {"name": config.run, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device},
        "model": {"name": config.model.name or config.model.factory, "fingerprint": status["model"]["model"], **model_block},
    }
    for name, (result, _) in loaded.items():
        if name != "model":
            summary[name] = result.summary
    summary["stages"] = {name: {"seconds": loaded[name][1].get("seconds"), **{k: v for k, v in st.items() if k not in ("sha256", "parts")}} for name, st in status.items()}
    if len(fingerprints) > 1:
        summary["run"]["mixed_models"] = "stages were computed for different models: " + ", ".join(f"{n}: {s['model']}" for n, s in status.items())
    return summary


def _write_run(plan: RunPlan, summary, loaded, status, model, analysed) -> Path:
    """The run folder: every stage's result, the error analysis and suggestions (into
    summary.json), errors.json (one evidence card per error), label_issues.csv (the likely label
    mistakes, most likely first) and report.html."""
    from mmdiag import reports

    config, data = plan.config, plan.data
    provenance = {
        "created": summary["run"]["created"],
        "config": config.model_dump(mode="json"),
        "model": {"fingerprint": model["fingerprint"], "weights_from_cache": model.get("weights_from_cache")},
        "data": {s: {"fingerprint": r["fingerprint"], "n": r["n"]} for s, r in data.items()},
        "device": summary["run"]["device"],
        "versions": versions(),
        "stages": {name: {**st, "seconds": loaded[name][1].get("seconds")} for name, st in status.items()},
    }
    start = time.perf_counter()
    stage_results = {name: result for name, (result, _) in loaded.items()}
    analysed = extended(analysed, stage_results)  # the features discovery found, as concepts
    from mmdiag.flows.cache import FigureStore, remembered_analysis
    from mmdiag.flows.tasks import code_version
    from mmdiag.reports import evidence, suggest
    from mmdiag.reports.figures import remembered

    extensions = evidence.RULES.fingerprint() + suggest.FINDINGS.fingerprint()  # the rules and findings plugins registered
    inputs = [
        code_version(packages=("reports", "stages"), extensions=extensions),
        {k: v for k, v in summary.items() if k not in ("run", "stages")},
        {name: st["sha256"] for name, st in status.items()},
        analysed.fingerprint(),
        config.seed,
    ]
    analysis = remembered_analysis(plan.cache / "analyses", inputs, lambda: reports.analyse(summary, stage_results, analysed, seed=config.seed))
    summary["errors"] = {k: v for k, v in analysis["errors"].items() if k not in ("cards", "label_issues")}
    summary["suggestions"] = analysis["suggestions"]
    summary_types.check(summary)  # as docs/summary-json.md says, before anything is written
    with remembered(FigureStore(plan.cache / "figures")):  # a chart drawn before is not drawn again
        html = reports.render(summary, stage_results, analysed, analysis, provenance)
    seconds = round(time.perf_counter() - start, 3)
    with new_run(config.out, config.run) as store:
        for name, (result, meta) in loaded.items():
            if result.arrays:
                store.write_arrays(f"stages/{name}/arrays.safetensors", result.arrays)
            store.write_json(f"stages/{name}/result.json", {"summary": result.summary, "details": result.details, **meta}, compact=True)
            stage = registry.get(name) if name != "model" else None
            for rel, text in (stage.files(result) if stage and stage.files else {}).items():
                write_text(store.path(rel), text)
        store.write_json("errors.json", {"cards": analysis["errors"]["cards"]}, compact=True)
        write_text(store.path("label_issues.csv"), reports.label_issues_csv(analysis["errors"]["label_issues"]))
        report = write_text(store.path("report.html"), html)
        # the size as written: a lone surrogate from a caption or class name became U+FFFD there
        provenance["report"] = {"seconds": seconds, "bytes": report.stat().st_size}
        store.write_json("run.json", provenance)
        store.write_json("summary.json", summary)
    return Path(config.out) / config.run


def _artifact_key(run: str) -> str:
    """Prefect's artifact keys allow only lowercase ASCII letters, digits and dashes: the run
    name reduced to those, plus a short hash of the whole name when anything was dropped (so
    that "résumé" and "resume" stay apart)."""
    import hashlib

    lowered = run.lower()
    key = "".join(c if c.isascii() and c.isalnum() else "-" for c in lowered).strip("-")
    if key != lowered:
        key = f"{key}-{hashlib.sha256(run.encode()).hexdigest()[:8]}".strip("-")
    return f"mmdiag-{key or 'run'}"


def _markdown(summary: dict, path: Path) -> str:
    m = summary["model"]
    lines = [
        f"# mmdiag: {summary['run']['name']}",
        f"Model `{m['name']}` on `{m['split']}`: accuracy **{m['accuracy']:.3f}**, {m['n_errors']} errors of {m['n']}.",
        "",
        "| stage | seconds | cached |",
        "|---|---|---|",
        *[f"| {n} | {s['seconds']} | {s['cached']} |" for n, s in summary["stages"].items()],
        "",
        *([f"Top suggestion: **{summary['suggestions'][0]['title']}**", ""] if summary.get("suggestions") else []),
        f"Run folder: `{path.resolve()}`; report: `{(path / 'report.html').resolve()}`",
    ]
    return "\n".join(lines)


FORCED_EXIT_AFTER_S = 30


@contextmanager
def _clean_exit_on_signals():
    """SIGTERM becomes a normal exit, so Prefect's temporary server shuts down with us; SIGINT
    a KeyboardInterrupt, also when the process inherited it ignored (a background job of a
    shell without job control: Python then installs no handler, and Ctrl-C did nothing). If
    that clean-up has not ended FORCED_EXIT_AFTER_S later (a stage stuck in native code), the
    process exits anyway: results are written atomically, so nothing half-written is left."""

    def exit_now(code: int) -> None:
        try:  # the temporary API server is our child: it would outlive a forced exit
            from mmdiag.flows.hosting.server import stop_all

            stop_all()
            if "prefect.server.api.server" in sys.modules:  # one Prefect started itself
                for server in list(sys.modules["prefect.server.api.server"].SubprocessASGIServer._instances.values()):
                    server.stop()
        finally:
            os._exit(code)

    def exit_later(code: int) -> None:
        timer = threading.Timer(FORCED_EXIT_AFTER_S, exit_now, args=(code,))
        timer.daemon = True
        timer.start()

    def on_term(*_):
        exit_later(143)
        sys.exit(143)

    def on_int(*_):
        exit_later(130)
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig, handler in ((signal.SIGTERM, on_term), (signal.SIGINT, on_int))}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def preflight(config: DiagConfig) -> tuple[RunPlan, Any]:
    """Check everything a user can get wrong before Prefect starts (so the error is one line,
    not a failed flow run): plugins, stage settings, the runner, the output and cache folders,
    the data of every split, the model (built, or trained on first use) and its contract with
    the data. Returns the run plan and the task runner; the model is handed to the flow's first
    task."""
    from mmdiag.flows.tasks import data_ref
    from mmdiag.pipeline.resolve import check_model

    plan = resolve(config)
    check_model(config.model)
    runner = task_runner(plan)
    writable(config.out, "out")
    if config.cache is not None:
        writable(config.cache, "cache")
    plan = plan.model_copy(update={"data": {s: data_ref(config.data, s, config.seed, plan.cache) for s in config.data.splits}})
    if config.runner.shards > plan.analysed["n"]:
        raise MmdiagError(f"runner.shards: {config.runner.shards} shards for {plan.analysed['n']} samples of split {config.data.split!r}; use at most one shard per sample")
    preflight_model(plan, config.model)
    return plan, runner


def preflight_model(plan: RunPlan, spec: ModelSpec) -> None:
    """Build (or train) the model, check its contract with the analysed split and the stages'
    own checks, and hand it to the flow's first task."""
    import torch

    from mmdiag.flows.tasks import adapter_for, data_for, hand_over, model_ref
    from mmdiag.pipeline.resolve import check_contract

    ref, cached = model_ref(spec, plan.cache, plan.device)
    adapter, analysed = adapter_for(ref, plan.cache).to(torch.device("cpu")), data_for(plan.analysed)
    check_contract(adapter, analysed, plan.config.data.split)
    check_stages(plan, adapter, analysed)
    hand_over(spec, ref, cached)


def check_stages(plan: RunPlan, adapter, data) -> None:
    """Each stage's own check of its settings against the model and the analysed split (a
    reference set larger than the data, a single class), before the first stage runs."""
    import torch

    from mmdiag.stages import Context

    ctx = Context(adapter, data, torch.device("cpu"), seed=plan.config.seed)
    for stage in registry.stages():
        if stage.check is not None:
            stage.check(ctx, stage.config.model_validate(plan.settings[stage.name]))


def task_runner(plan: RunPlan):
    """Prefect's thread pool, or a Dask cluster (a running one, or a local one started here)."""
    from prefect.task_runners import ThreadPoolTaskRunner

    spec = plan.config.runner
    if spec.kind == "local":
        return ThreadPoolTaskRunner(max_workers=max(spec.shards, 1))
    if not os.environ.get("PREFECT_API_URL"):
        raise MmdiagError("runner.kind: dask needs a Prefect server that every worker reports to; run `prefect server start` and set PREFECT_API_URL (see docs/cli.md, 'Scale-out')")
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise MmdiagError("runner.kind: dask needs the prefect-dask package; pip install 'mmdiag[dask]'") from None
    scratch = plan.cache / "dask"
    os.environ.setdefault("DASK_TEMPORARY_DIRECTORY", str(scratch))
    if spec.address:
        return DaskTaskRunner(address=spec.address)
    cluster = {"n_workers": spec.workers, "threads_per_worker": 1, "processes": True, "local_directory": str(scratch)}
    return DaskTaskRunner(cluster_kwargs=cluster)


def run(config: DiagConfig, refresh: tuple[str, ...] = (), stage_model: dict | None = None) -> Path:
    """Run the diagnosis flow for a config; returns the run folder."""
    configure(cache_root(config.cache))  # before anything imports Prefect
    watch_this_process()  # before the server starts: the watchdog notes every child from here on
    server = None if os.environ.get("PREFECT_API_URL") else TemporaryServer.get()  # boots while the pre-flight runs
    plan, runner = preflight(config)
    if stage_model is not None:  # `rerun --model`: the new checkpoint must fit before anything runs
        preflight_model(plan, ModelSpec.model_validate_json(stage_model["spec"]))
    for folder in (plan.cache / "results", plan.cache / "records", plan.cache / "models"):
        clean_stale(folder)
    from prefect import flow
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    quiet_user_errors()

    diagnosis = flow(name="mmdiag-diagnose", validate_parameters=False, task_runner=runner)(_flow_body)
    log.info("%s: running the flow", config.run)
    with _clean_exit_on_signals():
        settings = {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None, **({PREFECT_API_URL: _wait_for(server, config.run)} if server else {})}
        with temporary_settings(settings):
            return Path(diagnosis(plan, list(refresh), stage_model))


def _wait_for(server: TemporaryServer, run: str) -> str:
    start = time.monotonic()
    url = server.wait(waiting=lambda s: log.info("%s: waiting for Prefect's temporary server to start (%.0f s)", run, s))
    if time.monotonic() - start > 1:  # say so when the wait was long enough to notice
        log.info("%s: Prefect's temporary server is up (waited %.1f s)", run, time.monotonic() - start)
    return url


# `mmdiag demo --quick`: every stage and the report; small stage-1 and stage-2 settings, discovery
# of words and transforms only (its image places are most of its candidates); the rest at defaults
QUICK_STAGES = {
    "unimodal": {"methods": ["grad_x_input", "shapley"], "n_correct": 10, "max_errors": 10, "shapley_pairs": 1, "sanity_samples": 0},
    "crossmodal": {"n_reference": 40, "shapley_draws": 4},
    "discovery": {"kinds": ["word", "transform"]},
}


def demo_configs(out: Path, device: str = "auto", models: tuple[str, ...] = ("demo-film", "demo-late"), quick: bool = False) -> list[DiagConfig]:
    """The embedded default: each demo model diagnosed on the shapes data, `ood` analysed
    (`quick`: with QUICK_STAGES)."""
    from mmdiag.pipeline.demo.catalog import data_for

    stages = QUICK_STAGES if quick else {}
    return [DiagConfig(run=name, model={"name": name}, data={"name": data_for(name), "split": "ood"}, device=device, out=out, stages=stages) for name in models]


def spec_for_new_model(config: DiagConfig, weights: Path) -> ModelSpec:
    from mmdiag.pipeline.resolve import check_model

    if not weights.is_file():
        raise MmdiagError(f"--model: no file at {weights}; give the new checkpoint (.safetensors)")
    spec = config.model.model_copy(update={"weights": weights.resolve()})
    check_model(spec)
    return spec
