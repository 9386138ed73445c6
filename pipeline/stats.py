"""Confidence intervals shared by the stages and the report: every figure a rule compares is
reported with one, and rules compare interval ends, not point estimates."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np


def z_value(confidence: float, tests: int = 1) -> float:
    """Two-sided normal quantile for a familywise `confidence` over `tests` intervals (Bonferroni)."""
    return NormalDist().inv_cdf(1 - (1 - confidence) / (2 * max(tests, 1)))


def wilson(k: np.ndarray | int, n: np.ndarray | int, z: float) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval for k successes out of n."""
    k, n = np.asarray(k, float), np.asarray(n, float)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def difference(k1: int, n1: int, k2: int, n2: int, z: float) -> tuple[float, float, float]:
    """p1 - p2 of two independent proportions with Newcombe's hybrid score interval (method 10):
    (estimate, low, high)."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson(k1, n1, z)
    l2, u2 = wilson(k2, n2, z)
    low = p1 - p2 - np.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = p1 - p2 + np.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return float(p1 - p2), float(low), float(high)


def mean_interval(x: np.ndarray, z: float) -> tuple[float, float, float]:
    """Mean of per-sample values with a normal interval (estimate, low, high); NaNs are dropped.
    Over one value the interval is the value itself."""
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    if not len(x):
        return float("nan"), float("nan"), float("nan")
    mean = float(x.mean())
    half = z * float(x.std(ddof=1)) / np.sqrt(len(x)) if len(x) > 1 else 0.0
    return mean, mean - half, mean + half


def rate(k: int, n: int, z: float, digits: int = 4) -> dict:
    """{value, low, high, n} of a proportion, None-valued over no samples."""
    if n == 0:
        return {"value": None, "low": None, "high": None, "n": 0}
    low, high = wilson(k, n, z)
    return {"value": round(k / n, digits), "low": round(float(low), digits), "high": round(float(high), digits), "n": int(n)}


def interval(x: np.ndarray, z: float, digits: int = 4) -> dict:
    """{value, low, high, n} of a mean of per-sample values, None-valued over no samples."""
    x = np.asarray(x, np.float64)
    n = int(np.isfinite(x).sum())
    if n == 0:
        return {"value": None, "low": None, "high": None, "n": 0}
    mean, low, high = mean_interval(x, z)
    return {"value": round(mean, digits), "low": round(low, digits), "high": round(high, digits), "n": n}
