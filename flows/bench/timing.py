"""What the benchmarks share: timing a call, the seconds per model input of a forward pass and of
a gradient, and the table they print."""

from __future__ import annotations

import time


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def tiled(encoded, batch: int) -> dict:
    """A batch of `batch` model inputs made of the given ones, repeated."""
    return {m: t.repeat_interleave(batch // len(t) + 1, 0)[:batch].detach() for m, t in encoded.items()}


def per_input_forward(adapter, encoded, batch: int, repeats: int = 3) -> float:
    """Seconds of a forward pass per model input in a batch of `batch` (best of `repeats`)."""
    import torch

    big = tiled(encoded, batch)
    with torch.no_grad():
        adapter.forward(big)
        return min(timed(lambda: adapter.forward(big))[1] for _ in range(repeats)) / batch


def per_input_gradient(adapter, encoded, batch: int, repeats: int = 3) -> float:
    """Seconds of forward + backward per model input in a batch of `batch` (best of `repeats`):
    gradients w.r.t. the inputs only, as the attribution methods take them."""
    import torch

    big = {m: t.requires_grad_(True) for m, t in tiled(encoded, batch).items()}

    def forward_backward():
        torch.autograd.grad(adapter.forward(big).sum(), list(big.values()))

    forward_backward()
    return min(timed(forward_backward)[1] for _ in range(repeats)) / batch


def _cell(v) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def print_rows(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="mmdiag benchmarks")
    for col in ("benchmark", "value", "unit", "device", "notes"):
        table.add_column(col, justify="right" if col == "value" else "left")
    for r in rows:
        notes = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("benchmark", "value", "unit", "device"))
        table.add_row(r["benchmark"], _cell(r["value"]), r["unit"], r["device"], notes)
    Console().print(table)
