"""Benchmarks of the generative VLM path on demo-vlm: each stage's seconds and model inputs per
sample against the floor (inputs x the time of one input in a full batch), the shared prefix of
multi-token answers on and off, and our Shapley values against Captum's LLMAttribution
(ShapleyValueSampling over ImageMaskInput patches and TextTemplateInput words) on the same
model, samples and removal.

    python -m mmdiag.flows.bench.vlm [--json bench_vlm.json] [--samples 8]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from mmdiag.pipeline.store import write_json

MULTI = ["no", "yes", "apparently not", "the triangle"]  # two of them several tokens long


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _row(rows, name, value, unit, **extra):
    rows.append({"benchmark": name, "value": None if value is None else round(value, 5), "unit": unit, "device": "cpu", **extra})


def stage_rows(adapter, data, per_input: float, per_grad: float) -> list[dict]:
    """Every stage in-process with its default settings, as `mmdiag demo --models demo-vlm`
    runs them: seconds, and where the stage counts them, model inputs per explained sample."""
    from mmdiag.flows.results import with_timings
    from mmdiag.pipeline.evaluate import model_summary
    from mmdiag.pipeline.resolve import predict
    from mmdiag.stages import Context, StageResult, extended, registry

    device = torch.device("cpu")
    logits, secs = _timed(lambda: predict(adapter, data, device))
    rows: list[dict] = []
    _row(rows, f"demo-vlm: evaluate {len(data)} samples", secs, "s", forward_inputs_per_sample=1, over_floor=round(secs / (len(data) * per_input), 2))
    results = {"model": StageResult(model_summary(data, logits, "ood", {}, adapter.fusion), {"ids": data.ids.numpy(), "labels": data.labels.numpy(), "logits": logits.numpy()})}
    for stage in registry.stages():
        read = {r: results[r] for r in stage.reads}
        ctx = Context(adapter, extended(data, read), device, 0, logits)
        result, secs = _timed(lambda: stage.run(ctx, stage.config(), read))
        results[stage.name] = result
        summary = with_timings(result.summary, result.timings)
        extra = {}
        if stage.name == "unimodal":
            n = summary["n_explained"]
            for method, figures in summary["methods"].items():
                passes = figures["forward_passes"]
                floor = passes * (per_grad if method in ("grad_x_input", "integrated_gradients") else per_input)
                _row(rows, f"demo-vlm: stage 1 {method}, seconds per sample", figures["seconds"] / n, "s", forward_inputs_per_sample=passes, over_floor=round(figures["seconds"] / n / floor, 2))
            extra = {"explained": n}
        if stage.name == "crossmodal":
            for method, figures in summary["methods"].items():
                if "forward_passes" in figures:
                    extra[f"{method}_forward_inputs"] = figures["forward_passes"]
        _row(rows, f"demo-vlm: stage {stage.name}", secs, "s", **extra)
    return rows


def prefix_rows(model, data, repeats: int = 3) -> list[dict]:
    """Multi-token answers scored with the prompt's KV cache shared by the candidates, against
    each candidate appended to the whole prompt: seconds for the data set, and the largest
    difference between the two."""
    from mmdiag.pipeline.demo import vlm

    on, off = vlm.adapter(model, answers=MULTI), vlm.adapter(model, answers=MULTI, prefix_reuse=False)
    rows: list[dict] = []
    with torch.no_grad():
        a, b = on(data.inputs), off(data.inputs)
        t_on = min(_timed(lambda: on(data.inputs))[1] for _ in range(repeats))
        t_off = min(_timed(lambda: off(data.inputs))[1] for _ in range(repeats))
    _row(rows, f"demo-vlm: {len(MULTI)} answers (two multi-token), {len(data)} samples, prefix shared", t_on, "s")
    _row(
        rows,
        f"demo-vlm: {len(MULTI)} answers, {len(data)} samples, each answer after the whole prompt",
        t_off,
        "s",
        speedup_of_shared=round(t_off / t_on, 2),
        max_difference=float((a - b).abs().max()),
    )
    return rows


def _only(units: dict, modality: str) -> dict:
    """The units of one modality; the other's slots all kept (a one-modality game, as Captum's
    LLMAttribution plays it)."""
    from mmdiag.pipeline.units import Units

    return {m: u if m == modality else Units(torch.full_like(u.mask, -1), u.n, u.baseline, u.labels) for m, u in units.items()}


class _Tokenizer:
    """What Captum's LLMAttribution needs of a tokenizer, tokenising the prompt as vlm_samples
    does (template pieces and each word apart); a removed word's baseline is the empty string,
    so the prompt is written without it, as our deletion scores it."""

    def __init__(self, prompt):
        self.prompt, self.core = prompt, prompt.tokenizer

    def encode(self, text, return_tensors=None, add_special_tokens=True):
        ids = [i for chunk in text.split() for i in self.prompt.ids(chunk)]
        ids = self.prompt.prefix + ids + self.prompt.suffix
        return torch.tensor([ids]) if return_tensors == "pt" else ids

    def __call__(self, *args, **kwargs):  # Captum's pretty printing of the answer's tokens
        return self.core(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.core, name)


class _Wrapped(torch.nn.Module):
    """The LLaVA model as Captum calls it (input_ids and an attention mask, one sequence), with
    the sample's image unless the call brings its own pixels."""

    def __init__(self, model, pixels):
        super().__init__()
        self.model, self.pixels = model, pixels

    def forward(self, input_ids, attention_mask=None, pixel_values=None, **kwargs):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=self.pixels if pixel_values is None else pixel_values)


def captum_rows(adapter, data, n: int, pairs: int = 5, reference_pairs: int = 100) -> list[dict]:
    """Our antithetic Shapley sampler and Captum's ShapleyValueSampling inside LLMAttribution,
    each at 2 * `pairs` permutations, on one-modality games (image patches with the question
    kept; the question's words with the image kept), against our sampler at `reference_pairs`."""
    import PIL.Image
    from captum.attr import ImageMaskInput, LLMAttribution, ShapleyValueSampling, TextTemplateInput

    from mmdiag.pipeline.demo.vlm import IMAGE_MEAN
    from mmdiag.stages import attribution as attr

    rows: list[dict] = []
    model = adapter.module
    encoded = {m: t.detach() for m, t in adapter.encode(data.inputs).items()}
    units = adapter.units(data.inputs, encoded)
    target = data.labels
    side = adapter.grid.height // adapter.grid.unit
    patch_ids = torch.arange(side * side).reshape(side, side).repeat_interleave(adapter.grid.unit, 0).repeat_interleave(adapter.grid.unit, 1)
    baseline = tuple(int(round(c * 255)) for c in IMAGE_MEAN)  # the processor's mean colour: 0 once normalised
    processor = adapter.processor.image_processor
    for modality in ("image", "text"):
        game = attr.Game(adapter, encoded, _only(units, modality), target)
        (ours, secs) = _timed(lambda: attr.shapley_sampling(game, pairs=pairs, generator=torch.Generator().manual_seed(0)))
        reference = attr.shapley_sampling(attr.Game(adapter, encoded, _only(units, modality), target), pairs=reference_pairs, generator=torch.Generator().manual_seed(1))
        theirs, their_secs = [], 0.0
        for i in range(n):
            ids = data.inputs["text"][i][data.inputs["text"][i] != adapter.pad_id]
            answer = torch.tensor(adapter.candidates[int(target[i])])
            if modality == "image":
                picture = PIL.Image.fromarray(data.display["pixels"][i])
                inp = ImageMaskInput(
                    picture, mask=patch_ids, baseline=baseline, processor_fn=lambda im, ids=ids: {"input_ids": ids[None], "pixel_values": processor(images=[im], return_tensors="pt")["pixel_values"]}
                )
                llm = LLMAttribution(ShapleyValueSampling(_Wrapped(model, None)), _Tokenizer(adapter.prompt))
            else:
                slots = units["text"].mask[i, :, 0]
                words = [units["text"].labels[i][s] for s in slots[slots >= 0].unique().tolist()]
                inp = TextTemplateInput(" ".join("{}" for _ in words), values=words, baselines=["" for _ in words])
                llm = LLMAttribution(ShapleyValueSampling(_Wrapped(model, data.inputs["image"][i : i + 1])), _Tokenizer(adapter.prompt))
            torch.manual_seed(i)
            result, s = _timed(lambda: llm.attribute(inp, target=answer, n_samples=2 * pairs, forward_in_tokens=False))
            their_secs += s
            theirs.append(result.seq_attr.detach().flatten())
        present = game.present[:n]
        ours_v = ours[:n][present].numpy()
        ref_v = reference[:n][present].numpy()
        theirs_v = torch.cat(theirs).numpy()

        def error(v):
            return float(np.linalg.norm(v - ref_v) / np.linalg.norm(ref_v))

        _row(rows, f"demo-vlm {modality} Shapley, ours ({2 * pairs} permutations): seconds per sample", secs / len(data), "s", relative_error_vs_reference=round(error(ours_v), 3))
        _row(
            rows,
            f"demo-vlm {modality} Shapley, Captum LLMAttribution ({2 * pairs} permutations): seconds per sample",
            their_secs / n,
            "s",
            relative_error_vs_reference=round(error(theirs_v), 3),
            correlation_with_ours=round(float(np.corrcoef(ours_v, theirs_v)[0, 1]), 3),
            speedup_of_ours=round((their_secs / n) / (secs / len(data)), 1),
            samples=n,
        )
    return rows


def run(n_captum: int = 8) -> list[dict]:
    from mmdiag.flows.bench.timing import per_input_forward, per_input_gradient
    from mmdiag.pipeline.demo import vlm
    from mmdiag.pipeline.demo.catalog import MODELS
    from mmdiag.pipeline.hf.vlm import vlm_samples

    rows: list[dict] = []
    (model, cached), secs = _timed(lambda: vlm.load_or_train(MODELS["demo-vlm"]))
    _row(rows, "demo-vlm: train (or load from the weights cache)", secs, "s", cached=cached, parameters=sum(p.numel() for p in model.parameters()))
    adapter = vlm.adapter(model)
    data = vlm.split("ood")
    encoded = {m: t.detach() for m, t in adapter.encode(data.subset(torch.arange(64)).inputs).items()}
    per_input, per_grad = per_input_forward(adapter, encoded, 64), per_input_gradient(adapter, encoded, 64)
    _row(rows, "demo-vlm: forward, per model input in a batch of 64 (floor)", per_input * 1e6, "us")
    _row(rows, "demo-vlm: forward + backward, per model input in a batch of 64 (floor)", per_grad * 1e6, "us")
    rows += stage_rows(adapter, data, per_input, per_grad)
    rows += prefix_rows(model, data.subset(torch.arange(256)))
    # the same samples as uint8 pictures through the processor, so that Captum's PIL path sees what we see
    few = data.subset(torch.arange(n_captum))
    pictures = (few.inputs["image"] * torch.tensor(vlm.IMAGE_STD)[:, None, None] + torch.tensor(vlm.IMAGE_MEAN)[:, None, None]).clamp(0, 1)
    pictures = (pictures * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    asked = vlm_samples(adapter, list(pictures), [q.removesuffix("?") for q in few.display["caption"]], [vlm.ANSWERS[int(y)] for y in few.labels])
    asked.display["pixels"] = list(pictures)
    rows += captum_rows(adapter, asked, n_captum)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmdiag.flows.bench.vlm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="bench_vlm.json", help="where to write the rows (default: bench_vlm.json)")
    parser.add_argument("--samples", type=int, default=8, help="samples for the Captum comparison (default: 8)")
    args = parser.parse_args(argv)
    rows = run(args.samples)
    width = max(len(r["benchmark"]) for r in rows)
    for r in rows:
        extra = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("benchmark", "value", "unit", "device"))
        print(f"{r['benchmark']:<{width}}  {r['value'] if r['value'] is not None else '-':>10} {r['unit']:<3} {extra}")
    write_json(args.json, rows)
    print(json.dumps({"written": args.json, "rows": len(rows)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
