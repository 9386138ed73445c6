"""summary.json is typed (flows/summary.py, stages/summaries.py): every run is checked against
the types before it is written (so every flow the suite runs tests them), and the
documentation's reference page is generated from them."""

import copy
import json
from pathlib import Path

import pytest

from mmdiag.flows import summary

ROOT = Path(__file__).parent.parent


def test_the_reference_page_is_generated_from_the_types():
    assert (ROOT / "docs" / "summary-json.md").read_text() == summary.page(), "run `python -m mmdiag.flows.summary > docs/summary-json.md`"


def test_every_key_of_a_stage_or_block_has_its_meaning():
    page = summary.page()
    rows = [line for line in page.splitlines() if line.startswith("| `")]
    assert len(rows) > 80 and all(not line.endswith("|  |") for line in rows)


def test_a_summary_off_its_types_is_caught():
    frozen = json.loads((ROOT / "tests" / "data" / "frozen-summary.json").read_text())
    summary.check(frozen)
    for path, value in [(("unimodal", "methods", "shapley", "deletion_auc"), "low"), (("unimodal", "surprise"), 1), (("run", "name"), None)]:
        broken = copy.deepcopy(frozen)
        at = broken
        for key in path[:-1]:
            at = at[key]
        at[path[-1]] = value
        with pytest.raises(AssertionError, match=rf"summary.json\['{path[0]}'\] does not match its type at {'.'.join(path[1:])}"):
            summary.check(broken)
    skipped = {**frozen, "composition": {"skipped": "nothing to compose"}}
    summary.check(skipped)  # a stage with nothing to work on writes its reason alone
