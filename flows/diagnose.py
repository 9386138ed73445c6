"""A diagnosis run: load the model and data named by the config, evaluate, write the run folder.

Everything the config names is loaded and checked before the run folder is touched, and the
folder is swapped in only once complete, so bad input never leaves a half-written run.
"""

from __future__ import annotations

import platform
import time
from datetime import datetime, timezone
from pathlib import Path


from pipeline.config import DiagConfig
from pipeline.device import resolve_device
from pipeline.evaluate import accuracy, model_summary
from pipeline.resolve import load_data, load_model, predict
from pipeline.store import SUMMARY_SCHEMA, fingerprint_module, new_run


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("mmdiag", "torch", "lightning", "prefect", "captum", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def diagnose(config: DiagConfig, cache: Path | None = None) -> Path:
    start = time.perf_counter()
    device = resolve_device(config.device)
    data = {s: load_data(config.data, s, config.seed) for s in config.data.splits}  # cheap: fail fast
    adapter, weights_cached = load_model(config.model, cache=cache, device=device.type)
    logits = {s: predict(adapter, d, device, config.batch_size) for s, d in data.items()}
    analysed = data[config.data.split]
    model_fp = fingerprint_module(adapter.module)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    split_accuracy = {s: {"n": len(d), "accuracy": accuracy(logits[s], d.labels)} for s, d in data.items()}
    summary = {
        "schema": SUMMARY_SCHEMA,
        "run": {"name": config.run, "created": now, "device": device.type},
        "model": {
            "name": config.model.name or config.model.factory,
            "fingerprint": model_fp,
            **model_summary(analysed, logits[config.data.split], config.data.split, split_accuracy),
        },
        "stages": {},
    }
    provenance = {
        "created": now,
        "config": config.model_dump(mode="json"),
        "model": {"fingerprint": model_fp, "weights_from_cache": weights_cached, "modalities": list(adapter.modalities)},
        "data": {s: {"fingerprint": d.fingerprint(), "n": len(d)} for s, d in data.items()},
        "device": device.type,
        "versions": versions(),
        "seconds": round(time.perf_counter() - start, 3),
    }
    with new_run(config.out, config.run) as store:
        store.write_arrays(
            "stages/model/predictions.safetensors",
            {"ids": analysed.ids, "labels": analysed.labels, "logits": logits[config.data.split]},
        )
        store.write_json("run.json", provenance)
        store.write_json("summary.json", summary)
    return Path(config.out) / config.run


def demo_configs(out: Path, device: str = "auto", models: tuple[str, ...] = ("demo-film", "demo-late")) -> list[DiagConfig]:
    """The embedded default: each demo model diagnosed on the shapes data, `ood` analysed."""
    return [
        DiagConfig(run=name, model={"name": name}, data={"name": "shapes", "split": "ood"}, device=device, out=out)
        for name in models
    ]


