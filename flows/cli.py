"""The `mmdiag` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from mmdiag.pipeline.errors import MmdiagError

log = logging.getLogger("mmdiag")

DESCRIPTION = """\
mmdiag diagnoses trained multimodal models (image + text, or any other modality pair):
what each modality contributes, which parts of the modalities the model combines, what its
layers encode and how its predictions are composed, with an HTML error-analysis report.

Start with `mmdiag demo`: it generates a small image+caption data set with planted bugs,
trains two models on it and diagnoses them, with no files and no downloads."""


class _Parser(argparse.ArgumentParser):
    """A wrong argument is one line (argparse prints the usage too); --help still has it all."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message}; see `{self.prog} --help`", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mmdiag", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="more log lines")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="train the embedded demo models and diagnose them (no files or downloads needed)",
        description="Generate the shapes-and-captions data, train the FiLM and late-fusion demo models "
        "(cached after the first run) and write one run folder per model: OUT/demo-film and OUT/demo-late.",
    )
    demo.add_argument("--out", type=Path, default=Path("runs"), help="folder for the run folders (default: ./runs)")
    demo.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to compute (default: auto)")
    demo.add_argument(
        "--models",
        nargs="+",
        default=["demo-film", "demo-late"],
        metavar="MODEL",
        help="the built-in models to diagnose (default: demo-film demo-late; also demo-transformer, demo-vlm, demo-film-clean, demo-late-clean, demo-vlm-clean)",
    )
    demo.add_argument(
        "--one-by-one",
        action="store_true",
        help="diagnose the models one after the other in this process "
        "(default with at least one and fewer than two CPU cores a model: once the first model has something "
        "to compute, the others start beside it, one process and one thread each)",
    )
    demo.add_argument(
        "--quick",
        action="store_true",
        help="a first look: the same stages and report with fewer samples explained, two attribution methods and a smaller EMAP reference set (its figures differ from the full demo's)",
    )
    demo.add_argument(
        "--fix", action="store_true", help="then apply demo-film's top suggestion (retrain), diagnose the fixed model as OUT/demo-film-fixed and write the before/after page OUT/demo-film-fix.html"
    )

    diag = sub.add_parser(
        "diagnose",
        help="diagnose the model and data named in a YAML config",
        description="Run the diagnosis described by a YAML config (see docs/cli.md, 'Config') and write OUT/RUN.",
    )
    diag.add_argument("--config", type=Path, required=True, help="path of the YAML config")

    rerun = sub.add_parser(
        "rerun",
        help="recompute one stage of a run (and the stages that depend on what changed)",
        description="Recompute STAGE of the run in RUN_DIR, with changed settings if given; stages downstream "
        "recompute only if the result they read changed. With --model, only STAGE is recomputed, for the new "
        "checkpoint, and run.json and summary.json say which stages belong to which model.",
    )
    rerun.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    rerun.add_argument("--stage", required=True, help="the stage to recompute (see `mmdiag stages`; `model` is the evaluation)")
    rerun.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="change a setting of that stage (repeatable)")
    rerun.add_argument("--model", type=Path, help="a new checkpoint (.safetensors) to compute that stage for")

    compare = sub.add_parser(
        "compare", help="what changed between two runs", description="Print what changed from RUN_A to RUN_B: model accuracy, accuracy per split and slice, and every summary figure that moved."
    )
    compare.add_argument("run_a", type=Path, metavar="RUN_A")
    compare.add_argument("run_b", type=Path, metavar="RUN_B")
    compare.add_argument("--json", type=Path, help="also write the comparison as JSON")
    compare.add_argument("--html", type=Path, help="also write the before/after page as HTML")

    example = sub.add_parser(
        "example",
        help="run a real example: easyvqa (needs `pip install easy-vqa`)",
        description="Train a small model on a published data set that ships in a pip package (cached after the first run) and run the full diagnosis: OUT/NAME.",
    )
    example.add_argument("name", choices=("easyvqa",), help="the example")
    example.add_argument("--out", type=Path, default=Path("runs"), help="folder for the run folder (default: ./runs)")
    example.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")

    cache = sub.add_parser(
        "cache",
        help="the cache: its size, damage, and cleaning it",
        description="Trained weights, stage results and their records live in the cache folder ($MMDIAG_CACHE, else ~/.cache/mmdiag; a config's `cache:` names another).",
    )
    cache.add_argument(
        "action",
        choices=("info", "verify", "prune", "clear"),
        help="info: location and size per kind; verify: check every file against its hash; prune: remove results no run folder refers to; clear: remove everything cached",
    )
    cache.add_argument("--cache", type=Path, help="the cache folder (default: $MMDIAG_CACHE or ~/.cache/mmdiag)")
    cache.add_argument("--unused-since", type=_date, metavar="DATE", help="with prune: remove the results not used since DATE (YYYY-MM-DD) instead")
    cache.add_argument("--keep-models", action="store_true", help="with clear: keep the trained weights")

    listing = sub.add_parser("stages", help="list the analysis stages (what each reads and writes) and the registered methods, rules, findings and sections")
    listing.add_argument("--plugins", nargs="+", default=[], metavar="MODULE", help="import these modules first (as a config's plugins: their registrations are listed)")

    bench = sub.add_parser("bench", help="run the benchmarks: print a table and write JSON")
    bench.add_argument("--json", type=Path, default=Path("bench.json"), help="where to write the results (default: bench.json)")
    bench.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return p


def _date(text: str):
    from datetime import datetime, timezone

    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date; write it as YYYY-MM-DD") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _run(args: argparse.Namespace) -> int:
    from mmdiag.flows.commands import COMMANDS

    if args.command not in COMMANDS:
        _parser().print_help()
        return 2
    return COMMANDS[args.command](args)


def main(argv: list[str] | None = None) -> int:
    from mmdiag.flows import logs

    args = _parser().parse_args(argv)
    logs.setup(args.verbose)
    try:
        return _run(args)
    except MmdiagError as e:
        print(f"mmdiag: error: {_one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("mmdiag: interrupted; finished results are kept, nothing half-written was left", file=sys.stderr)
        return 130
    except OSError as e:  # the file system refused: a path the user gave
        where = f"{e.filename}: " if e.filename else ""
        print(f"mmdiag: error: {where}{e.strerror or e}; check that path (exists, writable, not a file where a folder belongs)", file=sys.stderr)
        return 2
    except Exception as e:  # a bug (ours, or in a plugged-in model): one line and the traceback in a file
        user = _user_error(e)
        if user is not None:
            print(f"mmdiag: error: {_one_line(str(user))}", file=sys.stderr)
            return 2
        if args.verbose:
            raise
        log_file = _write_traceback(e)
        print(f"mmdiag: internal error ({type(e).__name__}: {_one_line(str(e))[:200]}); this is a bug, not your input; the traceback is in {log_file} (rerun with -v to print it)", file=sys.stderr)
        return 1


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _user_error(e: BaseException) -> MmdiagError | None:
    """A user's mistake that reached us wrapped (Prefect re-raises a task's error as the cause
    or context of its own)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, MmdiagError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _write_traceback(e: BaseException) -> Path:
    import tempfile
    import traceback
    from datetime import datetime

    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    fd, name = tempfile.mkstemp(prefix=f"mmdiag-error-{stamp}-", suffix=".log")
    with open(fd, "w") as f:
        f.write(text)
    return Path(name)


def entry() -> None:
    """The `mmdiag` command: main(), then, on the temporary server of a run, the exit handlers
    (the server's stop, logging's) and the exit without the interpreter's teardown of torch and
    the other modules: 0.8 s of a cached `mmdiag demo`, with nothing left to write (every result
    is written atomically and closed). With a Prefect server of the user's (PREFECT_API_URL) the
    exit is Python's own: Prefect sends its last logs and events in the interpreter's shutdown."""
    import atexit

    code = main()
    if os.environ.get("PREFECT_API_URL"):
        sys.exit(code)
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # `mmdiag ... | head`
        pass
    os._exit(code)


if __name__ == "__main__":
    entry()
