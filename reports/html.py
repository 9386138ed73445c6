"""The self-contained HTML pages: the report and the before/after comparison.

Jinja2 with autoescaping on for every template: each string from the data (tokens, captions,
class and concept names, config values) is escaped where it is written. Nothing is loaded from
anywhere: figures are data: URIs, the style and the one script are inline, and a Content
Security Policy forbids every other source; the script is allowed by its hash alone, so markup
smuggled into the page could not run even if it escaped escaping.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined, Template
from markupsafe import Markup

from mmdiag.pipeline.data import SampleSet
from mmdiag.reports import compare as cmp
from mmdiag.reports import gallery, sections
from mmdiag.reports.samples import evaluated
from mmdiag.stages.base import StageResult

TEMPLATES = Path(__file__).parent / "templates"


def _pct(x, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def _num(x, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, int) and not isinstance(x, bool):
        return str(x)
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(pct=_pct, num=_num, pretty=lambda obj: json.dumps(obj, indent=2, sort_keys=True, default=str))
    return env


ENV = _environment()


def _page(template: str, **context) -> str:
    """Render a page with the inline script, allowed by its sha256 in the page's CSP."""
    script = (TEMPLATES / "page.js").read_text()
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    csp = f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{digest}'; base-uri 'none'; form-action 'none'"
    # our own file, not data: the one string rendered unescaped
    return ENV.get_template(template).render(script=Markup(script), csp=csp, **context)


def headline(summary: dict, analysis: dict) -> list[dict]:
    model = summary.get("model", {})
    rows = [
        {"label": "accuracy", "value": _num(model.get("accuracy")), "note": f"{model.get('split', '')} split, n = {model.get('n')}"},
        {"label": "errors", "value": str(analysis["errors"]["n"]), "note": f"{len(analysis['errors']['slices'])} error slices"},
    ]
    rows += [{"label": f"accuracy on {s}", "value": _num(v.get("accuracy")), "note": f"n = {v.get('n')}"} for s, v in (model.get("splits") or {}).items()]
    cross = summary.get("crossmodal") or {}
    if cross.get("additive_accuracy") is not None:
        rows.append({"label": "additive projection accuracy", "value": _num(cross["additive_accuracy"]), "note": f"full model {_num(cross.get('full_accuracy'))}"})
    return rows


def provenance_view(summary: dict, provenance: dict) -> dict:
    stages = provenance.get("stages") or summary.get("stages") or {}
    return {
        "model": {"name": (summary.get("model") or {}).get("name"), "fingerprint": None, "weights_from_cache": None, **(provenance.get("model") or {})},
        "data": provenance.get("data") or {},
        "stages": [{"name": n, **s} for n, s in stages.items()],
        "versions": provenance.get("versions") or {},
        "device": provenance.get("device") or (summary.get("run") or {}).get("device"),
        "created": provenance.get("created") or (summary.get("run") or {}).get("created"),
        "config": provenance.get("config"),
    }


def fragments(built: dict[str, dict]) -> list[tuple[str, str, Template]]:
    """(name, title, template) of each section built, in the registry's order."""
    out = []
    for section in sections.SECTIONS:
        if section.name in built:
            t = section.template
            template = ENV.get_template(t) if isinstance(t, str) else ENV.from_string(Path(t).read_text())
            out.append((section.name, section.title, template))
    return out


def render(summary: dict, results: dict[str, StageResult], data: SampleSet, analysis: dict, provenance: dict) -> str:
    """The report of one run, as one self-contained HTML page."""
    ev = evaluated(results, data)
    items = gallery.items(analysis, results, ev)
    built = sections.stages(summary, results, ev)
    return _page(
        "report.html.j2",
        title=f"mmdiag report: {(summary.get('run') or {}).get('name', '')}",
        summary=summary,
        model=summary.get("model") or {},
        headline=headline(summary, analysis),
        suggestions=analysis["suggestions"],
        sections=built,
        fragments=fragments(built),
        errors=sections.errors(analysis),
        gallery=items,
        gallery_total=len(analysis["errors"]["cards"]),
        categories=[c for c, n in analysis["errors"]["categories"].items() if n],
        provenance=provenance_view(summary, provenance),
    )


def render_inline(summary: dict, report: str) -> str:
    """The run's summary as an HTML block for a notebook (no script, styles scoped to it)."""
    return ENV.get_template("inline.html.j2").render(
        run=(summary.get("run") or {}).get("name", ""),
        model=summary.get("model") or {},
        headline=headline(summary, {"errors": summary.get("errors") or {"n": 0, "slices": []}}),
        suggestions=summary.get("suggestions") or [],
        errors=summary.get("errors") or {},
        report=report,
    )


def render_compare(summary_a: dict, summary_b: dict, diff: dict) -> str:
    """Before/after page of two runs, from `flows.rerun.compare`'s diff and both summaries."""
    return _page("compare.html.j2", title="mmdiag: before and after", **cmp.view(summary_a, summary_b, diff))
