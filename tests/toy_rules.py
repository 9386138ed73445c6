"""The per-error rule and the finding of docs/extending.md, as written there (a test checks the
page still holds them), and a model whose errors are all made with near certainty."""

from mmdiag.reports import evidence


def low_margin(src, row, at, t):
    p = src.ev.probs[row]
    return {"margin": float(p.max() - p[src.ev.labels[row]]), "null_kept": None}


def low_margin_test(card, t):
    found = card.get("low_margin")
    if found is None:
        return None
    return found["margin"] < 0.05, {**found, "evidence": "attribution"}  # an association


evidence.RULES.register(evidence.Rule(
    "low_margin", low_margin, low_margin_test, "no predicted probabilities",
    lambda g: f"The model all but ties: its answer leads the label by {g['margin']:.3f}.",
), before="perception")


from mmdiag.pipeline import stats
from mmdiag.reports import suggest
from mmdiag.reports.findings import Finding


def overconfident(seen):
    """Predictions made with >= 99% confidence err more often than their confidence allows."""
    confidence = seen.ev.probs.max(1)
    sure = confidence >= 0.99
    k, n = int(seen.ev.errors[sure].sum()), int(sure.sum())
    if n == 0:
        return []
    expected = float(1 - confidence[sure].mean())  # what a calibrated model gets wrong there
    low, _ = stats.wilson(k, n, stats.z_value(seen.t.confidence))
    if low <= expected:
        return []
    figures = {"n": n, "error_rate": k / n, "expected": expected}
    return [Finding("overconfident", "model", (k - expected * n) / len(confidence), figures)]


def write(f):
    g = f.figures
    return {
        "title": "Calibrate the model",
        "finding": f"{g['n']} predictions made with >= 99% confidence are wrong {100 * g['error_rate']:.0f}% of the time, not {100 * g['expected']:.1f}%.",
        "evidence": [{"label": "error rate of the confident predictions", "value": g["error_rate"], "section": "errors"}],
        "change": "Fit a temperature on held-out data, or train with label smoothing.",
    }


suggest.FINDINGS.register(suggest.FindingRule("overconfident", overconfident, write))


def overconfident_model():
    """frozen_run's untrained network with its logits scaled by 200: the same predictions, each
    made with near certainty."""
    import torch

    import frozen_run

    adapter = frozen_run.build_model()
    with torch.no_grad():
        adapter.module.head.weight.mul_(200)
        adapter.module.head.bias.mul_(200)
    return adapter
