"""`mmdiag bench`: the project's benchmarks, as a table and as JSON.

Each row: what was measured, the figure, its unit, and the device. Training runs cold (an
empty weights cache) so that the figure is the real cost.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from pipeline.device import resolve_device
from pipeline.store import write_json


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run(device_name: str = "auto") -> list[dict]:
    from pipeline.demo import shapes
    from pipeline.demo.catalog import MODELS
    from pipeline.demo.models import demo_adapter
    from pipeline.demo.train import load_or_train
    from pipeline.resolve import predict

    device = resolve_device(device_name)
    rows = []

    def row(name, value, unit, **extra):
        rows.append({"benchmark": name, "value": round(value, 4), "unit": unit, "device": device.type, **extra})

    n_total = 8000 + 3 * 2000
    _, secs = _timed(lambda: [shapes.split(s) for s in ("train", "iid", "ood", "anti")])
    row("data generation (8,000 + 3 x 2,000 samples)", secs, "s", samples_per_s=round(n_total / secs))
    with tempfile.TemporaryDirectory() as cache:
        import lightning  # noqa: F401  (import cost is not training cost)

        models = {}
        for name in ("demo-film", "demo-late"):
            config = MODELS[name]
            (models[name], _), secs = _timed(lambda: load_or_train(config, cache=Path(cache), device=device.type))
            row(f"train {name} ({config.epochs} epochs x {config.n_train} samples)", secs, "s")
        (_, hit), secs = _timed(lambda: load_or_train(MODELS["demo-film"], cache=Path(cache)))
        row("load demo-film from the weights cache", secs, "s", cached=hit)
    ood = shapes.split("ood")
    adapter = demo_adapter(models["demo-film"])
    predict(adapter, ood, device)  # warm-up
    _, secs = _timed(lambda: predict(adapter, ood, device))
    row("evaluate demo-film on ood (2,000 samples)", secs, "s", samples_per_s=round(len(ood) / secs))
    rows += _demo_rows(device.type)
    return rows


def _demo_rows(device: str) -> list[dict]:
    """`mmdiag demo` end to end in a fresh process, cold (empty cache and Prefect home) and
    fully cached. A cached run computes nothing, so its wall time is the flow's own overhead:
    process start, imports, the temporary Prefect server, cache look-ups, writing the runs."""
    import os
    import subprocess
    import sys

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_HOME"} | {"MMDIAG_CACHE": str(Path(tmp) / "cache")}
        command = [sys.executable, "-m", "flows.cli", "demo", "--out", str(Path(tmp) / "runs"), "--device", device]
        for label in ("cold (trains both models, new Prefect home)", "fully cached rerun (= flow overhead)"):
            start = time.perf_counter()
            subprocess.run(command, env=env, check=True, capture_output=True)
            secs = time.perf_counter() - start
            stages = [json.loads((Path(tmp) / "runs" / r / "summary.json").read_text())["stages"] for r in ("demo-film", "demo-late")]
            computed = sum(s["seconds"] or 0 for st in stages for s in st.values() if not s["cached"])
            rows.append({"benchmark": f"mmdiag demo, {label}", "value": round(secs, 3), "unit": "s", "device": device,
                         "stage_compute_s": round(computed, 3)})
    return rows


def main(json_path: Path = Path("bench.json"), device: str = "auto") -> int:
    from rich.console import Console
    from rich.table import Table

    rows = run(device)
    table = Table(title="mmdiag benchmarks")
    for col in ("benchmark", "value", "unit", "device", "notes"):
        table.add_column(col, justify="right" if col == "value" else "left")
    for r in rows:
        notes = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("benchmark", "value", "unit", "device"))
        table.add_row(r["benchmark"], f"{r['value']:.3f}", r["unit"], r["device"], notes)
    Console().print(table)
    write_json(json_path, {"rows": rows})
    print(json.dumps({"written": str(json_path), "rows": len(rows)}))
    return 0
