"""Small synthetic runs for the report tests: data like the demo's (16x16 images on a 4x4 patch
grid, short captions) and stage results shaped as the stages' contracts say.

Every array and summary name the report reads from a stage is written here and nowhere else in
the tests, so that a contract change is one edit.

Scenarios (the label is `colour XOR negation`; `mark` agrees with the label half the time):
- "shortcut": the model follows the corner mark on 60% of the samples where it disagrees with
  the label; attribution piles on the mark; the model is far from additive (FiLM-like);
- "additive": the model follows the mark everywhere and is additive (late-fusion-like);
- "clean": 5% errors spread uniformly, attribution on the shape and the negation.
"""

from __future__ import annotations

import numpy as np
import torch

from mmdiag.flows.summary import check
from mmdiag.pipeline.data import SampleSet
from mmdiag.stages.base import StageResult

SIZE, PATCH, LENGTH = 16, 4, 6
GRID = SIZE // PATCH
N_IMAGE = GRID * GRID  # image units, then LENGTH token positions
STAGES = ("unimodal", "crossmodal", "representation", "composition")
LAYERS = ("image", "text", "fused", "decision")
ATTACK = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'
WORDS = ["[PAD]", "[CLS]", "the", "circle", "square", "is", "not", "red"]


def make_data(n: int = 160, seed: int = 0, class_names=("false", "true"), extra_concept: str | None = None) -> SampleSet:
    rng = np.random.default_rng(seed)
    colour, negation, shape = rng.integers(0, 2, n), rng.integers(0, 2, n), rng.integers(0, 2, n)
    label = colour ^ negation
    mark = np.where(rng.random(n) < 0.5, label, 1 - label)
    image = rng.uniform(0.6, 0.9, (n, 3, SIZE, SIZE)).astype(np.float32)
    shape_mask = np.zeros((n, SIZE, SIZE), bool)
    shape_mask[:, 6:14, 6:14] = True
    image[:, 0][shape_mask] = np.repeat(np.where(colour, 0.9, 0.1), 64)
    mark_mask = np.zeros((n, SIZE, SIZE), bool)
    mark_mask[mark.astype(bool), :PATCH, :PATCH] = True
    image[:, :, :PATCH, :PATCH][mark.astype(bool)] = 0.0
    captions = [" ".join(w for w in ("the", ("circle", "square")[s], "is", "not" if g else "", "red") if w) for s, g in zip(shape, negation)]
    tokens = [["[CLS]", *c.split()] for c in captions]
    ids = torch.zeros(n, LENGTH, dtype=torch.long)
    for i, words in enumerate(tokens):
        ids[i, : len(words)] = torch.tensor([WORDS.index(w) if w in WORDS else 2 for w in words[:LENGTH]])
    meta = {"colour": colour, "negation": negation, "shape": shape, "mark": mark}
    if extra_concept:
        meta[extra_concept] = rng.integers(0, 2, n)
    return SampleSet(
        inputs={"image": torch.from_numpy(image), "text": ids},
        labels=torch.from_numpy(label),
        meta={k: torch.from_numpy(np.asarray(v)).long() for k, v in meta.items()},
        truth={
            "image": {"shape": torch.from_numpy(shape_mask), "mark": torch.from_numpy(mark_mask)},
            "text": {"negation": ids == WORDS.index("not")},
        },
        display={"text": tokens, "caption": captions},
        class_names=list(class_names),
        name="fixture",
    )


def attacked_data():
    """Fixture data whose strings attack the page: class names, a concept name, and the caption
    and tokens of the first two errors."""
    data = make_data(class_names=("no<b>", "yes&"), extra_concept="<img src=x onerror=alert(1)>")
    errors = (predictions(data, "shortcut") != data.labels.numpy()).nonzero()[0]
    data.display["caption"][errors[0]] = f"the circle is red {ATTACK}"
    data.display["text"][errors[1]] = ["[CLS]", "<script>window.__pwned=3</script>", "is", "red"]
    return data


def predictions(data: SampleSet, scenario: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)
    label, mark = data.labels.numpy(), data.meta["mark"].numpy()
    if scenario == "shortcut":
        return np.where((mark != label) & (rng.random(len(label)) < 0.6), mark, label)
    if scenario == "additive":
        return mark.copy()
    return np.where(rng.random(len(label)) < 0.05, 1 - label, label)


def model_result(data: SampleSet, pred: np.ndarray, unsure: float = 1.0) -> StageResult:
    """Logits of +-1 (p = 0.88), and of +-`unsure` where the prediction is wrong."""
    size = np.where(pred != data.labels.numpy(), unsure, 1.0)
    logits = np.stack([-(pred * 2.0 - 1) * size, (pred * 2.0 - 1) * size], 1).astype(np.float32)
    return StageResult({}, {"ids": data.ids.numpy(), "labels": data.labels.numpy(), "logits": logits})


def model_summary(data: SampleSet, pred: np.ndarray) -> dict:
    correct = pred == data.labels.numpy()
    return {
        "name": "fixture-model",
        "fingerprint": "0123456789abcdef",
        "split": "ood",
        "n": len(pred),
        "accuracy": round(float(correct.mean()), 4),
        "n_errors": int((~correct).sum()),
        "splits": {"ood": {"n": len(pred), "accuracy": round(float(correct.mean()), 4)}},
        "slices": [],
        "fusion": None,  # not declared
    }


def explained_rows(data: SampleSet, pred: np.ndarray, n_correct: int = 30) -> np.ndarray:
    wrong = np.nonzero(pred != data.labels.numpy())[0]
    right = np.nonzero(pred == data.labels.numpy())[0][:n_correct]
    return np.sort(np.concatenate([wrong, right]))


def unimodal_result(data: SampleSet, pred: np.ndarray, scenario: str, rows: np.ndarray) -> StageResult:
    rng = np.random.default_rng(2)
    n = len(rows)
    present = np.ones((n, N_IMAGE + LENGTH), bool)
    ids = data.inputs["text"].numpy()[rows]
    present[:, N_IMAGE:] = ids > 1  # [PAD] and [CLS] are never units
    attr = rng.normal(0, 0.05, present.shape)
    shape_units = [r * GRID + c for r in (1, 2, 3) for c in (1, 2, 3)]
    leans = data.meta["mark"].numpy()[rows] == pred[rows]
    if scenario == "clean":
        attr[:, shape_units] += 0.5
    else:
        attr[:, 0] += np.where(leans, 2.0, 0.5)  # the corner mark
        attr[:, shape_units] += np.where(scenario == "shortcut", 0.3, 0.0)
    attr[:, N_IMAGE:] += (ids == WORDS.index("not")) * 0.8
    attr *= present
    summary = {
        "n_explained": n,
        "n_errors_explained": int((pred[rows] != data.labels.numpy()[rows]).sum()),
        "skipped": [],
        "modality_share": {"image": {"mean": 0.7, "std": 0.1}, "text": {"mean": 0.3, "std": 0.1}},
        "modality_ablation": {
            "image": {"shapley": 0.5, "abs_shapley": 0.9, "share": 0.69},
            "text": {"shapley": 0.2, "abs_shapley": 0.4, "share": 0.31},
            "interaction": {"mean": 0.3, "abs_mean": 0.5},
            "pairs": {"image×text": {"mean": 0.3, "abs_mean": 0.5}},
        },
        "methods": {
            "shapley": {
                "deletion_auc": 0.3,
                "insertion_auc": 0.7,
                "completeness_error": 1e-6,
                "sanity_rank_corr": 0.05,
                "seconds": 1.0,
                "forward_passes": 100.0,
                "truth": {
                    "shape": {"n": n, "mass": 0.4, "enrichment": 2.0, "top1_rate": 0.5},
                    "mark": {"n": n // 2, "mass": 0.5 if scenario != "clean" else 0.05, "enrichment": 12.0 if scenario != "clean" else 0.8, "top1_rate": 0.9},
                    "negation": {"n": n // 2, "mass": 0.6, "enrichment": 2.5, "top1_rate": 0.9},
                },
            }
        },
    }
    arrays = {
        "rows": rows,
        "ids": data.ids.numpy()[rows],
        "pred": pred[rows],
        "label": data.labels.numpy()[rows],
        "present": present,
        "sizes": np.array([N_IMAGE, LENGTH]),
        "modality_shapley": rng.normal(0, 1, (n, 2)),
        "interaction": rng.normal(0, 1, n),
        "attr.shapley.pred": attr,
        "attr.shapley.true": -attr,
    }
    return StageResult(summary, arrays)


def crossmodal_result(data: SampleSet, pred: np.ndarray, scenario: str, rows: np.ndarray) -> StageResult:
    rng = np.random.default_rng(3)
    n = len(rows)
    ids = data.inputs["text"].numpy()[rows]
    mixed = rng.normal(0, 0.01, (n, N_IMAGE, LENGTH))
    shape_units = [r * GRID + c for r in (1, 2, 3) for c in (1, 2, 3)]
    strength = 0.5 if scenario != "additive" else 0.0
    for k in range(n):
        mixed[k, shape_units, :] += strength * (ids[k] == WORDS.index("not")) + strength * (ids[k] == WORDS.index("circle"))
        mixed[k, 0, :] += 0.05 if scenario == "additive" else 0.0
    mixed *= (ids > 1)[:, None, :]
    labels, accuracy = data.labels.numpy(), float((pred == data.labels.numpy()).mean())
    graphs = {}
    for k, row in enumerate(rows):
        words = data.display["text"][row]
        top = np.argsort(-np.abs(mixed[k]), axis=None)[:6]
        nodes, edges = {}, []
        for flat in top:
            a, b = np.unravel_index(flat, mixed[k].shape)
            na, nb = f"image:r{a // GRID}c{a % GRID}", f"text:{b}"
            nodes[na] = {"id": na, "modality": "image", "label": na.split(":")[1]}
            nodes[nb] = {"id": nb, "modality": "text", "label": words[b] if b < len(words) else str(b)}
            edges.append({"source": na, "target": nb, "weight": float(mixed[k, a, b])})
        graphs[str(int(data.ids[row]))] = {"nodes": list(nodes.values()), "edges": edges}
    ref = np.arange(min(120, len(labels)))
    full = np.stack([-(pred[ref] * 2.0 - 1), pred[ref] * 2.0 - 1], 1)
    additive = full if scenario == "additive" else rng.normal(0, 1, full.shape)
    summary = {
        "full_accuracy": round(accuracy, 4),
        "additive_accuracy": round(accuracy if scenario == "additive" else 0.5, 4),
        "interaction_share": 0.02 if scenario == "additive" else 0.6,
        "n_reference": len(ref),
        "modality_interaction": 0.1,
        "top_pairs": [
            {"units": ["r1c1", "not"], "modalities": ["image", "text"], "count": 12, "mean_weight": 0.4},
            {"units": ["r0c0", "red"], "modalities": ["image", "text"], "count": 5, "mean_weight": -0.1},
        ],
        "additive_follows": {"mark": 0.98 if scenario == "additive" else 0.7, "negation": 0.5},
        "full_follows": {"mark": 0.7, "negation": 0.5},
        "dime": {"unimodal_abs_mean": 0.5, "interaction_abs_mean": 0.02 if scenario == "additive" else 0.4},
        "n_explained": len(rows),
        "methods": {"emap": {"forward_passes": 240}, "mixed_gradients": {"forward_passes": 3 * len(rows), "path": "forward-over-reverse"}},
    }
    arrays = {
        "ids": data.ids.numpy()[rows],
        "pred": pred[rows],
        "label": labels[rows],
        "mixed.image.text": mixed.astype(np.float32),
        "emap.ids": data.ids.numpy()[ref],
        "emap.full": full,
        "emap.additive": additive,
        "dime.unimodal": rng.normal(0, 1, len(ref)),
        "dime.interaction": rng.normal(0, 1, len(ref)),
    }
    return StageResult(summary, arrays, {"graphs": graphs})


def representation_result(data: SampleSet, pred: np.ndarray, colour_selectivity: float = 0.4) -> StageResult:
    rng = np.random.default_rng(4)
    meta = {k: v.numpy() for k, v in data.meta.items()}
    n, d = len(pred), 8
    decision = rng.normal(0, 1, (n, d))
    decision[:, 0] += 3 * meta["mark"]
    decision[:, 1] += 3 * meta["negation"]
    decision[:, 2] += 3 * meta["colour"] * (colour_selectivity > 0.1)
    decision[:, 3] += 3 * pred
    concepts = {0: "mark", 1: "negation", 2: "colour" if colour_selectivity > 0.1 else None, 3: None}
    features = [{"feature": f, "concept": concepts.get(f), "auroc": 0.95 if concepts.get(f) else 0.5, "modality_dependence": {"image": 0.5, "text": 0.5}} for f in range(d)]
    probes = {c: {layer: {"accuracy": 0.9, "control": 0.5, "selectivity": 0.4, "n": n, "n_test": n // 3} for layer in LAYERS} for c in ("mark", "negation", "colour", "shape")}
    probes["colour"]["decision"] = {"accuracy": 0.5 + colour_selectivity, "control": 0.5, "selectivity": colour_selectivity, "n": n, "n_test": n // 3}
    summary = {
        "n": n,
        "layers": {layer: {"shape": [d], "width": d} for layer in LAYERS},
        "probes": probes,
        "features": features,
        "assigned": {c: 1 for c in concepts.values() if c is not None},
        "unassigned_share": 0.5,
        "dead_features": 0,
        "skipped": [],
    }
    arrays = {
        "ids": data.ids.numpy(),
        "decision": decision.astype(np.float32),
        "pred": pred,
        "label": data.labels.numpy(),
        "feature.top_ids": np.argsort(-decision, 0)[:5].T.copy(),
        "feature.bottom_ids": np.argsort(decision, 0)[:5].T.copy(),
    }
    return StageResult(summary, arrays)


def _full(weights: np.ndarray, support: np.ndarray, width: int) -> np.ndarray:
    out = np.zeros((len(weights), width))
    out[:, support] = weights
    return out


def composition_result(data: SampleSet, pred: np.ndarray, decision: np.ndarray) -> StageResult:
    """Stage 4's layout: the chosen surrogate's centred weights (C, all features; zero off its
    support), its support (S feature ids), per-sample contributions to the predicted class (N, S),
    and per error the push (w[pred] - w[label]) * x (E, S)."""
    support = np.array([0, 3])
    weights = np.array([[-1.0, -0.5], [1.0, 0.5]])  # the mark feature first
    x = decision[:, support]
    labels = data.labels.numpy()
    wrong = pred != labels
    summary = {
        "fidelity": 0.93,
        "n_features": {"chosen": 2, "total": decision.shape[1], "kept": decision.shape[1]},
        "path": {"lambda": [1.0, 0.1], "n_features": [1, 2], "fidelity": [0.7, 0.93], "chosen": 1, "margin": 0.02},
        "per_class": {
            name: [{"feature": 0, "weight": float(weights[k, 0]), "concept": "mark"}, {"feature": 3, "weight": float(weights[k, 1]), "concept": None}] for k, name in enumerate(data.class_names)
        },
        "simulation": {"top3": 0.9, "top5": 0.95},
        "dropped": {"constant": []},
        "n_samples": {"fit": len(pred) * 2 // 3, "heldout": len(pred) - len(pred) * 2 // 3},
        "errors": {"n": int(wrong.sum()), "top_push": [{"feature": 0, "mean_push": 1.0, "concept": "mark"}]},
        "exact": {"applies": False, "reason": "a fixture"},
    }
    arrays = {
        "ids": data.ids.numpy(),
        "pred": pred,
        "label": labels,
        "weights": _full(weights, support, decision.shape[1]),
        "bias": np.zeros(2),
        "support": support,
        "contrib": (weights[pred] * x).astype(np.float32),
        "error.ids": data.ids.numpy()[wrong],
        "error.push": ((weights[pred[wrong]] - weights[labels[wrong]]) * x[wrong]).astype(np.float32),
    }
    return StageResult(summary, arrays)


def run(scenario: str = "shortcut", stages=STAGES, data: SampleSet | None = None, colour_selectivity: float = 0.4) -> tuple[dict, dict, SampleSet]:
    """(summary, results, data) of a synthetic run with the given stages."""
    data = data if data is not None else make_data()
    pred = predictions(data, scenario)
    rows = explained_rows(data, pred)
    # a clean model errs where it is unsure (a model equally sure of its errors is a right model
    # with wrong labels); the shortcut's and the additive model's errors are confident
    results = {"model": model_result(data, pred, unsure=0.2 if scenario == "clean" else 1.0)}
    if "unimodal" in stages:
        results["unimodal"] = unimodal_result(data, pred, scenario, rows)
    if "crossmodal" in stages:
        results["crossmodal"] = crossmodal_result(data, pred, scenario, rows)
    rep = representation_result(data, pred, colour_selectivity)
    if "representation" in stages:
        results["representation"] = rep
    if "composition" in stages:
        results["composition"] = composition_result(data, pred, rep.arrays["decision"])
    summary = {"schema": "mmdiag.summary/1", "run": {"name": f"fixture-{scenario}", "created": "2025-01-01T00:00:00+00:00", "device": "cpu"}, "model": model_summary(data, pred)}
    for name in STAGES:
        if name in results:
            summary[name] = results[name].summary
    summary["stages"] = {name: {"seconds": 0.5, "cached": name == "model", "key": "feedc0ffee", "model": "0123456789abcdef"} for name in results}
    check(summary)  # shaped as a run's (flows/summary.py), so the report reads what a run writes
    return summary, results, data


def provenance(summary: dict) -> dict:
    return {
        "created": summary["run"]["created"],
        "config": {"run": summary["run"]["name"], "model": {"name": "fixture-model"}, "data": {"name": "fixture", "split": "ood"}},
        "model": {"fingerprint": "0123456789abcdef", "weights_from_cache": True},
        "data": {"ood": {"fingerprint": "fedcba9876543210", "n": summary["model"]["n"]}},
        "device": "cpu",
        "versions": {"python": "3.x", "mmdiag": "0.1.0"},
        "stages": summary["stages"],
    }
