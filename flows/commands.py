"""What each `mmdiag` command does, one function per command (flows/cli.py parses the line
and calls it)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from mmdiag.pipeline.errors import MmdiagError

log = logging.getLogger("mmdiag")


def cache(args: argparse.Namespace) -> int:
    """`mmdiag cache info|verify|prune|clear`."""
    from mmdiag.flows import cache as store
    from mmdiag.pipeline.store import cache_root

    root = cache_root(args.cache)
    if root.exists() and not root.is_dir():
        raise MmdiagError(f"--cache: {root} is a file, not a cache folder; give the folder (default: $MMDIAG_CACHE or ~/.cache/mmdiag)")
    if args.action == "info":
        from rich.console import Console
        from rich.table import Table

        found = store.info(root)
        print(f"cache {found['cache']}: {found['runs']} run folders written with it")
        table = Table()
        for col in ("kind", "files", "size"):
            table.add_column(col)
        for kind, v in {**found["kinds"], "total": found["total"]}.items():
            table.add_row(kind, str(v["files"]), _mb(v["bytes"]))
        Console().print(table)
        return 0
    if args.action == "verify":
        damage = store.verify(root)
        for line in damage:
            print(f"damaged: {line}")
        print(f"{len(damage)} damaged entries in {root}" + ("; the next run recomputes each one it needs" if damage else ""))
        return 1 if damage else 0
    if args.action == "prune":
        removed = store.prune(root, args.unused_since)
        print(f"removed {removed['results']} results and {removed['records']} records ({_mb(removed['bytes'])}) from {root}")
        return 0
    removed = store.clear(root, keep_models=args.keep_models)
    listed = ", ".join(f"{kind} ({_mb(v['bytes'])})" for kind, v in removed.items())
    print(f"removed {listed or 'nothing'} from {root}")
    return 0


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _print_run(path: Path) -> None:
    """The run's summary and report, one per line (for scripts and for people)."""
    print(path / "summary.json")
    print(path / "report.html")


def _early_server(cache: Path | None) -> None:
    """Prefect's temporary server, launched before the heavy imports: it boots in its own
    process while this one imports torch and loads the data (the flow finds it running)."""
    if os.environ.get("PREFECT_API_URL"):
        return
    from mmdiag.flows.hosting.server import TemporaryServer
    from mmdiag.flows.hosting.settings import configure
    from mmdiag.flows.hosting.watchdog import watch_this_process
    from mmdiag.pipeline.paths import cache_root

    configure(cache_root(cache))
    watch_this_process()  # first: it ends the server if this process is killed
    TemporaryServer.get()


def demo(args: argparse.Namespace) -> int:
    """`mmdiag demo`: the built-in models diagnosed on the generated data (beside each other where the machine allows), then `--fix`."""
    from mmdiag.pipeline.paths import writable

    writable(args.out, "--out")  # before Prefect's server starts
    _early_server(None)
    from mmdiag.flows.flow import demo_configs, run
    from mmdiag.flows.hosting import side_by_side
    from mmdiag.flows.hosting.server import TemporaryServer
    from mmdiag.pipeline.demo.catalog import MODELS

    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        raise MmdiagError(f"--models: {unknown[0]!r} is not a built-in model; choose from {', '.join(MODELS)}")
    first, *later = demo_configs(args.out, device=args.device, models=tuple(args.models), quick=args.quick)
    server = None if os.environ.get("PREFECT_API_URL") else TemporaryServer.get()
    try:
        # --fix retrains after the runs: with this process's threads, not the one a run beside others keeps
        with side_by_side.Overflow([] if args.one_by_one or args.fix else later, server, args.verbose, first=first.run) as overflow:
            log.info("%s: diagnosing (the model is trained on first use, then cached)", first.run)
            _print_run(run(first))
            beside = overflow.finish() if overflow.started else None
    except side_by_side.Failed as e:  # a run beside this one failed; its error line was relayed
        return e.code
    if beside is None:  # nothing started beside the first run (it found everything cached, say)
        for config in later:
            log.info("%s: diagnosing (the model is trained on first use, then cached)", config.run)
            _print_run(run(config))
    else:
        for lines in beside:
            print(*lines, sep="\n")
    if args.fix:
        from mmdiag.flows.fix import fix_demo

        log.info("demo-film: applying the top suggestion and diagnosing the retrained model")
        print(fix_demo(args.out, args.device, quick=args.quick))
    return 0


def diagnose(args: argparse.Namespace) -> int:
    """`mmdiag diagnose --config FILE`."""
    from mmdiag.pipeline.config import load_config

    config = load_config(args.config)
    _early_server(config.cache)
    from mmdiag.flows.flow import run

    _print_run(run(config))
    return 0


def rerun(args: argparse.Namespace) -> int:
    """`mmdiag rerun RUN --stage S`: one stage again (changed settings, or a new model from it on), its readers after it."""
    from mmdiag.flows.flow import run, spec_for_new_model
    from mmdiag.flows.rerun import rerun_config

    config = rerun_config(args.run_dir, args.stage, args.set)
    if args.model is not None:
        if args.stage == "model":
            raise MmdiagError("--model: every stage reads the model; to diagnose a new checkpoint, set model.weights and run `mmdiag diagnose`")
        spec = spec_for_new_model(config, args.model)
        _print_run(run(config, stage_model={"stage": args.stage, "spec": spec.model_dump_json()}))
    else:
        _print_run(run(config, refresh=(args.stage,)))
    return 0


def compare(args: argparse.Namespace) -> int:
    """`mmdiag compare A B`: what moved between two runs, as a table (and JSON, HTML)."""
    from mmdiag.flows.rerun import compare, load_summary, print_comparison
    from mmdiag.pipeline.paths import writable
    from mmdiag.pipeline.store import write_json

    for flag, path in (("--json", args.json), ("--html", args.html)):
        if path is None:
            continue
        if path.is_dir():
            raise MmdiagError(f"{flag}: {path} is a folder; give a file name, e.g. {path / ('diff' + flag[1:].replace('-', '.'))}")
        writable(path.parent, flag)  # before the table is printed, not after it
    diff = compare(args.run_a, args.run_b)
    print_comparison(diff)
    if args.json:
        write_json(args.json, diff)
    if args.html:
        from mmdiag import reports
        from mmdiag.pipeline.store import write_text

        html = reports.render_compare(load_summary(args.run_a), load_summary(args.run_b), diff)
        write_text(args.html, html)
        print(args.html)
    return 0


def example(args: argparse.Namespace) -> int:
    """`mmdiag example`: the easy-VQA example."""
    from mmdiag.flows.flow import run
    from mmdiag.pipeline.examples.easyvqa import config
    from mmdiag.pipeline.paths import writable

    writable(args.out, "--out")
    _print_run(run(config(args.out, device=args.device)))
    return 0


def stages(args: argparse.Namespace) -> int:
    """`mmdiag stages [--plugins MODULE ...]`: the registered stages, what each reads and writes,
    and the records of every other extension point, after importing the plugins."""
    from mmdiag.reports import evidence, sections, suggest
    from mmdiag.stages import methods, registry

    registry.load_plugins(args.plugins)
    listed = registry.stages()
    print("model      evaluation: reads the model and data; writes model.* (accuracy, splits, slices)")
    for st in listed:
        print(f"{st.name:<10} reads: {', '.join(st.reads) or 'model'}; writes: {', '.join(st.writes) or st.name + '.*'}")
    if not listed:
        print("(no analysis stages registered yet)")
    print()
    for what, records in (
        ("attribution methods", methods.METHODS),
        ("per-error rules, in the order tried", evidence.RULES),
        ("finding rules", suggest.FINDINGS),
        ("report sections", sections.SECTIONS),
    ):
        print(f"{what}: {', '.join(records.names())}")
    return 0


def bench(args: argparse.Namespace) -> int:
    """`mmdiag bench`: the benchmark suite."""
    from mmdiag.flows.bench.suite import main as bench

    return bench(args.json, args.device)


COMMANDS = {"demo": demo, "diagnose": diagnose, "rerun": rerun, "compare": compare, "example": example, "cache": cache, "stages": stages, "bench": bench}
