"""The `mmdiag` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.errors import MmdiagError

log = logging.getLogger("mmdiag")

DESCRIPTION = """\
mmdiag diagnoses trained multimodal models (image + text, or any other modality pair):
what each modality contributes, which parts of the modalities the model combines, what its
layers encode and how its predictions are composed, with an HTML error-analysis report.

Start with `mmdiag demo`: it generates a small image+caption data set with planted bugs,
trains two models on it and diagnoses them, with no files and no downloads."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmdiag", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
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

    diag = sub.add_parser(
        "diagnose",
        help="diagnose the model and data named in a YAML config",
        description="Run the diagnosis described by a YAML config (see README, 'Config') and write OUT/RUN.",
    )
    diag.add_argument("--config", type=Path, required=True, help="path of the YAML config")

    bench = sub.add_parser("bench", help="run the benchmarks: print a table and write JSON")
    bench.add_argument("--json", type=Path, default=Path("bench.json"), help="where to write the results (default: bench.json)")
    bench.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return p


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from flows.diagnose import demo_configs, diagnose

        for config in demo_configs(args.out, device=args.device):
            log.info("%s: %s", config.run, "training or loading the model, then evaluating")
            path = diagnose(config)
            print(path / "summary.json")
        return 0
    if args.command == "diagnose":
        from flows.diagnose import diagnose
        from pipeline.config import load_config

        print(diagnose(load_config(args.config)) / "summary.json")
        return 0
    if args.command == "bench":
        from flows.bench import main as bench

        return bench(args.json, args.device)
    _parser().print_help()
    return 2


def main(argv: list[str] | None = None) -> int:
    from flows import logs

    args = _parser().parse_args(argv)
    logs.setup(args.verbose)
    try:
        return _run(args)
    except MmdiagError as e:
        print(f"mmdiag: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("mmdiag: interrupted; finished results are kept, nothing half-written was left", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
