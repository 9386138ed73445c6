"""Interaction graphs laid out for inline SVG: one column of units per modality, an edge per
strongest interaction (width by |weight|, red positive, blue negative).

Only numbers and positions are computed here; the template draws them, and every label from
the data is escaped there like any other text.
"""

from __future__ import annotations

ROW, MARGIN, LABEL = 16, 10, 90  # row height, margin, width of a column's label area (px)
COLUMN_GAP = 120
POSITIVE, NEGATIVE = "#c0392b", "#2c6fbb"


def layout(graph: dict, max_edges: int = 10) -> dict | None:
    """{width, height, columns, nodes: [{x, y, label, anchor}], edges: [{x1, y1, x2, y2, width,
    colour, weight}]} for the `max_edges` strongest edges of a {nodes, edges} graph."""
    edges = sorted(graph.get("edges", []), key=lambda e: -abs(e["weight"]))[:max_edges]
    if not edges:
        return None
    info = {n["id"]: n for n in graph.get("nodes", [])}
    strength: dict[str, float] = {}
    for e in edges:
        for end in (e["source"], e["target"]):
            strength[end] = strength.get(end, 0.0) + abs(e["weight"])
    columns: list[str] = []
    for node in strength:
        m = _modality(info, node)
        if m not in columns:
            columns.append(m)
    pos, nodes = {}, []
    for c, modality in enumerate(columns):
        members = sorted((n for n in strength if _modality(info, n) == modality), key=lambda n: -strength[n])
        x = MARGIN + LABEL + c * COLUMN_GAP
        for r, node in enumerate(members):
            y = MARGIN + ROW * (r + 1)
            pos[node] = (x, y)
            left = c == 0
            nodes.append({"x": x, "y": y, "label": info.get(node, {}).get("label", node), "anchor": "end" if left else "start", "dx": -6 if left else 6})
    top = max(abs(e["weight"]) for e in edges) or 1.0
    drawn = [
        {
            "x1": pos[e["source"]][0],
            "y1": pos[e["source"]][1],
            "x2": pos[e["target"]][0],
            "y2": pos[e["target"]][1],
            "width": round(0.6 + 3.4 * abs(e["weight"]) / top, 2),
            "colour": POSITIVE if e["weight"] >= 0 else NEGATIVE,
            "weight": round(float(e["weight"]), 4),
        }
        for e in edges
    ]
    rows = max(sum(1 for n in strength if _modality(info, n) == m) for m in columns)
    return {
        "width": 2 * (MARGIN + LABEL) + (len(columns) - 1) * COLUMN_GAP,
        "height": 2 * MARGIN + ROW * (rows + 1),
        "columns": [{"x": MARGIN + LABEL + c * COLUMN_GAP, "name": m} for c, m in enumerate(columns)],
        "nodes": nodes,
        "edges": drawn,
    }


def _modality(info: dict, node: str) -> str:
    return info.get(node, {}).get("modality") or node.split(":", 1)[0]


def from_pairs(pairs: list[dict]) -> dict:
    """The run-level graph of crossmodal.top_pairs (weight: mean weight; label with its count)."""
    nodes, edges = {}, []
    for p in pairs:
        ends = []
        for modality, unit in zip(p["modalities"], p["units"]):
            node = f"{modality}:{unit}"
            nodes[node] = {"id": node, "modality": modality, "label": str(unit)}
            ends.append(node)
        edges.append({"source": ends[0], "target": ends[1], "weight": float(p["mean_weight"])})
    return {"nodes": list(nodes.values()), "edges": edges}
