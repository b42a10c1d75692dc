"""Every quality floor in tests/floors.py sits under the spread benchmarks/floors.py measured for it, by its
margin: a floor that one seed in five nearly breaks would break on another machine."""

from __future__ import annotations

import json

import pytest

from floors import FLOORS, RESULTS, SPREAD_SIGMAS


@pytest.fixture(scope="module")
def measured() -> dict:
    return json.loads(RESULTS.read_text())


def test_every_floor_was_measured_over_five_seeds(measured):
    missing = sorted(set(FLOORS) - set(measured["floors"]))
    assert not missing, f"no spread recorded for {missing}: run python benchmarks/floors.py"
    for name, entry in measured["floors"].items():
        assert len(entry["values"]) >= 5 and len(set(entry["seeds"])) == len(entry["seeds"]), name


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_floor_sits_under_its_spread_by_its_margin(name, measured):
    floor, entry = FLOORS[name], measured["floors"][name]
    margin = max(floor.margin, SPREAD_SIGMAS * entry["std"])
    if floor.at_least:
        assert floor.bound <= entry["min"] - margin + 1e-9, (
            f"{name}: floor {floor.bound:g} but the lowest of {entry['values']} less the margin {margin:.4f} is "
            f"{entry['min'] - margin:.4f}; lower the floor or make the figure steadier")
    else:
        assert floor.bound >= entry["max"] + margin - 1e-9, (
            f"{name}: ceiling {floor.bound:g} but the highest of {entry['values']} plus the margin {margin:.4f} is "
            f"{entry['max'] + margin:.4f}; raise the ceiling or make the figure steadier")
