"""The portability script's arithmetic: room from the bound to the nearest value, runs of
separate settings merged into one table, a bound crossed shown as failing."""

import portability


def _run(setting: str, values: list[float], failed: list[str] | None = None) -> dict:
    prop = {"test": "tests/test_x.py::test_a", "name": "accuracy", "above": 0.5, "below": None, "values": {setting: values}}
    return portability._with_room(
        {"settings": {setting: portability.SETTINGS[setting]}, "seeds": list(range(len(values))), "properties": [prop], "failures": {setting: {0: failed or []}}, "seconds": {setting: {0: 1.0}}}
    )


def test_room_is_the_distance_from_the_bound_to_the_nearest_value():
    assert abs(_run("default", [0.9, 0.7, 0.8])["properties"][0]["room"] - 0.2) < 1e-12


def test_merged_runs_keep_every_setting_and_take_the_room_over_all():
    merged = portability.merge([_run("default", [0.9, 0.8]), _run("avx2", [0.6, 0.95], ["tests/test_x.py::test_a"])])
    assert list(merged["settings"]) == ["default", "avx2"]
    (prop,) = merged["properties"]
    assert prop["values"] == {"default": [0.9, 0.8], "avx2": [0.6, 0.95]}
    assert abs(prop["room"] - 0.1) < 1e-12
    assert merged["failures"]["avx2"] == {0: ["tests/test_x.py::test_a"]}
    row = portability.table(merged).splitlines()[-1]
    assert row.startswith("| test_a | accuracy | > 0.5 | 0.8 / 0.85 / 0.9 | 0.6 / 0.775 / 0.95 | 0.1 |")


def test_a_crossed_bound_is_shown_as_failing():
    assert "(fails)" in portability.table(_run("default", [0.4, 0.9]))
