"""`mmdiag demo --fix`: apply the FiLM model's top suggestion, diagnose the retrained model,
and render the before/after page."""

from __future__ import annotations

from pathlib import Path

from mmdiag.pipeline.errors import MmdiagError
from mmdiag.pipeline.store import read_json, write_text


def fix_demo(out: Path, device: str = "auto", name: str = "demo-film", quick: bool = False) -> Path:
    """Retrain `name` as its top suggestion says, diagnose it as OUT/NAME-fixed, and write
    OUT/NAME-fix.html (the comparison of the two runs). Returns the page's path."""
    from mmdiag import reports
    from mmdiag.flows.flow import demo_configs, run
    from mmdiag.flows.rerun import compare
    from mmdiag.pipeline.demo.catalog import apply_fix

    before = Path(out) / name
    summary = read_json(before / "summary.json")
    if not summary.get("suggestions"):
        raise MmdiagError(f"--fix: the diagnosis of {name} made no suggestion; there is nothing to apply")
    fixed = apply_fix(name, summary["suggestions"][0]["action"])
    config = demo_configs(out, device=device, models=(fixed,), quick=quick)[0].model_copy(update={"run": f"{name}-fixed"})
    after = run(config)
    diff = compare(before, after)
    page = Path(out) / f"{name}-fix.html"
    html = reports.render_compare(summary, read_json(after / "summary.json"), diff)
    write_text(page, html)
    return page
