import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    """A weights cache shared by the session's tests, never the user's own."""
    path = tmp_path_factory.mktemp("mmdiag-cache")
    os.environ["MMDIAG_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def demo_models(cache):
    """The built-in demo models, trained once per test session."""
    from pipeline.demo.catalog import load_model

    return lambda name: load_model(name, cache=cache)[0]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
