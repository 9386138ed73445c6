"""What the before/after page shows: accuracy per split, on the slice the top suggestion of the
first run was about, and the attribution on its region, then every figure that moved."""

from __future__ import annotations

from mmdiag.reports import figures


def _change(a, b):
    return None if a is None or b is None else round(b - a, 4)


def _row(label: str, a, b) -> dict:
    return {"label": label, "a": a, "b": b, "change": _change(a, b)}


def region_rows(summary_a: dict, summary_b: dict) -> list[dict]:
    """Attribution on every truth region, per stage-1 method present in both runs."""
    ma = (summary_a.get("unimodal") or {}).get("methods") or {}
    mb = (summary_b.get("unimodal") or {}).get("methods") or {}
    rows = []
    for method in (m for m in ma if m in mb):
        ta, tb = ma[method].get("truth") or {}, mb[method].get("truth") or {}
        for region in (r for r in ta if r in tb):
            for figure in ("mass", "enrichment"):
                rows.append({"method": method, "region": region, **_row(figure, ta[region].get(figure), tb[region].get(figure))})
    return rows


def disagreement_rows(summary_a: dict, summary_b: dict) -> list[dict]:
    da = {d["where"]: d for d in (summary_a.get("errors") or {}).get("disagreement") or []}
    db = {d["where"]: d for d in (summary_b.get("errors") or {}).get("disagreement") or []}
    return [{"concept": da[w]["concept"], **_row(w, da[w]["accuracy"], db[w]["accuracy"])} for w in da if w in db]


def view(summary_a: dict, summary_b: dict, diff: dict) -> dict:
    before = summary_a.get("suggestions") or []
    top = before[0] if before else None
    action = top["action"] if top else {}
    focus = action.get("concept") or action.get("region")
    splits = [_row(f"split {s}", v["a"], v["b"]) for s, v in diff.get("splits", {}).items()]
    disagree = disagreement_rows(summary_a, summary_b)
    focused = [r for r in disagree if r["concept"] == focus]
    regions = region_rows(summary_a, summary_b)
    headline = [_row("accuracy", diff["accuracy"]["a"], diff["accuracy"]["b"]), *splits, *focused]
    headline += [{**r, "label": f"{r['label']} of {r['region']} ({r['method']})"} for r in regions if r["region"] == focus]
    bars = [r for r in [*splits, *focused] if r["a"] is not None and r["b"] is not None]
    moved = sorted(diff.get("moved", []), key=lambda m: -abs(m["change"] or 0))
    return {
        "a": diff["a"],
        "b": diff["b"],
        "model": diff["model"],
        "name_a": (summary_a.get("run") or {}).get("name"),
        "name_b": (summary_b.get("run") or {}).get("name"),
        "top": top,
        "focus": focus,
        "headline": headline,
        "disagreement": disagree,
        "slices": [_row(s["where"], s["a"], s["b"]) for s in diff.get("slices", [])],
        "regions": regions,
        "suggestions_a": before[:5],
        "suggestions_b": (summary_b.get("suggestions") or [])[:5],
        "moved": moved,
        "figure": figures.grouped([r["label"] for r in bars], {"before": [r["a"] for r in bars], "after": [r["b"] for r in bars]}, "accuracy", width=6.0) if bars else None,
    }
