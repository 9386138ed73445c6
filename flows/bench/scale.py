"""Benchmarks of data size: the diagnosis at 2k-20k samples streamed from disk (wall time and
peak RSS of the process), a 224 px image folder streamed through a CLIP model, EMAP's memory
with three modalities, and EMAP's late-fusion path. Each measurement runs in a fresh process,
so its peak RSS is its own.

    python -m mmdiag.flows.bench.scale [--sizes 2000,5000,10000,20000] [--json bench_scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

SHARD_ROWS = 2000  # the shapes generator's split size: a larger set is drawn a split at a time


def _child(code: str, env: dict | None = None) -> dict:
    """Run `code` in a fresh Python; it prints one JSON line last. Adds its wall time and peak RSS."""
    prologue = "import json, time\nfrom mmdiag.flows.bench.scale import peak_rss_mb\n_t0 = time.perf_counter()\n"
    epilogue = "\nprint(json.dumps({**OUT, 'peak_rss_mb': peak_rss_mb(), 'seconds': round(time.perf_counter() - _t0, 2)}))\n"
    done = subprocess.run([sys.executable, "-c", prologue + code + epilogue], env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the
    process that started it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# --- the diagnosis at growing sizes -------------------------------------------------------------


def write_shapes(folder: Path, n: int, split: str = "ood", seed: int = 0) -> None:
    """n samples of a shapes split on disk, drawn SHARD_ROWS at a time (bounded memory)."""
    from mmdiag.pipeline.demo import shapes
    from mmdiag.pipeline.sources import save_shards

    for k, start in enumerate(range(0, n, SHARD_ROWS)):
        part = shapes.generate(min(SHARD_ROWS, n - start), shapes.SPLITS[split], seed=1000 * seed + shapes.SPLIT_SEEDS[split] + 7919 * k, name=f"shapes/{split}")
        save_shards(part, folder, rows_per_shard=500, start=4 * k, index=start + SHARD_ROWS >= n)


def shard_data(split: str, n: int | None, seed: int):
    """The data factory of the size benchmark: the shard folder named by MMDIAG_BENCH_SHARDS."""
    from mmdiag.pipeline.sources import shards

    return shards(os.environ["MMDIAG_BENCH_SHARDS"], batch_size=256)


DIAGNOSE = """
from pathlib import Path
from mmdiag.flows.flow import run
from mmdiag.pipeline.config import DiagConfig
config = DiagConfig.model_validate(json.loads({config!r}))
run(config)
summary = json.loads((Path(config.out) / config.run / "summary.json").read_text())
OUT = {{"stages": {{k: v["seconds"] for k, v in summary["stages"].items()}}, "n": summary["model"]["n"], "top": (summary["suggestions"] or [{{}}])[0].get("id")}}
"""


def size_rows(sizes: list[int], work: Path, weights_cache: Path) -> list[dict]:
    rows = []
    for n in sizes:
        folder = work / f"shapes-{n}"
        generated = _child(f"from mmdiag.flows.bench.scale import write_shapes\nfrom pathlib import Path\nwrite_shapes(Path({str(folder)!r}), {n})\nOUT = {{}}")
        cache = work / f"cache-{n}"
        shutil.copytree(weights_cache / "models", cache / "models")  # trained once, not timed here
        config = {
            "run": f"size-{n}",
            "model": {"name": "demo-film"},
            "out": str(work / "runs"),
            "cache": str(cache),
            "data": {"factory": "mmdiag.flows.bench.scale:shard_data", "split": "ood", "splits": ["ood"]},
        }
        env = {"MMDIAG_BENCH_SHARDS": str(folder), "PREFECT_HOME": str(work / "prefect")}
        got = _child(DIAGNOSE.format(config=json.dumps(config)), env)
        rows.append(
            {
                "benchmark": f"diagnosis of demo-film on {n:,} ood samples streamed from disk",
                "value": got["seconds"],
                "unit": "s",
                "n": n,
                "seconds_per_sample": round(got["seconds"] / n, 5),
                "peak_rss_mb": got["peak_rss_mb"],
                "stages_s": got["stages"],
                "top_suggestion": got["top"],
                "generate_s": generated["seconds"],
            }
        )
        shutil.rmtree(folder)
    base = rows[0]["seconds_per_sample"]
    for r in rows:
        r["per_sample_over_smallest"] = round(r["seconds_per_sample"] / base, 3)
    if len(rows) > 1:  # the marginal cost: least-squares slope of time on size
        ns = torch.tensor([r["n"] for r in rows], dtype=torch.float64)
        ts = torch.tensor([r["value"] for r in rows], dtype=torch.float64)
        slope = float(((ns - ns.mean()) * (ts - ts.mean())).sum() / ((ns - ns.mean()) ** 2).sum())
        fit = ts.mean() + slope * (ns - ns.mean())
        rows.append(
            {
                "benchmark": "diagnosis time against size: least-squares line",
                "value": round(slope * 1000, 4),
                "unit": "s per 1,000 samples",
                "intercept_s": round(float(ts.mean() - slope * ns.mean()), 2),
                "largest_residual_s": round(float((ts - fit).abs().max()), 2),
            }
        )
    return rows


# --- a 224 px image folder through CLIP ---------------------------------------------------------

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def clip_folder(folder: Path) -> Path:
    """A random CLIP that takes 224 px images (ViT patches of 32 px; small widths, so that 2 CPU
    cores get through 10k images), with a letter-level tokenizer built here."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = ["<|startoftext|>", "<|endoftext|>", *LETTERS, *(c + "</w>" for c in LETTERS)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    width = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "max_position_embeddings": 48, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1, **width},
        vision_config=dict(image_size=224, patch_size=32, **width),
        projection_dim=32,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}), tokenizer=tokenizer).save_pretrained(folder)
    return folder


def write_pictures(folder: Path, n: int) -> None:
    """n shapes images upsampled to 224 px (JPEG) and a CSV table of captions, labels, concepts."""
    import csv

    import numpy as np
    from PIL import Image

    from mmdiag.pipeline.demo import shapes

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "table.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption", "label", "negation", "watermark"])
        for k, start in enumerate(range(0, n, SHARD_ROWS)):
            part = shapes.generate(min(SHARD_ROWS, n - start), shapes.SPLITS["ood"], seed=7919 * k, name="shapes/ood")
            pixels = (part.inputs["image"].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
            for i in range(len(part)):
                name = f"{start + i:06d}.jpg"
                Image.fromarray(pixels[i]).resize((224, 224), Image.NEAREST).save(folder / name, quality=90)
                writer.writerow([name, part.display["caption"][i], int(part.labels[i]), int(part.meta["negation"][i]), int(part.meta["watermark"][i])])


def clip_model():
    from mmdiag.pipeline.hf import load_clip

    return load_clip(os.environ["MMDIAG_BENCH_CLIP"], local_files_only=True)


def picture_data(split: str, n: int | None, seed: int):
    from mmdiag.pipeline.hf import hf_readers
    from mmdiag.pipeline.sources import image_table

    return image_table(
        Path(os.environ["MMDIAG_BENCH_PICTURES"]) / "table.csv",
        **hf_readers(clip_model()),
        concepts=["negation", "watermark"],
        class_names=["mismatch", "match"],
        name="shapes-224",
        batch_size=128,
        workers=2,
    )


CHEAP = {"unimodal": {"methods": ["grad_x_input"], "n_correct": 32, "max_errors": 32, "sanity_samples": 0}, "crossmodal": {"n_reference": 64, "shapley_pairs": 0}}


def picture_rows(n: int, work: Path) -> list[dict]:
    pictures, model = work / "pictures", clip_folder(work / "clip224")
    written = _child(f"from mmdiag.flows.bench.scale import write_pictures\nfrom pathlib import Path\nwrite_pictures(Path({str(pictures)!r}), {n})\nOUT = {{}}")
    size_mb = sum(p.stat().st_size for p in pictures.iterdir()) / 1e6
    config = {
        "run": "pictures",
        "model": {"factory": "mmdiag.flows.bench.scale:clip_model"},
        "out": str(work / "runs"),
        "cache": str(work / "cache-pictures"),
        "data": {"factory": "mmdiag.flows.bench.scale:picture_data", "split": "val", "splits": ["val"]},
        "stages": CHEAP,
    }
    env = {"MMDIAG_BENCH_CLIP": str(model), "MMDIAG_BENCH_PICTURES": str(pictures), "PREFECT_HOME": str(work / "prefect")}
    got = _child(DIAGNOSE.format(config=json.dumps(config)), env)
    shutil.rmtree(pictures)
    in_memory_mb = n * 3 * 224 * 224 * 4 / 1e6
    return [
        {
            "benchmark": f"{n:,} images of 224 px streamed from a folder + CSV through a random CLIP (cheap stages)",
            "value": got["seconds"],
            "unit": "s",
            "peak_rss_mb": got["peak_rss_mb"],
            "pixels_in_memory_would_be_mb": round(in_memory_mb),
            "files_mb": round(size_mb),
            "stages_s": got["stages"],
            "write_s": written["seconds"],
        }
    ]


# --- EMAP with three modalities -----------------------------------------------------------------


class ThreeModalities(nn.Module):
    """A random late-fusion model of three modalities (an 8 x 8 image, six word vectors, eight
    audio features): per-modality encoders, then an MLP over the concatenation."""

    def __init__(self, width: int = 24, classes: int = 4):
        super().__init__()
        self.image = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, width), nn.ReLU())
        self.text = nn.Sequential(nn.Flatten(), nn.Linear(6 * width, width), nn.ReLU())
        self.audio = nn.Sequential(nn.Linear(8, width), nn.ReLU())
        self.mlp = nn.Sequential(nn.Linear(3 * width, 2 * width), nn.ReLU(), nn.Linear(2 * width, classes))

    def separate(self, x):
        return {"image": self.image(x["image"]), "text": self.text(x["text"]), "audio": self.audio(x["audio"])}

    def fuse(self, z):
        return self.mlp(torch.cat([z["image"], z["text"], z["audio"]], 1))

    def forward(self, x):
        return self.fuse(self.separate(x))


def three_inputs(n: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(n, 3, 8, 8, generator=g), "text": torch.randn(n, 6, 24, generator=g), "audio": torch.randn(n, 8, generator=g)}


def joined_chunks_table(forward, encoded: dict, batch_size: int):
    """EMAP's recombination table as it was built before a09710e: every chunk kept, joined at
    the end (the comparison for the preallocated table)."""
    mods = list(encoded)
    n = len(next(iter(encoded.values())))
    total, chunks = n ** len(mods), []
    for start in range(0, total, batch_size):
        index = torch.stack(torch.unravel_index(torch.arange(start, min(start + batch_size, total)), (n,) * len(mods)))
        with torch.no_grad():
            chunks.append(forward({m: encoded[m][index[j]] for j, m in enumerate(mods)}).float())
    return torch.cat(chunks).reshape(*(n,) * len(mods), -1), total


EMAP = """
import torch
from mmdiag.flows.bench.scale import ThreeModalities, three_inputs, joined_chunks_table
from mmdiag.stages import interaction as inter
torch.manual_seed(0)
model, encoded = ThreeModalities().eval(), three_inputs({n})
before = peak_rss_mb()
start = time.perf_counter()
if {way!r} == "joined chunks":
    table, evaluations = joined_chunks_table(model, encoded, 128)
elif {way!r} == "preallocated":
    table, evaluations = inter.recombination_table(model, encoded, 128)
else:
    with torch.no_grad():
        table, evaluations = inter.recombination_table(model.fuse, model.separate(encoded), 128)
additive = inter.additive_projection(table)
OUT = {{"growth_mb": round(peak_rss_mb() - before, 1), "table_mb": round(table.numel() * 4 / 1e6, 1),
        "emap_s": round(time.perf_counter() - start, 2), "evaluations": evaluations, "checksum": round(float(additive.double().sum()), 3)}}
"""


def emap_rows(n: int = 200) -> list[dict]:
    rows = []
    for way in ("joined chunks", "preallocated", "late fusion"):
        got = _child(EMAP.format(n=n, way=way))
        rows.append(
            {
                "benchmark": f"EMAP, 3 modalities x {n} references ({n**3:,} inputs), table {way}",
                "value": got["peak_rss_mb"],
                "unit": "MB peak RSS",
                "growth_mb": got["growth_mb"],
                "table_mb": got["table_mb"],
                "emap_s": got["emap_s"],
                "checksum": got["checksum"],
            }
        )
    return rows


def late_fusion_rows(weights_cache: Path, n: int = 200) -> list[dict]:
    """EMAP on demo-late (2 modalities, n references) through the whole model and through its
    late-fusion hook: the same table, N passes of the encoders instead of N^2."""
    from mmdiag.pipeline.demo.catalog import load_data, load_model
    from mmdiag.stages import interaction as inter

    adapter, _ = load_model("demo-late", cache=weights_cache)
    data = load_data("shapes", "ood", n, 0)
    with torch.no_grad():
        encoded = adapter.encode(data.inputs)
        inter.recombination_table(adapter.forward, {m: t[:20] for m, t in encoded.items()}, 128)  # warm-up
        start = time.perf_counter()
        full, passes = inter.recombination_table(adapter.forward, encoded, 128)
        whole = time.perf_counter() - start
        start = time.perf_counter()
        late, evaluations = inter.recombination_table(adapter.fuse, adapter.separate(encoded), 128)
        hooked = time.perf_counter() - start
    return [
        {
            "benchmark": f"EMAP on demo-late, {n} x {n} recombinations: late-fusion hook vs whole model",
            "value": round(hooked, 3),
            "unit": "s",
            "whole_model_s": round(whole, 3),
            "speedup": round(whole / hooked, 1),
            "model_passes_whole": passes,
            "encoder_passes_hook": n,
            "fusion_evaluations_hook": evaluations,
            "max_abs_difference": float((full - late).abs().max()),
        }
    ]


def run(sizes: list[int], pictures: int) -> list[dict]:
    from mmdiag.pipeline.demo.catalog import load_model
    from mmdiag.pipeline.device import resolve_device
    from mmdiag.pipeline.store import cache_root

    weights = cache_root(None)
    for name in ("demo-film", "demo-late"):
        load_model(name, cache=weights)  # trained on first use, outside the timings
    rows = late_fusion_rows(weights) + emap_rows()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if pictures:
            rows += picture_rows(pictures, work)
        rows += size_rows(sizes, work, weights)
    device = resolve_device("auto").type
    return [{**r, "device": device} for r in rows]


def main(argv: list[str] | None = None) -> int:
    from mmdiag.flows.bench.timing import print_rows
    from mmdiag.pipeline.store import write_json

    parser = argparse.ArgumentParser(prog="python -m mmdiag.flows.bench.scale", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000,5000,10000,20000", help="samples of the diagnosed split, comma-separated")
    parser.add_argument("--pictures", type=int, default=10_000, help="224 px images streamed through CLIP (0 skips)")
    parser.add_argument("--json", type=Path, default=Path("bench_scale.json"))
    args = parser.parse_args(argv)
    rows = run([int(s) for s in args.sizes.split(",")], args.pictures)
    print_rows(rows)
    write_json(args.json, {"rows": rows})
    print(json.dumps({"written": str(args.json), "rows": len(rows)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
