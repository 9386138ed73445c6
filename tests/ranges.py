"""Properties of trained models: asserted by the tests, recorded for `make portability`.

A test that asserts something of a trained model states it through `holds(name, value, above=,
below=)`: it fails as a bare `assert` would, and where MMDIAG_RANGES names a file it first
appends the value and its bounds there (one JSON line), so that tests/portability.py can print
each property's range over training seeds and numeric settings beside the bound the test
asserts. A bound is chosen from that range, with room to spare, never from one run.
"""

from __future__ import annotations

import json
import os

# Seeds of every trained model shift by this (tests/portability.py trains seeds 0..4); the
# models' own seeds are the catalog's and planted.train's defaults.
SEED = int(os.environ.get("MMDIAG_TRAIN_SEED", "0"))


def measured(name: str, value: float) -> None:
    """Record a figure the README quotes (its range over seeds and settings), asserting nothing."""
    holds(name, value)


def holds(name: str, value: float, above: float | None = None, below: float | None = None) -> None:
    """Assert `above < value < below` (either bound optional), recording the value first."""
    value = float(value)
    if path := os.environ.get("MMDIAG_RANGES"):
        test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
        with open(path, "a") as f:
            f.write(json.dumps({"test": test, "name": name, "value": value, "above": above, "below": below}) + "\n")
    assert above is None or value > above, f"{name}: {value:.4g} is not above {above}"
    assert below is None or value < below, f"{name}: {value:.4g} is not below {below}"
