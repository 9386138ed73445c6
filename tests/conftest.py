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
    # one Prefect home for the session's temporary server, which outlives any test's cache
    # folder (tests move and delete theirs)
    os.environ["PREFECT_HOME"] = str(path / "prefect")
    if shared := os.environ.get("MMDIAG_TEST_MODELS"):  # trained weights kept from one session to the next
        Path(shared).mkdir(parents=True, exist_ok=True)
        (path / "models").symlink_to(Path(shared).resolve(), target_is_directory=True)
    return path


@pytest.fixture(scope="session", autouse=True)
def _train_seed():
    """Under tests/portability.py, every built-in model trains with its seed shifted by
    MMDIAG_TRAIN_SEED (the CLI's in-process runs included)."""
    from ranges import SEED

    if not SEED:
        yield
        return
    from mmdiag.pipeline.demo import catalog

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(catalog, "MODELS", {name: c.model_copy(update={"seed": c.seed + SEED}) for name, c in catalog.MODELS.items()})
        yield


@pytest.fixture(scope="session")
def demo_models(cache):
    """The built-in demo models, trained once per test session. Where MMDIAG_TEST_MODELS shares
    the weights between the processes of `make test`'s two workers, a lock per model makes one
    train it while the other waits for it (each trains a different model meanwhile)."""
    import fcntl

    from mmdiag.pipeline.demo.catalog import load_model

    def load(name: str):
        (cache / "models").mkdir(exist_ok=True)
        with open(cache / "models" / f".{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return load_model(name, cache=cache)[0]

    return load


@pytest.fixture
def toy(monkeypatch, tmp_path, cache):
    """Only the toy stages (tests/toy_stages.py) are registered; `computed()` tells (and
    forgets) which of them computed since it was last asked."""
    from mmdiag.stages import registry

    monkeypatch.setattr(registry, "_STAGES", {})
    import toy_stages

    toy_stages.register_all()
    log = tmp_path / "computed.log"
    monkeypatch.setenv("TOY_LOG", str(log))
    cfg = tmp_path / "diag.yaml"
    cfg.write_text(
        f"run: toy\nmodel: {{factory: 'toy_stages:build_model'}}\ndata: {{split: ood, splits: [ood], n: 300}}\nplugins: [toy_stages]\nout: {tmp_path / 'runs'}\ncache: {tmp_path / 'cache'}\n"
    )

    def computed():
        text = log.read_text() if log.exists() else ""
        log.unlink(missing_ok=True)
        return text.split()

    return cfg, tmp_path / "runs" / "toy", computed


@pytest.fixture
def user_flow(tmp_path, monkeypatch, cache):
    """Diagnose a user's module (its `model` and `data` factories, 24 samples of split `val`)
    through the CLI's flow on the CPU, with `unimodal` as stage 1's settings (YAML) and a small
    stage 2; returns the run folder and the config, for a second run."""
    from mmdiag.flows.cli import main

    def diagnose(module: str, source: str, unimodal: str) -> tuple[Path, Path]:
        (tmp_path / f"{module}.py").write_text(source)
        monkeypatch.syspath_prepend(str(tmp_path))
        cfg = tmp_path / "diag.yaml"
        cfg.write_text(
            f"run: {module}\nmodel: {{factory: '{module}:model'}}\ndata: {{factory: '{module}:data', split: val, splits: [val], n: 24}}\n"
            f"stages: {{unimodal: {unimodal}, crossmodal: {{n_reference: 8, shapley_draws: 2}}}}\n"
            f"device: cpu\nout: {tmp_path / 'runs'}\ncache: {tmp_path / 'cache'}\n"
        )
        assert main(["diagnose", "--config", str(cfg)]) == 0
        return tmp_path / "runs" / module, cfg

    return diagnose


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
