"""`make portability`: every property that a test asserts of a trained model, over training seeds
and numeric settings, beside the bound the test asserts.

Runs the tests marked `trained` once per (setting, seed) in a fresh process (so every model is
trained anew under that setting), collects the values the tests record through
`ranges.holds`, and prints a Markdown table: per property its bound, then per setting the
minimum, median and maximum over the seeds, and the room left between the bound and the
nearest value seen anywhere. Writes the same as JSON. A script, not a test: nothing here is
timed or asserted.

    python tests/portability.py [--seeds 5] [--settings default,1-thread,avx2,sse4.2] [--jobs 1] [-k EXPR] [--json portability.json]
    python tests/portability.py --merge default.json 1-thread.json ... [--json portability.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The numeric paths a user's CPU may take: PyTorch's own kernels (ATen) pick an instruction set
# at start, oneDNN (convolutions) and MKL (matrix products, LU) each their own; one thread
# changes the order of every parallel reduction.
# The kernel settings run one thread, as `make test`'s workers (and CI's AVX2 run) do, so two of
# them can share two cores (`--jobs 2`).
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SETTINGS = {
    "default": {},
    "1-thread": ONE_THREAD,
    "avx2": {**ONE_THREAD, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "sse4.2": {**ONE_THREAD, "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}
HERE = Path(__file__).resolve().parent


def run_once(setting: str, seed: int, keyword: str | None) -> tuple[list[dict], list[str], float]:
    """The trained tests under one setting and seed: (recorded values, failed tests, seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "ranges.jsonl"
        env = {k: v for k, v in os.environ.items() if k != "MMDIAG_TEST_MODELS"}  # every model trained anew
        env.update(SETTINGS[setting], MMDIAG_RANGES=str(record), MMDIAG_TRAIN_SEED=str(seed))
        cmd = [sys.executable, "-m", "pytest", "-m", "trained", "-q", "-p", "no:cacheprovider", "-rf", "--tb=no", "--durations=0", "--basetemp", str(Path(tmp) / "t")]
        if keyword:
            cmd += ["-k", keyword]
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        failed = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("FAILED ")]
        if done.returncode not in (0, 1):  # 1: some tests failed, which the table shows
            sys.exit(f"portability: pytest ended with {done.returncode} under {setting}, seed {seed}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        rows = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
        return rows, failed, seconds


def collect(settings: list[str], seeds: range, keyword: str | None, jobs: int = 1) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    properties: dict[tuple[str, str], dict] = {}
    failures, seconds = {}, {}
    runs = [(setting, seed) for setting in settings for seed in seeds]

    def one(run: tuple[str, int]):
        rows, failed, took = run_once(*run, keyword)
        print(f"{run[0]}, seed {run[1]}: {len(rows)} values, {len(failed)} failed tests, {took:.0f} s", file=sys.stderr, flush=True)
        for test in failed:
            print(f"  failed: {test}", file=sys.stderr, flush=True)
        return rows, failed, took

    with ThreadPoolExecutor(jobs) as pool:  # each run is its own process
        done = list(pool.map(one, runs))
    for (setting, seed), (rows, failed, took) in zip(runs, done):
        failures.setdefault(setting, {})[seed] = failed
        seconds.setdefault(setting, {})[seed] = round(took, 1)
        for row in rows:
            p = properties.setdefault((row["test"], row["name"]), {"test": row["test"], "name": row["name"], "above": row["above"], "below": row["below"], "values": {}})
            p["values"].setdefault(setting, []).append(row["value"])
    return _with_room({"settings": {s: SETTINGS[s] for s in settings}, "seeds": list(seeds), "properties": list(properties.values()), "failures": failures, "seconds": seconds})


def _with_room(result: dict) -> dict:
    """Each property's room: the distance from its bound to the nearest value seen anywhere."""
    for p in result["properties"]:
        seen = [v for values in p["values"].values() for v in values]
        room = [v - p["above"] for v in seen if p["above"] is not None] + [p["below"] - v for v in seen if p["below"] is not None]
        p["room"] = min(room) if room else None
    return result


def merge(results: list[dict]) -> dict:
    """One result from runs of other settings (e.g. each setting run apart, or on another machine)."""
    merged: dict = {"settings": {}, "seeds": [], "properties": [], "failures": {}, "seconds": {}}
    properties: dict[tuple[str, str], dict] = {}
    for result in results:
        merged["settings"].update(result["settings"])
        merged["seeds"] = sorted(set(merged["seeds"]) | set(result["seeds"]))
        merged["failures"].update(result["failures"])
        merged["seconds"].update(result["seconds"])
        for p in result["properties"]:
            q = properties.setdefault((p["test"], p["name"]), {**p, "values": {}})
            q["values"].update(p["values"])
    merged["properties"] = list(properties.values())
    return _with_room(merged)


def _g(v: float) -> str:
    return f"{v:.3g}"


def table(result: dict) -> str:
    settings = list(result["settings"])
    lines = ["| test | property | bound | " + " | ".join(f"{s} (min / median / max)" for s in settings) + " | room |", "|---" * (len(settings) + 4) + "|"]
    for p in sorted(result["properties"], key=lambda p: (p["test"], p["name"])):
        bound = " and ".join(b for b in ((f"> {_g(p['above'])}" if p["above"] is not None else ""), (f"< {_g(p['below'])}" if p["below"] is not None else "")) if b)
        cells = []
        for s in settings:
            v = p["values"].get(s, [])
            cells.append(f"{_g(min(v))} / {_g(statistics.median(v))} / {_g(max(v))}" if v else "-")
        room = "-" if p["room"] is None else (_g(p["room"]) if p["room"] > 0 else f"**{_g(p['room'])} (fails)**")
        lines.append(f"| {p['test'].split('::')[-1]} | {p['name']} | {bound} | " + " | ".join(cells) + f" | {room} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="how many training seeds")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}")
    parser.add_argument("-k", dest="keyword", help="only the trained tests that match (pytest -k)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (each is one process; 2 suits 2 cores for the one-thread settings)")
    parser.add_argument("--json", type=Path, default=Path("portability.json"))
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON", help="train nothing: merge these runs' JSON into one table")
    args = parser.parse_args(argv)
    if args.merge:
        result = merge([json.loads(path.read_text()) for path in args.merge])
    else:
        settings = args.settings.split(",")
        if unknown := [s for s in settings if s not in SETTINGS]:
            parser.error(f"--settings: unknown {unknown[0]!r}; choose from {', '.join(SETTINGS)}")
        result = collect(settings, range(args.first_seed, args.first_seed + args.seeds), args.keyword, args.jobs)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    for setting, seeds in result["failures"].items():
        for seed, failed in seeds.items():
            for test in failed:
                print(f"failed under {setting}, seed {seed}: {test}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
