"""Live progress: a stage reports its steps through the context, and the reporter writes at
most one line per interval, with the time left."""

import logging

import torch

from mmdiag.flows.progress import Reporter
from mmdiag.pipeline.resolve import predict
from mmdiag.stages import Context, registry

import planted as pl
from inprocess import QUICK


def test_every_per_sample_stage_reports_rising_progress_to_the_end():
    world = pl.World(label=lambda c: c["colour"])
    model = pl.train(world, steps=50)
    data = pl.samples(world, 60, seed=1)
    logits = predict(model, data, torch.device("cpu"))
    found = {}
    for name in ("unimodal", "crossmodal", "intervention"):
        seen = []
        stage = registry.get(name)
        ctx = Context(model, data, torch.device("cpu"), 0, logits, progress=lambda what, f: seen.append((what, f)))
        found[name] = stage.run(ctx, stage.config.model_validate({**QUICK[name], "batch_size": 16}), found)
        fractions = [f for _, f in seen]
        assert len(seen) >= 2 and fractions == sorted(fractions) and 0 <= fractions[0] and fractions[-1] <= 1, (name, seen)


def test_a_long_method_beats_between_its_steps_with_the_model_inputs_so_far():
    """Inside one step (Shapley over a batch, EMAP's table) the Game tells the heartbeat each
    batch of model inputs, so a stage is never silent for longer than the reporter's interval."""
    from mmdiag.stages import attribution as attr
    from mmdiag.stages.base import Heartbeat

    world = pl.World(label=lambda c: c["colour"])
    model = pl.train(world, steps=20)
    data = pl.samples(world, 12, seed=1)
    seen, now = [], iter(range(10_000))
    beat = Heartbeat(lambda what, f: seen.append((what, f)), every=1.0, clock=lambda: float(next(now)))
    encoded = {m: t.detach() for m, t in model.encode(data.inputs).items()}
    game = attr.Game(model, encoded, model.units(data.inputs, encoded), torch.zeros(12, dtype=torch.long), batch_size=8, tick=beat)
    beat.step("shapley, batch 1/1", 0.25)
    attr.shapley_sampling(game, pairs=2, generator=torch.Generator().manual_seed(0))
    counts = [int(what.split(": ")[1].split()[0].replace(",", "")) for what, _ in seen]
    assert len(seen) >= 3 and all(f == 0.25 and what.startswith("shapley, batch 1/1: ") for what, f in seen)
    assert counts == sorted(counts) and counts[-1] == game.passes  # every batch told, none twice
    seen.clear()
    beat.step("EMAP", 0.0)
    from mmdiag.stages import interaction as inter

    inter.recombination_table(model.forward, {m: t[:6] for m, t in encoded.items()}, 8, beat)
    assert seen and int(seen[-1][0].split(": ")[1].split()[0]) == 6 ** len(encoded)


def test_the_reporter_writes_a_line_per_interval_with_the_time_left(caplog):
    now = [0.0]
    report = Reporter("demo-film: unimodal", every=3.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="mmdiag"):
        for t, f in [(1, 0.1), (2, 0.2), (4, 0.4), (5, 0.5), (8, 0.8), (8.5, 1.0), (9, 1.0)]:
            now[0] = t
            report("shapley, batch 1/3", f)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "demo-film: unimodal:  10% (shapley, batch 1/3), ~9 s left",
        "demo-film: unimodal:  40% (shapley, batch 1/3), ~6 s left",
        "demo-film: unimodal:  80% (shapley, batch 1/3), ~2 s left",
        "demo-film: unimodal: 100% (shapley, batch 1/3)",
    ]


def test_on_a_terminal_each_stage_gets_a_bar_that_goes_when_it_ends():
    import io

    from rich.console import Console

    from mmdiag.flows.progress import Bars

    screen = io.StringIO()
    bars = Bars(Console(file=screen, force_terminal=True, width=100))
    film, late = Reporter("demo-film: unimodal", bars=bars), Reporter("demo-late: unimodal", bars=bars)
    film("shapley, batch 1/2", 0.25)
    late("occlusion, batch 1/1", 0.5)
    progress = bars.progress
    assert [t.completed for t in progress.tasks] == [0.25, 0.5]
    assert "demo-film: unimodal: shapley, batch 1/2" in [t.description for t in progress.tasks]
    film("done", 1.0)
    assert [t.description for t in progress.tasks] == ["demo-late: unimodal: occlusion, batch 1/1"]
    late("done", 1.0)
    assert bars.progress is None  # the last stage's end stops the display
    late("done", 1.0)  # a stage reporting after its end changes nothing
