"""Stage 2, cross-modal interaction: which parts of different modalities the model combines, and
how much of its behaviour is non-additive.

Over a reference set it computes EMAP (the additive projection of the model) and DIME's split of
each logit into unimodal contribution and interaction. For the samples stage 1 explained it
computes the mixed second derivative of the predicted class's logit between every pair of units
of different modalities, Shapley interaction indices of each sample's strongest pairs, and an
interaction graph per sample (GraphML under graphs/). The exact modality-level interaction is
stage 1's (read, not recomputed).
"""

from __future__ import annotations

import itertools
import time
from collections import defaultdict

import networkx as nx
import torch
from pydantic import Field

from mmdiag.pipeline.errors import MmdiagError
from mmdiag.stages import attribution as attr
from mmdiag.stages import interaction as inter
from mmdiag.stages import summaries
from mmdiag.stages.base import Context, Heartbeat, Stage, StageConfig, StageResult
from mmdiag.stages.unimodal import _eval_batch


class CrossmodalConfig(StageConfig):
    n_reference: int | None = Field(default=None, gt=1)  # EMAP's reference set (n^M model inputs); None: 200, or all samples if fewer
    batch_size: int = Field(default=32, gt=0)  # samples differentiated together
    eval_batch: int | None = Field(default=None, gt=0)  # model inputs per forward; None: 128 on CPU, 8192 on CUDA
    edges: int = Field(default=12, gt=0)  # strongest unit pairs kept in each sample's graph
    shapley_pairs: int = Field(default=3, ge=0)  # strongest pairs per sample given a Shapley interaction index
    shapley_draws: int = Field(default=24, gt=0)  # coalitions sampled per pair
    pairs_per_sample: int = Field(default=3, gt=0)  # a sample's strongest pairs counted in top_pairs
    top_pairs: int = Field(default=10, gt=0)  # pairs listed in summary.json


def check_inputs(ctx: Context, config: CrossmodalConfig) -> None:
    mods = ctx.adapter.modalities
    if len(mods) < 2:
        raise MmdiagError(f"stages.crossmodal: the model has one modality ({mods[0]}); cross-modal interaction needs two or more, drop the stage")
    if config.n_reference is not None and config.n_reference > len(ctx.data):
        raise MmdiagError(f"stages.crossmodal.n_reference: {config.n_reference} reference samples asked for, the analysed split has {len(ctx.data)}; lower n_reference or use more samples (data.n)")
    classes = ctx.data.labels.unique().tolist()
    if len(classes) < 2 and not ctx.adapter.one_label:
        names = ctx.data.class_names
        label = repr(names[classes[0]]) if names else classes[0]
        raise MmdiagError(f"data: every sample of the analysed split has the same label ({label}); stage crossmodal needs at least two classes; analyse a split with two or more (data.split, data.n)")


def check_batch_independence(adapter, encoded: dict[str, torch.Tensor]) -> None:
    """A sample's logits must not depend on the other samples of its batch (batch norm in
    training mode breaks this, and with it every batched method): compare a batch with the
    same samples one at a time."""
    with torch.no_grad():
        together = adapter.forward(encoded).float()
        alone = torch.cat([adapter.forward({m: t[i : i + 1] for m, t in encoded.items()}).float() for i in range(len(together))])
    if not torch.allclose(together, alone, rtol=1e-3, atol=1e-4 * together.abs().max().clamp_min(1).item()):
        raise MmdiagError(
            "model: its output for a sample depends on the other samples in the batch (batch norm in training mode?); "
            "put the model in eval mode (adapter.eval()) or remove batch statistics from forward"
        )


def emap(ctx: Context, config: CrossmodalConfig) -> dict:
    """EMAP and DIME over a seeded reference set of the analysed split."""
    g = torch.Generator().manual_seed(ctx.seed)
    rows = torch.randperm(len(ctx.data), generator=g)[: config.n_reference or 200].sort().values
    ref = ctx.data.subset(rows)
    inputs = {m: x.to(ctx.device) for m, x in ref.inputs.items()}
    with torch.no_grad():
        encoded = {m: t.detach() for m, t in ctx.adapter.encode(inputs).items()}
    check_batch_independence(ctx.adapter, {m: t[:8] for m, t in encoded.items()})
    start = time.perf_counter()
    beat = Heartbeat(ctx.progress)
    beat.step(f"EMAP, {len(rows)}^{len(encoded)} recombinations", 0.0)
    if ctx.adapter.has_late_fusion:
        # the modalities meet only in `fuse`: each is encoded once (N passes), and only the
        # fusion sees the N^M recombinations
        with torch.no_grad():
            features = {m: t.detach() for m, t in ctx.adapter.separate(encoded).items()}
        table, fused = inter.recombination_table(ctx.adapter.fuse, features, _eval_batch(ctx, config), beat)
        cost = {"forward_passes": len(rows), "fusion_evaluations": fused, "late_fusion": True}
    else:
        table, passes = inter.recombination_table(ctx.adapter.forward, encoded, _eval_batch(ctx, config), beat)
        cost = {"forward_passes": passes, "late_fusion": False}
    full, additive = inter.diagonal(table).cpu(), inter.additive_projection(table).cpu()
    seconds = time.perf_counter() - start
    pred = full.argmax(1)
    target = lambda x: x.gather(1, pred[:, None]).squeeze(1)  # noqa: E731  the predicted class's logit
    return {
        "rows": rows,
        "ids": ref.ids,
        "full": full,
        "additive": additive,
        "unimodal": target(additive),  # DIME: UC(k) = EMAP(k), MI(k) = f(k) - UC(k)
        "interaction": target(full) - target(additive),
        "labels": ref.labels,
        "meta": ref.meta,
        "cost": {"seconds": round(seconds, 3), **cost},
    }


def additive_follows(prediction: torch.Tensor, meta: dict[str, torch.Tensor], concepts: list[str]) -> dict[str, float]:
    """For each class-valued concept: how often a prediction equals it (e.g. how often the
    additive projection says 'class 1' exactly when the corner mark is there)."""
    out = {}
    for concept in concepts:
        values = meta[concept]
        known = values >= 0
        if known.any():
            out[concept] = round(float((prediction[known] == values[known]).float().mean()), 4)
    return out


def unit_interactions(ctx: Context, config: CrossmodalConfig, rows: torch.Tensor, pred: torch.Tensor) -> dict:
    """Mixed-gradient blocks for every pair of modalities, and Shapley interaction indices of
    each sample's strongest pairs, for the samples at `rows` (towards their predicted class)."""
    adapter, mods = ctx.adapter, ctx.adapter.modalities
    data = ctx.data.subset(rows)
    blocks, labels, present = defaultdict(list), [], []
    sii, sii_pairs = [], []
    cost = {k: {"seconds": 0.0, "forward_passes": 0} for k in ("mixed_gradients", "shapley_interaction")}
    n_batches = -(-len(data) // config.batch_size)
    beat = Heartbeat(ctx.progress)
    for b, (batch, inputs) in enumerate(data.batches(config.batch_size, ctx.device)):
        ctx.progress(f"mixed gradients and interaction indices, batch {b + 1}/{n_batches}", b / n_batches)
        beat.step(f"interaction indices, batch {b + 1}/{n_batches}", b / n_batches)
        with torch.no_grad():
            encoded = {m: t.detach() for m, t in adapter.encode(inputs).items()}
        units = adapter.units(inputs, encoded)
        game = attr.Game(adapter, encoded, units, pred[batch].to(ctx.device), _eval_batch(ctx, config), draws=attr.Draws.seeded(ctx.seed, data.ids[batch]), tick=beat)
        start, before = time.perf_counter(), game.passes
        found = {}
        for a, b in itertools.combinations(mods, 2):
            # forward tangents along the modality with fewer units
            if units[b].n <= units[a].n:
                found[a, b], path, why = inter.mixed_block(game, a, b)
            else:
                block, path, why = inter.mixed_block(game, b, a)
                found[a, b] = block.transpose(1, 2)
            blocks[a, b].append(found[a, b].cpu())
            if inter.PATHS.index(path) >= inter.PATHS.index(cost["mixed_gradients"].get("path", inter.PATHS[0])):
                cost["mixed_gradients"].update(path=path, **({"why": why} if why else {}))
        cost["mixed_gradients"]["seconds"] += time.perf_counter() - start
        cost["mixed_gradients"]["forward_passes"] += game.passes - before
        if config.shapley_pairs:
            pairs = strongest(found, game, config.shapley_pairs)
            start, before = time.perf_counter(), game.passes
            sii.append(inter.shapley_interaction(game, pairs.to(ctx.device), config.shapley_draws).cpu())
            sii_pairs.append(pairs)
            cost["shapley_interaction"]["seconds"] += time.perf_counter() - start
            cost["shapley_interaction"]["forward_passes"] += game.passes - before
        labels += [[units[m].labels[i] for m in mods] for i in range(len(game.target))]
        present.append(game.present.cpu())
    out = {"blocks": {k: torch.cat(v) for k, v in blocks.items()}, "labels": labels, "present": torch.cat(present), "cost": cost}
    if sii:
        out["shapley"], out["shapley_pairs"] = torch.cat(sii), torch.cat(sii_pairs)
    return out


def _offsets(game_sizes: list[int], mods) -> dict[str, int]:
    return dict(zip(mods, itertools.accumulate([0, *game_sizes])))


def pair_table(blocks: dict, sizes: dict[str, int], present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every cross-modal unit pair of every sample as player indices (P, 2) and weights (B, P);
    pairs with an absent unit weigh 0."""
    mods = list(sizes)
    offset = _offsets(list(sizes.values()), mods)
    index, weight = [], []
    for (a, b), block in blocks.items():
        u, v = torch.meshgrid(torch.arange(sizes[a]), torch.arange(sizes[b]), indexing="ij")
        index.append(torch.stack([u.flatten() + offset[a], v.flatten() + offset[b]], 1))
        weight.append(block.reshape(len(block), -1))
    index, weight = torch.cat(index), torch.cat(weight, dim=1)
    exists = present[:, index[:, 0].to(present.device)] & present[:, index[:, 1].to(present.device)]
    return index, torch.where(exists.to(weight.device), weight, torch.zeros_like(weight))


def strongest(found: dict, game: attr.Game, k: int) -> torch.Tensor:
    """(B, k, 2) player indices of each sample's k strongest pairs by |mixed gradient|."""
    sizes = dict(zip(game.modalities, game.sizes))
    index, weight = pair_table(found, sizes, game.present)
    top = weight.abs().topk(min(k, weight.shape[1]), dim=1).indices
    return index.to(top.device)[top].cpu()


def graphs(ids: torch.Tensor, labels: list, sizes: dict[str, int], index: torch.Tensor, weight: torch.Tensor, edges: int) -> dict[str, dict]:
    """Per sample: its strongest cross-modal unit pairs as a node-link graph (JSON-able)."""
    mods = list(sizes)
    owner = [(m, u) for m in mods for u in range(sizes[m])]
    out = {}
    top = weight.abs().topk(min(edges, weight.shape[1]), dim=1)
    for row, sid in enumerate(ids.tolist()):
        nodes, links = {}, []
        for p, strength in zip(top.indices[row].tolist(), top.values[row].tolist()):
            if strength == 0:
                continue
            ends = []
            for player in index[p].tolist():
                m, u = owner[player]
                node = f"{m}:{u}"
                nodes[node] = {"id": node, "modality": m, "unit": u, "label": labels[row][mods.index(m)][u]}
                ends.append(node)
            links.append({"source": ends[0], "target": ends[1], "weight": round(float(weight[row, p]), 6)})
        out[str(sid)] = {"nodes": list(nodes.values()), "edges": links}
    return out


def to_networkx(graph: dict) -> nx.Graph:
    g = nx.Graph()
    for node in graph["nodes"]:
        g.add_node(node["id"], modality=node["modality"], label=node["label"], unit=node["unit"])
    for e in graph["edges"]:
        g.add_edge(e["source"], e["target"], weight=e["weight"], sign=1 if e["weight"] > 0 else -1)
    return g


def top_pairs(graph_of: dict[str, dict], per_sample: int, n: int) -> list[dict]:
    """The unit pairs (by display label) most often among a sample's strongest, over the data."""
    count, total = defaultdict(int), defaultdict(float)
    for graph in graph_of.values():
        nodes = {node["id"]: node for node in graph["nodes"]}
        for e in graph["edges"][:per_sample]:
            a, b = nodes[e["source"]], nodes[e["target"]]
            key = (a["modality"], a["label"], b["modality"], b["label"])
            count[key] += 1
            total[key] += e["weight"]
    ranked = sorted(count, key=lambda k: (-count[k], -abs(total[k])))[:n]
    return [{"units": [k[1], k[3]], "modalities": [k[0], k[2]], "count": count[k], "mean_weight": round(total[k] / count[k], 6)} for k in ranked]


def run(ctx: Context, config: CrossmodalConfig, upstream: dict) -> StageResult:
    check_inputs(ctx, config)
    adapter = ctx.adapter.eval()
    stage1 = upstream["unimodal"]
    rows, pred = torch.from_numpy(stage1.arrays["rows"]).long(), torch.from_numpy(stage1.arrays["pred"]).long()
    found = emap(ctx, config)
    units = unit_interactions(ctx, config, rows, pred)
    sizes = dict(zip(adapter.modalities, stage1.arrays["sizes"].tolist()))
    index, weight = pair_table(units["blocks"], sizes, units["present"])
    ids = torch.from_numpy(stage1.arrays["ids"]).long()
    graph_of = graphs(ids, units["labels"], sizes, index, weight, config.edges)
    labels = found["labels"]
    interaction = torch.from_numpy(stage1.arrays["interaction"])
    summary = {
        "n_reference": len(found["ids"]),
        "full_accuracy": round(float((found["full"].argmax(1) == labels).float().mean()), 4),
        "additive_accuracy": round(float((found["additive"].argmax(1) == labels).float().mean()), 4),
        "interaction_share": round(inter.interaction_share(found["full"], found["additive"]), 4),
        "modality_interaction": round(float(interaction[torch.isfinite(interaction)].abs().mean()), 4),
        "additive_follows": additive_follows(found["additive"].argmax(1), found["meta"], ctx.data.class_valued() or []),
        "full_follows": additive_follows(found["full"].argmax(1), found["meta"], ctx.data.class_valued() or []),
        "dime": {
            "unimodal_abs_mean": round(float(found["unimodal"].abs().mean()), 4),
            "interaction_abs_mean": round(float(found["interaction"].abs().mean()), 4),
        },
        "n_explained": len(rows),
        "top_pairs": top_pairs(graph_of, config.pairs_per_sample, config.top_pairs),
        "methods": {"emap": {k: v for k, v in found["cost"].items() if k != "seconds"}, **{k: {n: x for n, x in v.items() if n != "seconds"} for k, v in units["cost"].items()}},
    }
    arrays = {
        "rows": rows.numpy(),
        "ids": ids.numpy(),
        "pred": pred.numpy(),
        "label": stage1.arrays["label"],
        "sizes": stage1.arrays["sizes"],
        "emap.ids": found["ids"].numpy(),
        "emap.full": found["full"].numpy(),
        "emap.additive": found["additive"].numpy(),
        "dime.unimodal": found["unimodal"].numpy(),
        "dime.interaction": found["interaction"].numpy(),
        **{f"mixed.{a}.{b}": block.numpy() for (a, b), block in units["blocks"].items()},
    }
    if "shapley" in units:
        arrays["shapley_interaction"] = units["shapley"].numpy()
        arrays["shapley_interaction.pairs"] = units["shapley_pairs"].numpy()
        summary["shapley_interaction"] = shapley_agreement(units["shapley"], units["shapley_pairs"], index, weight)
    timings = {"methods": {"emap": {"seconds": found["cost"]["seconds"]}, **{k: {"seconds": round(v["seconds"], 3)} for k, v in units["cost"].items()}}}
    return StageResult(summary, arrays, {"graphs": graph_of}, timings)


def shapley_agreement(sii: torch.Tensor, pairs: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> dict:
    """How the sampled Shapley interaction of each sample's strongest pairs agrees with the
    local (mixed-gradient) interaction: sign agreement and the mean absolute index."""
    lookup = {tuple(p): i for i, p in enumerate(index.tolist())}
    column = torch.tensor([[lookup[tuple(p)] for p in row] for row in pairs.tolist()])
    local = weight.gather(1, column)
    strong = local != 0
    return {
        "pairs_per_sample": pairs.shape[1],
        "abs_mean": round(float(sii[strong].abs().mean()), 4) if strong.any() else None,
        "sign_agreement": round(float((sii.sign() == local.sign())[strong].float().mean()), 4) if strong.any() else None,
    }


def files(result: StageResult) -> dict[str, str]:
    """One GraphML file per explained sample, for Gephi or networkx.read_graphml."""
    return {f"graphs/{sid}.graphml": "\n".join(nx.generate_graphml(to_networkx(g))) for sid, g in result.details.get("graphs", {}).items()}


STAGE = Stage(
    "crossmodal",
    run,
    CrossmodalConfig,
    reads=("unimodal",),
    writes=(
        "crossmodal.full_accuracy",
        "crossmodal.additive_accuracy",
        "crossmodal.interaction_share",
        "crossmodal.n_reference",
        "crossmodal.modality_interaction",
        "crossmodal.top_pairs",
    ),
    modules=("mmdiag.stages.crossmodal", "mmdiag.stages.interaction", "mmdiag.stages.attribution"),
    files=files,
    check=check_inputs,
    summary=summaries.CrossmodalSummary,
)
