"""What each stage's section of the report shows: its tables and figures, from its summary and
arrays. A stage that did not run has no section."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmdiag.pipeline.registry import Registry
from mmdiag.reports import figures, graphs
from mmdiag.reports import samples as sp
from mmdiag.stages import summaries as sm
from mmdiag.stages.base import StageResult


def discovery(summary: dict, ev: sp.Evaluated) -> dict:
    """The features the model was found to follow, each with what it agrees with."""
    s: sm.DiscoverySummary = summary["discovery"]
    rows = []
    for r in s["reliable"]:
        where = f'"{r["word"]}"' if "word" in r else (f"box {r['box']}" if "box" in r else r.get("transform"))
        status = f"annotated as {r['annotated_as']}: discovery agrees" if r.get("annotated_as") else f"within {r['within']}" if r.get("within") else "found by mmdiag"
        rows.append({**r, "where": where, "status": status, "pushes_to": ev.class_name(int(r["push"]))})
    return {
        "n": s["n"], "candidates": s["candidates"], "passes": s["forward_passes_per_sample"], "fdr": s["fdr"], "rows": rows,
        "priors": s.get("priors", []), "slices_tested": s.get("slices_tested", 0),
    }  # fmt: skip


def unimodal(summary: dict, results: dict[str, StageResult], ev: sp.Evaluated) -> dict:
    s: sm.UnimodalSummary = summary["unimodal"]
    shares = s.get("modality_share", {})  # with shapley among the methods
    ablation = {m: v for m, v in s["modality_ablation"].items() if m not in ("interaction", "pairs")}
    methods = s["methods"]
    regions = sorted({r for m in methods.values() for r in m["truth"]})
    out = {
        "headline": {k: s[k] for k in ("n_explained", "n_errors_explained")},
        "skipped": s["skipped"],
        "shares": [{"modality": m, **v} for m, v in shares.items()],
        "ablation": [{"modality": m, **v} for m, v in ablation.items()],
        "interaction": s["modality_ablation"]["interaction"],
        "pairs": [{"pair": k, **v} for k, v in s["modality_ablation"]["pairs"].items()],
        "methods": [{"name": n, **{k: v for k, v in m.items() if k != "truth"}} for n, m in methods.items()],
        "regions": regions,
        "region_modality": {r: _region_modality(ev, r) for r in regions},
        "reliance": modality_reliance(summary),
        "truth": [{"method": n, "regions": {r: m["truth"].get(r) for r in regions}} for n, m in methods.items()],
        "figures": [],
    }
    if shares:
        out["figures"].append(
            {"title": "Modality shares (MM-SHAP)", "uri": figures.bars(list(shares), [v["mean"] or 0 for v in shares.values()], [v["std"] or 0 for v in shares.values()], "share of |attribution|")}
        )
    if regions:
        series = {n: [m["truth"][r]["enrichment"] if r in m["truth"] else None for r in regions] for n, m in methods.items()}
        out["figures"].append({"title": "Attribution on the truth regions", "uri": figures.grouped(regions, series, "enrichment (mass / area)", reference=1.0)})
    out["figures"] += mean_maps(results, ev)
    return out


def _region_modality(ev: sp.Evaluated, key: str) -> str | None:
    """The modality of a stage 1 truth key (`region` or `modality.region`)."""
    if "." in key and key.split(".", 1)[0] in ev.data.truth:
        return key.split(".", 1)[0]
    return next((m for m, regions in ev.data.truth.items() if key in regions), None)


def mean_maps(results: dict[str, StageResult], ev: sp.Evaluated) -> list[dict]:
    """Where the attribution falls on average, per image modality (each map normalised first)."""
    uni = results.get("unimodal")
    method = sp.card_method(uni)
    if method is None:
        return []
    out = []
    for modality, cols in sp.spans(ev.data, results).items():
        attr = np.abs(np.asarray(uni.arrays[f"attr.{method}.pred"][:, cols], np.float64))
        grid = sp.image_grid(ev.data, modality, attr.shape[1])
        if grid:
            mean = (attr / np.maximum(attr.sum(1, keepdims=True), 1e-12)).mean(0).reshape(grid)
            out.append({"title": f"Mean |attribution| on {modality} ({method})", "uri": figures.grid_map(mean, f"{modality}: mean share per unit")})
    return out


def crossmodal(summary: dict, results: dict[str, StageResult]) -> dict:
    s: sm.CrossmodalSummary = summary["crossmodal"]
    out = {
        "headline": {k: s[k] for k in ("full_accuracy", "additive_accuracy", "interaction_share", "n_reference", "modality_interaction")},
        "pairs": s["top_pairs"],
        "follows": sorted(s["additive_follows"].items(), key=lambda kv: -kv[1]),
        "graph": graphs.layout(graphs.from_pairs(s["top_pairs"]), max_edges=12),
        "figures": [
            {"title": "EMAP: the model and its additive projection", "uri": figures.bars(["full model", "additive projection"], [s["full_accuracy"], s["additive_accuracy"]], xlabel="accuracy")}
        ],
    }
    arrays = results["crossmodal"].arrays
    if {"dime.unimodal", "dime.interaction"} <= set(arrays):
        out["figures"].append({"title": "DIME per reference sample", "uri": figures.scatter(arrays["dime.unimodal"], arrays["dime.interaction"], "unimodal contribution", "interaction")})
    return out


def representation(summary: dict) -> dict:
    s: sm.RepresentationSummary | sm.Skipped = summary["representation"]
    if set(s) == {"skipped"}:  # the whole stage, with its reason
        return {"layers": [], "probes": [], "features": [], "n_features": 0, "unassigned_share": None, "skipped": [], "stage_skipped": s["skipped"], "figures": []}
    probes = s["probes"]
    layers = list(dict.fromkeys(layer for by_layer in probes.values() for layer in by_layer))
    table = [{"concept": c, "layers": {layer: by_layer.get(layer) for layer in layers}} for c, by_layer in probes.items()]
    features = sorted(s["features"], key=lambda f: -abs((f["auroc"] if f["auroc"] is not None else 0.5) - 0.5))
    out = {
        "layers": layers,
        "probes": table,
        "features": features[:15],
        "n_features": len(s["features"]),
        "unassigned_share": s["unassigned_share"],
        "skipped": s["skipped"],
        "stage_skipped": None,
        "figures": [],
    }
    if probes and layers:
        values = np.array([[(by_layer.get(layer) or {}).get("selectivity", np.nan) for layer in layers] for by_layer in probes.values()], float)
        out["figures"].append(
            {
                "title": "Probe selectivity (accuracy minus control task)",
                "uri": figures.matrix(list(probes), layers, values, "selectivity", vmin=min(0.0, float(np.nanmin(values))), vmax=max(0.5, float(np.nanmax(values)))),
            }
        )
    return out


def composition(summary: dict) -> dict:
    s: sm.CompositionSummary | sm.Skipped = summary["composition"]
    if set(s) == {"skipped"}:  # the whole stage, with its reason
        return {"stage_skipped": s["skipped"], "headline": {}, "per_class": [], "figures": []}
    path = s["path"]
    out = {
        "stage_skipped": None,
        "headline": {"fidelity": s["fidelity"], **{f"features_{k}": v for k, v in s["n_features"].items()}, **{f"simulation_{k}": v for k, v in s["simulation"].items()}},
        "per_class": [{"name": c, "features": f} for c, f in s["per_class"].items()],
        "figures": [],
    }
    if path["n_features"]:
        out["figures"].append({"title": "Sparsity path: held-out fidelity against the number of features", "uri": figures.line(path["n_features"], path["fidelity"], "features used", "fidelity")})
    return out


def errors(analysis: dict) -> dict:
    e = analysis["errors"]
    base = e["error_rate"]
    out = {
        "slices": e["slices"],
        "categories": e["categories"],
        "association_only": e["association_only"],
        "disagreement": e["disagreement"],
        "notes": e["notes"],
        "n": e["n"],
        "error_rate": base,
        "figures": [],
    }
    if e["slices"]:
        s = e["slices"][:12]
        out["figures"].append({"title": "Error slices", "uri": figures.slice_rates([x["where"] for x in s], [x["error_rate"] for x in s], [x["ci"][0] for x in s], [x["ci"][1] for x in s], base)})
    if e["n"]:
        out["figures"].append({"title": "Error categories", "uri": figures.bars(list(e["categories"]), list(e["categories"].values()), xlabel="errors")})
    return out


def intervention(summary: dict) -> dict:
    """Every region's, modality's and counterfactual's intervention, each beside its null."""
    s: sm.InterventionSummary = summary["intervention"]
    shares = summary["unimodal"].get("modality_share", {}) if "unimodal" in summary else {}  # MM-SHAP, beside the interventions
    return {
        "n": s["n"],
        "null_sets": s["null_sets"],
        "passes": s["forward_passes_per_sample"],
        "regions": [{"key": k, **v} for k, v in s["regions"].items()],
        "modalities": [{"modality": m, "mm_shap": shares[m]["mean"] if m in shares else None, **v} for m, v in s["modalities"].items()],
        "pairs": [{"pair": k, **v} for k, v in s["pairs"].items()],
        "counterfactuals": [{"concept": c, **v} for c, v in s["counterfactuals"].items()],
    }


def modality_reliance(summary: dict) -> dict[str, float]:
    """Each modality's share of the modality-level logit change: every sample's (interventions)
    or the explained samples' (stage 1)."""
    if "intervention" in summary and summary["intervention"]["modalities"]:
        return {m: v["share"]["value"] for m, v in summary["intervention"]["modalities"].items()}
    if "unimodal" not in summary:
        return {}
    ablation = summary["unimodal"]["modality_ablation"]
    return {m: v["share"] for m, v in ablation.items() if m not in ("interaction", "pairs") and v["share"] is not None}


@dataclass(frozen=True)
class Section:
    """A stage's part of the report: `build(summary, results, ev)` makes what the fragment shows
    (it sees the result as `section`, the title as `title`); `template` is a file under
    reports/templates, or a path of the plugin's own. Sections appear in registration order,
    each only when its stage ran."""

    name: str  # the stage whose result it shows (and the section's anchor)
    title: str
    build: Callable[[dict, dict[str, StageResult], sp.Evaluated], dict]
    template: str | Path


SECTIONS: Registry[Section] = Registry("report section", "report sections")
for _section in (
    Section("discovery", "Discovery", lambda summary, results, ev: discovery(summary, ev), "sections/discovery.html.j2"),
    Section("unimodal", "Unimodal importance", unimodal, "sections/unimodal.html.j2"),
    Section("crossmodal", "Cross-modal interaction", lambda summary, results, ev: crossmodal(summary, results), "sections/crossmodal.html.j2"),
    Section("representation", "Representation probing", lambda summary, results, ev: representation(summary), "sections/representation.html.j2"),
    Section("composition", "Prediction composition", lambda summary, results, ev: composition(summary), "sections/composition.html.j2"),
    Section("intervention", "Interventions", lambda summary, results, ev: intervention(summary), "sections/intervention.html.j2"),
):
    SECTIONS.register(_section)


def stages(summary: dict, results: dict[str, StageResult], ev: sp.Evaluated) -> dict[str, dict]:
    """What the section of every stage that ran shows."""
    return {s.name: s.build(summary, results, ev) for s in SECTIONS if s.name in results and summary.get(s.name) is not None}
