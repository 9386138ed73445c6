"""Stage 3, representation probing: what the model's layers encode.

Over the analysed split it reads the adapter's named layers (each modality's encoder output, the
fused representation, the decision-level features before the head) in batches, then:

- fits a linear probe (a ridge classifier, in closed form) for every concept of the samples'
  `meta` on every layer, with a seeded, stratified held-out split, and the same probe on
  seeded-shuffled labels (the control task of Hewitt & Liang 2019): selectivity = accuracy -
  control accuracy;
- for every decision-level feature (a unit of `decision_layer`): its AUROC for every concept,
  the best-matching concept (or none under `auroc_threshold`), its top- and bottom-activating
  samples, and its modality dependence: the mean |feature(x) - feature(x with modality m at
  its baseline)| per modality, divided by the sum over modalities (0 everywhere for a feature
  that nothing changes);
- a local view of one feature: unit attributions of its activation by a stage 1 method, on its
  top-activating samples.

Settings (RepresentationConfig):
    layers           layers to probe; None = all the adapter's layers
    decision_layer   the layer whose units are the "features" (a (B, D) output)
    holdout          share of each concept's known samples held out to score the probes
    ridge            the probes' L2 penalty (on standardised activations)
    auroc_threshold  a feature whose best direction-free AUROC is below this is unassigned
    top_k            top- and bottom-activating samples kept per feature
    batch_size       samples per batch while reading the layers (each goes through the model
                     with one copy per modality removed); None: 256 on a CPU, 4096 on CUDA
    max_width        wider layers are reduced before probing: a spatial map (B, C, H, W) is
                     average-pooled to the largest square grid with C * g * g <= max_width, a
                     sequence (B, L, D) averaged over positions, and what is still wider
                     average-pooled along its flattened values
    feature          the feature of the local view; None = the one whose AUROC is furthest
                     from 0.5
    local_method     a stage 1 method for the local view; None skips it

Concepts: `meta` values < 0 are unknown; each probe uses only the samples where its concept is
known and says how many. A concept with fewer than two values is skipped, with the reason, in
the summary's `skipped`. A multi-valued concept gets one probe over all its values, and one-vs-rest
AUROC columns named `concept=value`; a binary one is one column named after the concept, its
positive class the larger value. A feature is matched to the column it separates best in either
direction, max(a, 1 - a); the AUROC reported is the raw one, so above 0.5 the feature is higher
where the concept holds, below 0.5 lower.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import Tensor
from torch.nn import functional as F

from mmdiag.pipeline.adapter import ModelAdapter
from mmdiag.pipeline.data import SampleSet
from mmdiag.pipeline.device import fit_batch
from mmdiag.pipeline.errors import MmdiagError
from mmdiag.stages import attribution as attr
from mmdiag.stages import methods, summaries
from mmdiag.stages.base import Context, Stage, StageConfig, StageResult

FIELD = "stages.representation"


class RepresentationConfig(StageConfig):
    layers: list[str] | None = Field(default=None, min_length=1)
    decision_layer: str = "decision"
    holdout: float = Field(default=0.3, gt=0, lt=1)
    ridge: float = Field(default=1.0, gt=0)
    auroc_threshold: float = Field(default=0.75, ge=0.5, le=1)
    top_k: int = Field(default=8, gt=0)
    batch_size: int | None = Field(default=None, gt=0)  # None: 256 on a CPU, 4096 on CUDA
    max_width: int = Field(default=256, gt=0)
    feature: int | None = Field(default=None, ge=0)
    # IBA needs a class to score: a single feature has none
    local_method: str | None = "integrated_gradients"

    @field_validator("local_method")
    @classmethod
    def _local(cls, name: str | None) -> str | None:
        local = [m for m in methods.names() if methods.get(m).local]
        if name is not None and name not in local:
            raise ValueError(f"{name!r} is not a method the local view can run; choose one of: {', '.join(local)}")
        return name


def reduce(x: Tensor, max_width: int) -> Tensor:
    """A layer's output (B, ...) as (B, <= max_width) values (see max_width above)."""
    if x.dim() == 4:
        g = max(1, math.isqrt(max_width // x.shape[1]))
        x = F.adaptive_avg_pool2d(x, (min(g, x.shape[2]), min(g, x.shape[3])))
    elif x.dim() == 3:
        x = x.mean(1)
    x = x.flatten(1)
    if x.shape[1] > max_width:
        x = F.adaptive_avg_pool1d(x[:, None], max_width)[:, 0]
    return x.float()


@dataclass
class Activations:
    layers: dict[str, Tensor]  # (N, width) reduced activations, on the CPU
    shapes: dict[str, list[int]]  # each layer's own output shape per sample
    decision: Tensor  # (N, D) the decision layer, unreduced
    logits: Tensor  # (N, C)
    change: Tensor  # (D, M) mean |feature(x) - feature(x with modality m at its baseline)|


def collect(adapter: ModelAdapter, data: SampleSet, names: list[str], decision: str, max_width: int, batch_size: int, device: torch.device) -> Activations:
    """Read the layers batch by batch, keeping only the reduced activations. Each batch goes
    through the model once, stacked with its copies where one modality is removed whole
    (`Units.apply` with no unit kept, as stage 1's `Game.removed`), for modality dependence."""
    mods = adapter.modalities
    parts: dict[str, Tensor] = {}  # preallocated at the first batch: no list of pieces joined at the end
    kept, outputs, change, shapes = [], [], 0.0, {}
    with adapter.reading(list(dict.fromkeys([*names, decision]))) as seen, torch.no_grad():
        for rows, inputs in data.batches(batch_size, device):
            encoded = adapter.encode(inputs)
            units = adapter.units(inputs, encoded)
            b = rows.stop - rows.start
            removed = {m: units[m].apply(encoded[m], torch.zeros(b, units[m].n, dtype=torch.bool, device=device)) for m in mods}
            stacked = {m: torch.cat([encoded[m], *(removed[m] if k == m else encoded[m] for k in mods)]) for m in mods}
            logits = adapter.forward(stacked)
            features = seen[decision]
            if features.dim() != 2:
                raise MmdiagError(f"{FIELD}.decision_layer: layer {decision!r} gives outputs shaped {tuple(features.shape[1:])} per sample; name a layer with one vector per sample (B, D)")
            features = features.float().reshape(len(mods) + 1, b, -1)
            change = change + (features[1:] - features[:1]).abs().sum(1)
            kept.append(features[0].cpu())
            outputs.append(logits[:b].float().cpu())
            for n in names:
                shapes[n] = list(seen[n].shape[1:])
                reduced = reduce(seen[n][:b], max_width).cpu()
                if n not in parts:
                    parts[n] = torch.empty(len(data), reduced.shape[1], dtype=reduced.dtype)
                parts[n][rows] = reduced
    return Activations(
        layers=parts,
        shapes=shapes,
        decision=torch.cat(kept),
        logits=torch.cat(outputs),
        change=(change / len(data)).T.cpu(),
    )


def concepts(meta: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, list[int]], list[dict]]:
    """The probeable concepts as class indices 0..K-1 (-1 where unknown), the original value of
    each class, and the concepts skipped with the reason."""
    usable, values, skipped = {}, {}, []
    for name, v in meta.items():
        known = v >= 0
        found, counts = v[known].unique(return_counts=True)
        if len(found) < 2:
            skipped.append({"concept": name, "reason": f"{len(found)} distinct known value(s) in {int(known.sum())} samples; a probe needs two"})
            continue
        if counts.max() < 2:
            skipped.append({"concept": name, "reason": f"each of its {len(found)} known values occurs once; a held-out split needs a value seen twice"})
            continue
        index = torch.full_like(v, -1)
        index[known] = torch.searchsorted(found, v[known])
        usable[name], values[name] = index, found.tolist()
    return usable, values, skipped


def stratified_test(y: Tensor, holdout: float, generator: torch.Generator) -> Tensor:
    """(N,) bool: a seeded held-out share of each class's known samples, at least one of a class
    seen twice, never all of a class."""
    test = torch.zeros(len(y), dtype=torch.bool)
    for k in range(int(y.max()) + 1):
        rows = (y == k).nonzero().flatten()
        rows = rows[torch.randperm(len(rows), generator=generator)]
        test[rows[: min(max(1, round(holdout * len(rows))), len(rows) - 1)]] = True
    return test


def shuffled(y: Tensor, generator: torch.Generator) -> Tensor:
    """The control task: the known labels permuted among the known samples."""
    out, known = y.clone(), (y >= 0).nonzero().flatten()
    out[known] = y[known[torch.randperm(len(known), generator=generator)]]
    return out


def fit_probes(acts: dict[str, Tensor], targets: dict[str, Tensor], config: RepresentationConfig, seed: int, device: torch.device) -> dict[str, dict[str, dict]]:
    """Every probe in closed form: a ridge classifier (least squares to the one-hot classes with
    an L2 penalty `ridge` and an unpenalised intercept; the prediction is the highest score, as
    scikit-learn's RidgeClassifier) from each standardised layer to each concept and to its
    control task. A layer's probes for every concept and control are one batched solve: a few
    large operations, so the fit takes well under a second on a CPU.
    Returns {concept: {layer: {accuracy, control, selectivity, n, n_test, unknown}}}."""
    if not acts or not targets:
        return {}
    generator = torch.Generator().manual_seed(seed)
    labels, train, test = [], [], []
    for y in targets.values():
        held = stratified_test(y, config.holdout, generator)
        labels.append(torch.stack([y, shuffled(y, generator)]))
        train.append((y >= 0) & ~held)
        test.append((y >= 0) & held)
    y = torch.stack(labels).to(device)  # (C, 2, N): each concept, then its control
    train, test = torch.stack(train).float().to(device), torch.stack(test).float().to(device)  # (C, N)
    c, n = train.shape
    widest = int(y.max()) + 1
    valid = torch.arange(widest, device=device) < y.amax(dim=(1, 2))[:, None] + 1  # (C, widest)
    onehot = F.one_hot(y.clamp_min(0), widest).float().permute(0, 2, 1, 3).reshape(c, n, 2 * widest)
    accuracy = []
    for a in acts.values():
        x = F.pad(standardise(a).to(device), (0, 1), value=1.0)  # the constant column is the intercept
        penalty = torch.diag(torch.cat([torch.full((a.shape[1],), config.ridge), torch.zeros(1)])).to(device)
        # (C, D+1, D+1): each concept's own training rows, one concept at a time (a (C, N, D)
        # temporary is 150 MB a layer at 20k samples)
        gram = torch.stack([x.T @ (x * w[:, None]) for w in train])
        weights = torch.linalg.solve(gram + penalty, x.T @ (onehot * train[..., None]))
        scores = (x @ weights).reshape(c, n, 2, widest).masked_fill(~valid[:, None, None], -torch.inf)
        right = (scores.argmax(-1).transpose(1, 2) == y).float()  # (C, 2, N)
        accuracy.append((right * test[:, None]).sum(-1) / test.sum(-1, keepdim=True))
    accuracy = torch.stack(accuracy, 1).cpu()  # (C, L, 2)
    out = {}
    for (concept, yc), acc, held in zip(targets.items(), accuracy, test):
        known = int((yc >= 0).sum())
        out[concept] = {
            layer: {
                "accuracy": round(float(real), 4),
                "control": round(float(control), 4),
                "selectivity": round(float(real - control), 4),
                "n": known,
                "n_test": int(held.sum()),  # the held-out samples that score it
                "unknown": n - known,
            }
            for layer, (real, control) in zip(acts, acc)
        }
    return out


def standardise(a: Tensor) -> Tensor:
    """Zero mean, unit variance per column over all samples (label-free: nothing of the held-out
    labels leaks); constant columns become 0."""
    std = a.std(0).nan_to_num(0)
    return (a - a.mean(0)) / torch.where(std > 1e-8, std, 1.0)


def ranks(x: Tensor) -> Tensor:
    """(D, n) average rank (1-based, ties sharing their mean rank) of each value of x (n, D)
    within its column."""
    xt = x.T.contiguous().double()
    s = xt.sort(dim=1).values
    return (torch.searchsorted(s, xt) + torch.searchsorted(s, xt, right=True) + 1) / 2


def auroc(rank: Tensor, positive: Tensor) -> Tensor:
    """AUROC of every feature for a binary label, from its ranks: the chance that a positive
    sample scores above a negative one, ties counting half (Mann-Whitney U)."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    return ((rank[:, positive].sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).float()


def auroc_table(features: Tensor, targets: dict[str, Tensor], values: dict[str, list[int]]) -> tuple[Tensor, list[str]]:
    """(D, columns) raw AUROC of each feature for each concept column, over the samples where
    the concept is known, and the column names."""
    columns, names = [], []
    for c, y in targets.items():
        known = y >= 0
        rank, k = ranks(features[known]), len(values[c])
        for cls in [1] if k == 2 else range(k):
            columns.append(auroc(rank, y[known] == cls))
            names.append(c if k == 2 else f"{c}={values[c][cls]}")
    return (torch.stack(columns, 1) if columns else torch.zeros(features.shape[1], 0)), names


class FeatureTarget(ModelAdapter):
    """The adapter's model with one decision-level feature as its only output "class": stage 1's
    methods, given target 0, attribute that feature's activation."""

    def __init__(self, inner: ModelAdapter, layer: str, feature: int):
        self.inner, self.layer, self.feature = inner, layer, feature
        self.modalities, self.module, self.class_names = inner.modalities, inner.module, ["feature"]

    def encode(self, inputs):
        return self.inner.encode(inputs)

    def units(self, inputs, encoded):
        return self.inner.units(inputs, encoded)

    def forward(self, encoded):
        with self.inner.reading([self.layer]) as seen:
            self.inner.forward(encoded)
        return seen[self.layer][:, self.feature : self.feature + 1].float()


def local_view(ctx: Context, config: RepresentationConfig, feature: int, rows: Tensor) -> tuple[Tensor, Tensor, list[int]]:
    """Unit attributions (n, F) of the feature's activation on the given samples, which units
    exist (n, F), and the units per modality."""
    subset = ctx.data.subset(rows)
    inputs = {m: x.to(ctx.device) for m, x in subset.inputs.items()}
    target = FeatureTarget(ctx.adapter, config.decision_layer, feature)
    with torch.no_grad():
        encoded = {m: t.detach() for m, t in target.encode(inputs).items()}
    game = attr.Game(target, encoded, target.units(inputs, encoded), torch.zeros(len(rows), dtype=torch.long, device=ctx.device))
    scores, _ = methods.attribute(config.local_method, game, generator=torch.Generator().manual_seed(ctx.seed))
    return scores.detach().cpu(), game.present.cpu(), game.sizes


def _check(adapter: ModelAdapter, config: RepresentationConfig) -> list[str]:
    """The layers to probe, after checking every name against the model."""
    have = list(adapter.layers())
    if not have:
        raise MmdiagError(f"{FIELD}: the model names no layers; give its adapter layers (e.g. TorchAdapter(layers=...))")
    for field, name in [*(("layers", n) for n in config.layers or []), ("decision_layer", config.decision_layer)]:
        if name not in have:
            raise MmdiagError(f"{FIELD}.{field}: the model has no layer {name!r}; it has {', '.join(have)}")
    return list(dict.fromkeys(config.layers or have))


def _finite(acts: Activations, names: list[str], decision: str, modalities: tuple[str, ...], ids: Tensor) -> tuple[dict[str, Tensor], list[dict]]:
    """The layers whose activations are all finite; the others are skipped with the reason. The
    decision layer is the features themselves: there, non-finite values are an error, with or
    without a modality."""
    bad = ~torch.isfinite(acts.decision).all(1)
    if bad.any():
        raise MmdiagError(f"{FIELD}.decision_layer: layer {decision!r} gives NaN or inf for {int(bad.sum())} samples (first id {int(ids[bad][0])}); fix the model or those inputs")
    for m, finite in zip(modalities, torch.isfinite(acts.change).all(0)):
        if not finite:
            raise MmdiagError(f"{FIELD}.decision_layer: layer {decision!r} gives NaN or inf when modality {m!r} is removed (every unit at its baseline); give {m} a baseline the model accepts")
    kept, skipped = {}, []
    for n in names:
        bad = ~torch.isfinite(acts.layers[n]).all(1)
        if bad.any():
            skipped.append({"layer": n, "reason": f"NaN or inf activations for {int(bad.sum())} samples (first id {int(ids[bad][0])})"})
        else:
            kept[n] = acts.layers[n]
    return kept, skipped


def describe(raw: Tensor, columns: list[str], dependence: Tensor, modalities: tuple[str, ...], threshold: float) -> list[dict]:
    """One entry per feature: the concept column it separates best (direction-free, max(a, 1 - a));
    the concept is None when that is under the threshold, and concept and AUROC are None when
    the data has no concepts. The AUROC is that column's raw value, which keeps the direction."""
    free = torch.maximum(raw, 1 - raw)
    out = []
    for j in range(raw.shape[0]):
        entry = {"feature": j, "concept": None, "auroc": None}
        if columns:
            c = int(free[j].argmax())
            entry |= {"concept": columns[c] if free[j, c] >= threshold else None, "auroc": round(float(raw[j, c]), 4)}
        entry["modality_dependence"] = {m: round(float(dependence[j, i]), 4) for i, m in enumerate(modalities)}
        out.append(entry)
    return out


def run(ctx: Context, config: RepresentationConfig, upstream: dict) -> StageResult:
    adapter = ctx.adapter.eval()
    if not adapter.layers() and config.layers is None:
        return StageResult({"skipped": "the model names no layers to read; give its adapter layers (e.g. TorchAdapter(layers=...)) to probe them"})
    names = _check(adapter, config)
    batch = fit_batch(config.batch_size or (4096 if ctx.device.type == "cuda" else 256), ctx.data.inputs, copies=len(adapter.modalities) + 1)
    acts = collect(adapter, ctx.data, names, config.decision_layer, config.max_width, batch, ctx.device)
    d, ids = acts.decision.shape[1], ctx.data.ids
    if config.feature is not None and config.feature >= d:
        raise MmdiagError(f"{FIELD}.feature: layer {config.decision_layer!r} has {d} features (0..{d - 1}); choose one of them or leave it unset")
    layers, skipped_layers = _finite(acts, names, config.decision_layer, adapter.modalities, ids)
    targets, values, skipped = concepts(ctx.data.meta)
    raw, columns = auroc_table(acts.decision, targets, values)
    total = acts.change.sum(1, keepdim=True)
    dependence = torch.where(total > 0, acts.change / total.clamp_min(1e-12), 0.0)  # a dead feature: 0 for every modality
    features = describe(raw, columns, dependence, adapter.modalities, config.auroc_threshold)
    k = min(config.top_k, len(ids))
    order = acts.decision.argsort(dim=0, descending=True, stable=True)
    summary = {
        "n": len(ids),
        "layers": {n: {"shape": acts.shapes[n], "width": acts.layers[n].shape[1]} for n in names},
        "probes": fit_probes(layers, targets, config, ctx.seed, ctx.device),
        "features": features,
        "assigned": dict(Counter(f["concept"] for f in features if f["concept"] is not None)),
        "unassigned_share": round(sum(f["concept"] is None for f in features) / d, 4),
        "dead_features": int((acts.decision.std(0) == 0).sum()),
        "skipped": skipped + skipped_layers,
    }
    arrays = {
        "ids": ids.numpy().astype(np.int64),
        "decision": acts.decision.numpy(),
        "pred": acts.logits.argmax(1).numpy(),
        "label": ctx.data.labels.numpy(),
        "feature.auroc": raw.numpy(),
        "feature.top_ids": ids[order[:k]].T.numpy(),
        "feature.bottom_ids": ids[acts.decision.argsort(dim=0, stable=True)[:k]].T.numpy(),
        "feature.modality_change": acts.change.numpy(),
        "feature.modality_dependence": dependence.numpy(),
        # the layers before the decision, reduced: what the inputs show before the model decides
        # (the refitted readout of label mistakes, reports/label_issues.py, reads them)
        **{f"layer.{n}": x.numpy() for n, x in layers.items() if n != config.decision_layer},
    }
    if config.local_method is not None:
        j = config.feature if config.feature is not None else max(range(d), key=lambda i: abs((features[i]["auroc"] or 0.5) - 0.5))
        rows = order[:k, j]
        scores, present, sizes = local_view(ctx, config, j, rows)
        share = torch.stack([(s.abs() * p).sum(1) for s, p in zip(scores.split(sizes, 1), present.split(sizes, 1))], 1)
        share = share / share.sum(1, keepdim=True).clamp_min(1e-12)
        summary["local"] = {
            "feature": j,
            "concept": features[j]["concept"],
            "method": config.local_method,
            "n": k,
            "modality_share": {m: round(float(share[:, i].mean()), 4) for i, m in enumerate(adapter.modalities)},
        }
        arrays |= {"local.ids": ids[rows].numpy(), f"local.{config.local_method}": scores.numpy(), "local.present": present.numpy(), "local.sizes": np.array(sizes)}
    details = {"layers": names, "auroc_columns": columns, "modalities": list(adapter.modalities), "concept_values": values}
    return StageResult(summary, arrays, details)


STAGE = Stage(
    "representation",
    run,
    RepresentationConfig,
    reads=(),
    writes=("representation.probes.<concept>.<layer>", "representation.features", "representation.unassigned_share"),
    modules=("mmdiag.stages.representation", "mmdiag.stages.unimodal", "mmdiag.stages.methods", "mmdiag.stages.attribution"),
    summary=summaries.RepresentationSummary,
    extensions=lambda settings: methods.METHODS.fingerprint([settings["local_method"]]),
)
