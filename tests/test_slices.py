"""The slice finder: a planted error slice is found first, uniform errors give nothing."""

import numpy as np
import pytest

from mmdiag.reports import slices as sl
from mmdiag.reports.thresholds import Thresholds


def _concepts(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a": rng.integers(0, 3, n), "b": rng.integers(0, 2, n), "c": rng.integers(0, 2, n), "d": rng.integers(0, 4, n)}


def _cols(meta, labels):
    return sl.columns(meta, labels, ["no", "yes"], max_values=10)


def test_wilson_matches_the_textbook_interval():
    low, high = sl.wilson(5, 10, 1.96)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    low, high = sl.wilson(0, 50, 1.96)
    assert low == pytest.approx(0.0, abs=1e-12) and 0 < high < 0.08


def test_bonferroni_widens_the_interval_with_the_number_of_slices():
    assert sl.z_value(0.95, 1) == pytest.approx(1.96, abs=1e-2)
    assert sl.z_value(0.95, 100) > 3.4


def test_a_planted_pair_slice_is_found_first():
    n, rng = 3000, np.random.default_rng(0)
    meta = _concepts(n, 1)
    planted = (meta["a"] == 2) & (meta["b"] == 1)
    errors = rng.random(n) < np.where(planted, 0.5, 0.05)
    found = sl.find(errors, _cols(meta, rng.integers(0, 2, n)))
    assert found and found[0].conditions == (("a", "2"), ("b", "1"))
    top = found[0].record(1)
    assert top["where"] == "a=2 & b=1" and top["ci"][0] > errors.mean() and top["lift"] > 3
    # a pair of an unrelated concept with the planted one adds nothing over its parent
    assert not any({c for c, _ in s.conditions} in ({"a", "c"}, {"b", "d"}) for s in found)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_uniform_errors_give_no_slice(seed):
    n, rng = 3000, np.random.default_rng(seed)
    errors = rng.random(n) < 0.2
    assert sl.find(errors, _cols(_concepts(n, seed + 10), rng.integers(0, 2, n))) == []


def test_minimum_support_hides_tiny_slices():
    n, rng = 2000, np.random.default_rng(3)
    meta = {"rare": np.where(np.arange(n) < 12, 1, 0), "b": rng.integers(0, 2, n)}
    errors = (np.arange(n) < 12) | (rng.random(n) < 0.05)
    assert sl.find(errors, _cols(meta, rng.integers(0, 2, n)), Thresholds(min_support=20)) == []
    assert sl.find(errors, _cols(meta, rng.integers(0, 2, n)), Thresholds(min_support=10))[0].where == "rare=1"


def test_unknown_values_are_not_a_slice():
    n, rng = 2000, np.random.default_rng(4)
    meta = {"x": np.where(rng.random(n) < 0.3, -1, rng.integers(0, 2, n))}
    errors = (meta["x"] == -1) & (rng.random(n) < 0.9)
    assert all(s.conditions[0] != ("x", "-1") for s in sl.find(errors, _cols(meta, np.zeros(n, int))))


def test_the_label_is_a_slicing_concept():
    n, rng = 2000, np.random.default_rng(5)
    labels = rng.integers(0, 2, n)
    errors = rng.random(n) < np.where(labels == 1, 0.4, 0.05)
    found = sl.find(errors, _cols(_concepts(n, 6), labels))
    assert found[0].where == "label=yes"


def test_a_cluster_of_the_decision_features_with_the_errors_is_found():
    n, rng = 1500, np.random.default_rng(7)
    x = rng.normal(0, 1, (n, 6))
    odd = np.arange(n) < 200
    x[odd] += 6.0
    errors = rng.random(n) < np.where(odd, 0.6, 0.05)
    cols = {"cluster": sl.cluster_column(x, Thresholds(clusters=4))}
    found = sl.find(errors, cols)
    assert found and found[0].kind == "cluster"
    assert odd[found[0].mask].mean() > 0.9  # the slice is (part of) the planted group


def test_kmeans_is_seeded():
    x = np.random.default_rng(8).normal(0, 1, (300, 4))
    assert np.array_equal(sl.kmeans(x, 5, seed=3), sl.kmeans(x, 5, seed=3))
