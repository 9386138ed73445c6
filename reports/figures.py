"""Figures as embedded PNG data URIs: matplotlib charts (Agg canvas, no pyplot state) and image
thumbnails with an attribution heatmap blended in.

Thumbnails keep the image's own resolution up to `THUMB` pixels (the page scales them up with
pixelated rendering), so a report with hundreds of errors stays small.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import functools
import hashlib
import io
import json
from collections.abc import MutableMapping
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

THUMB = 96  # longest side of an embedded thumbnail, pixels
DPI = 80
POSITIVE, NEGATIVE = np.array([0.85, 0.1, 0.1]), np.array([0.1, 0.35, 0.95])
STYLE = {"text.parse_math": False, "font.size": 9, "axes.spines.top": False, "axes.spines.right": False}  # names from data are text, never math


def _uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


_drawn: contextvars.ContextVar[MutableMapping[str, str] | None] = contextvars.ContextVar("drawn", default=None)
_SOURCE = hashlib.sha256(Path(__file__).read_bytes() + matplotlib.__version__.encode()).hexdigest()


@contextlib.contextmanager
def remembered(store: MutableMapping[str, str]):
    """Within the block, a chart drawn before with the same arguments (and the same code of
    this module) is taken from `store`, {key: data URI}, instead of drawn again: the caller
    decides where the store lives (the flow keeps it in the run cache)."""
    token = _drawn.set(store)
    try:
        yield
    finally:
        _drawn.reset(token)


def _key(name: str, args: tuple, kwargs: dict) -> str:
    plain = lambda v: np.asarray(v).tolist() if isinstance(v, np.ndarray) else str(v)  # noqa: E731
    return hashlib.sha256(json.dumps([_SOURCE, name, args, kwargs], default=plain, sort_keys=True).encode()).hexdigest()


def styled(chart):
    """Draw a chart under the report's style (rcParams are read as artists are made), or take
    it from the store of `remembered`."""

    @functools.wraps(chart)
    def draw(*args, **kwargs):
        store = _drawn.get()
        key = _key(chart.__name__, args, kwargs) if store is not None else None
        if key is not None and key in store:
            return store[key]
        with matplotlib.rc_context(STYLE):
            uri = chart(*args, **kwargs)
        if key is not None:
            store[key] = uri
        return uri

    return draw


def figure(width: float = 4.8, height: float = 2.6) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=DPI)
    return _uri(buf.getvalue())


def _image(pixels: np.ndarray) -> str:
    """(H, W, 3) floats in [0, 1] -> PNG data URI."""
    from matplotlib.image import imsave

    buf = io.BytesIO()
    imsave(buf, np.clip(pixels, 0, 1), format="png")
    return _uri(buf.getvalue())


def as_rgb(x: np.ndarray) -> np.ndarray:
    """(C, H, W) with C in (1, 3), in [0, 1] or [0, 255] -> (H, W, 3) in [0, 1], at most THUMB px."""
    x = np.asarray(x, np.float32)
    if x.max() > 1.5:
        x = x / 255.0
    rgb = np.repeat(x, 3, 0) if x.shape[0] == 1 else x
    rgb = rgb.transpose(1, 2, 0)
    step = int(np.ceil(max(rgb.shape[:2]) / THUMB))
    if step > 1:
        h, w = (rgb.shape[0] // step) * step, (rgb.shape[1] // step) * step
        rgb = rgb[:h, :w].reshape(h // step, step, w // step, step, 3).mean((1, 3))
    return rgb


def overlay(rgb: np.ndarray, heat: np.ndarray, strength: float = 0.7) -> np.ndarray:
    """Blend a signed unit heatmap (rows, cols) onto an image: red towards the prediction, blue
    against it, opacity by |value| relative to the map's largest."""
    h, w = rgb.shape[:2]
    r, c = heat.shape
    scale = np.abs(heat).max()
    grid = heat[np.arange(h) * r // h][:, np.arange(w) * c // w] / (scale if scale > 0 else 1)
    colour = np.where(grid[..., None] >= 0, POSITIVE, NEGATIVE)
    alpha = strength * np.abs(grid)[..., None]
    return (1 - alpha) * rgb + alpha * colour


def thumbnails(x: np.ndarray, heat: np.ndarray | None) -> dict:
    rgb = as_rgb(x)
    return {"raw": _image(rgb), "overlay": None if heat is None else _image(overlay(rgb, heat))}


# --- charts ---


@styled
def bars(names: list[str], values: list[float], errors: list[float] | None = None, xlabel: str = "", reference: float | None = None, width: float = 4.8) -> str:
    fig = figure(width, 0.45 + 0.28 * len(names))
    ax = fig.add_subplot()
    y = np.arange(len(names))
    ax.barh(y, values, xerr=errors, color="#4a78b5", capsize=2)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    if reference is not None:
        ax.axvline(reference, color="#c0392b", lw=1, ls="--")
    ax.set_xlabel(xlabel)
    return png(fig)


@styled
def grouped(groups: list[str], series: dict[str, list[float]], ylabel: str = "", reference: float | None = None, width: float = 5.2) -> str:
    """Vertical bars, one group per name, one bar per series."""
    fig = figure(width, 2.7)
    ax = fig.add_subplot()
    k = max(len(series), 1)
    x = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        ax.bar(x + (i - (k - 1) / 2) * 0.8 / k, [np.nan if v is None else v for v in values], 0.8 / k, label=name)
    ax.set_xticks(x, groups, rotation=20 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center")
    if reference is not None:
        ax.axhline(reference, color="#555", lw=1, ls="--")
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return png(fig)


@styled
def slice_rates(names: list[str], rates: list[float], lows: list[float], highs: list[float], base: float) -> str:
    fig = figure(5.6, 0.5 + 0.27 * len(names))
    ax = fig.add_subplot()
    y = np.arange(len(names))
    ax.errorbar(rates, y, xerr=[np.subtract(rates, lows), np.subtract(highs, rates)], fmt="o", color="#c0392b", capsize=2)
    ax.axvline(base, color="#555", lw=1, ls="--")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("error rate (Wilson interval); dashed: overall")
    return png(fig)


@styled
def grid_map(values: np.ndarray, title: str) -> str:
    """A unit grid (rows, cols) as a heatmap: where the attribution falls on average."""
    fig = figure(2.6, 2.5)
    ax = fig.add_subplot()
    im = ax.imshow(values, cmap="magma")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(im, ax=ax, fraction=0.046)
    return png(fig)


@styled
def matrix(rows: list[str], cols: list[str], values: np.ndarray, title: str, vmin: float = 0.0, vmax: float = 1.0) -> str:
    """A table of numbers as an annotated heatmap (probe selectivity per concept and layer)."""
    fig = figure(1.6 + 0.8 * len(cols), 0.8 + 0.3 * len(rows))
    ax = fig.add_subplot()
    ax.imshow(np.nan_to_num(values, nan=vmin), cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
    for (i, j), v in np.ndenumerate(values):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < (vmin + vmax) / 2 else "black", fontsize=8)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_title(title, fontsize=9)
    return png(fig)


@styled
def line(x: list[float], y: list[float], xlabel: str, ylabel: str) -> str:
    fig = figure(4.2, 2.4)
    ax = fig.add_subplot()
    ax.plot(x, y, "o-", color="#4a78b5")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return png(fig)


@styled
def scatter(x: np.ndarray, y: np.ndarray, xlabel: str, ylabel: str) -> str:
    fig = figure(3.6, 2.8)
    ax = fig.add_subplot()
    ax.scatter(x, y, s=6, alpha=0.5, color="#4a78b5")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return png(fig)
