"""The error gallery: per error, each modality as the report shows it (an image with its
heatmap, coloured tokens, or unit bars), its interaction graph and its evidence card."""

from __future__ import annotations

import numpy as np

from mmdiag.reports import figures, graphs
from mmdiag.reports import samples as sp
from mmdiag.stages.base import StageResult

LIMIT = 200  # errors shown; every error still has a card in the analysis
POSITIVE, NEGATIVE = (200, 40, 40), (40, 90, 220)


def _style(value: float, scale: float) -> str:
    """Background colour of a token: red towards the prediction, blue against, by |value|."""
    alpha = 0.0 if scale <= 0 else min(abs(value) / scale, 1.0) * 0.75
    r, g, b = POSITIVE if value >= 0 else NEGATIVE
    return f"background: rgba({r}, {g}, {b}, {alpha:.2f})"


def shown(ev: sp.Evaluated, modality: str, row: int, scores: np.ndarray | None, present: np.ndarray | None) -> dict:
    """One modality of one sample, with its unit attributions when there are some:
    {"kind": "image", raw, overlay} | {"kind": "text", tokens} | {"kind": "units", bars}."""
    x = ev.data.inputs[modality]
    grid = None if scores is None else sp.image_grid(ev.data, modality, len(scores))
    if x.dim() == 4 and x.shape[1] in (1, 3) and (grid or scores is None):
        heat = None if scores is None or not grid else scores.reshape(grid)
        return {"modality": modality, "kind": "image", **figures.thumbnails(x[row].numpy(), heat)}
    words = sp.tokens(ev.data, modality)
    if words:
        scale = 0.0 if scores is None else float(np.abs(scores).max())
        toks = []
        for k, w in enumerate(words[row]):
            value = None if scores is None or k >= len(scores) or (present is not None and not present[k]) else float(scores[k])
            toks.append({"text": str(w), "value": value, "style": "" if value is None else _style(value, scale)})
        return {"modality": modality, "kind": "text", "tokens": toks}
    if scores is None:
        return {"modality": modality, "kind": "none"}
    labels = sp.unit_labels(ev.data, modality, row, len(scores))
    scale = float(np.abs(scores).max()) or 1.0
    return {
        "modality": modality,
        "kind": "units",
        "bars": [{"label": labels[k], "value": round(float(v), 4), "width": round(60 * abs(v) / scale, 1), "positive": bool(v >= 0)} for k, v in enumerate(scores)],
    }


def items(analysis: dict, results: dict[str, StageResult], ev: sp.Evaluated, limit: int = LIMIT) -> list[dict]:
    """Gallery entries for the first `limit` cards, errors with attributions first."""
    cards = sorted(analysis["errors"]["cards"], key=lambda c: not (c.get("perception") or {}).get("method"))[:limit]
    uni = results.get("unimodal")
    at = {int(i): k for k, i in enumerate(uni.arrays["ids"])} if uni is not None else {}
    spans = sp.spans(ev.data, results) if uni is not None else {}
    graph_of = (results["crossmodal"].details.get("graphs") or {}) if "crossmodal" in results else {}
    captions = ev.data.display.get("caption")
    out = []
    for card in cards:
        row = card["row"]
        method = (card.get("perception") or {}).get("method")
        views = []
        for modality in sp.modalities(ev.data, results):
            scores = present = None
            if method and card["id"] in at and modality in spans:
                k = at[card["id"]]
                scores = np.asarray(uni.arrays[f"attr.{method}.pred"][k, spans[modality]], np.float64)
                present = uni.arrays["present"][k, spans[modality]]
            views.append(shown(ev, modality, row, scores, present))
        graph = graph_of.get(str(card["id"]))
        out.append(
            {
                "card": card,
                "views": views,
                "caption": str(captions[row]) if captions is not None and not isinstance(captions[row], (list, tuple)) else None,
                "graph": graphs.layout(graph, max_edges=8) if graph else None,
                "slices": " ".join(card["slices"]),
                "interventions": interventions(card),
            }
        )
    return out


def interventions(card: dict) -> list[dict]:
    """The removals tried on this sample: the shortcuts' regions, then the relevant regions."""
    out = [r for c in (card.get("shortcut") or {}).get("concepts", []) for r in c["regions"]]
    for entry in (card.get("perception") or {}).get("modalities", {}).values():
        out += [r for r in entry.get("interventions", []) if r not in out]
    return out
