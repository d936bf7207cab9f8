"""Latent schedules: bounds, monotonicity and their defining endpoints."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crystalkit.latents.schedules import Fixed, Linear, Stepwise
from crystalkit.params import config_model
from crystalkit.registries import SCHEDULES

totals = st.integers(1, 5000)


@given(totals, st.data(), st.integers(0, 16), st.integers(0, 16), st.floats(0.01, 1.0))
def test_linear_is_monotone_bounded_and_hits_both_ends(total, data, a, b, ramp):
    start, end = sorted((a, b))
    schedule = Linear(start, end, ramp)
    steps = sorted(data.draw(st.lists(st.integers(0, total), min_size=2, max_size=20)))
    ks = [schedule(s, total) for s in steps]
    assert ks == sorted(ks)
    assert all(start <= k <= end for k in ks)
    assert schedule(0, total) == start
    assert schedule(total, total) == end
    assert schedule(min(total, int(ramp * total) + 1), total) == end


@given(totals, st.lists(st.integers(0, 16), min_size=1, max_size=6).map(sorted), st.data())
def test_stepwise_visits_every_stage_in_order(total, stages, data):
    schedule = Stepwise(stages)
    ks = [schedule(s, total) for s in range(total + 1)]
    assert ks == sorted(ks) and ks[0] == stages[0] and ks[-1] == stages[-1]
    if total >= len(stages):
        assert set(ks) == set(stages)
    every = data.draw(st.integers(1, 50))
    fixed_length = Stepwise(stages, every=every)
    assert fixed_length(0, total) == stages[0]
    assert all(
        fixed_length(s, total) == stages[min(s // every, len(stages) - 1)] for s in range(total + 1)
    )


@given(st.integers(0, 32), totals, st.data())
def test_fixed_is_constant(k, total, data):
    assert Fixed(k)(data.draw(st.integers(0, total)), total) == k


@pytest.mark.parametrize(
    "build",
    [
        lambda: Fixed(-1),
        lambda: Linear(4, 2),
        lambda: Linear(0, 8, ramp=0.0),
        lambda: Stepwise([4, 2]),
        lambda: Stepwise([]),
        lambda: Stepwise([0, 2], every=0),
    ],
)
def test_invalid_parameters_are_rejected(build):
    with pytest.raises(ValueError):
        build()


def test_steps_outside_training_are_rejected():
    with pytest.raises(ValueError, match="step must be"):
        Fixed(2)(11, 10)


def test_schedules_are_registered_with_typed_parameters():
    assert {"fixed", "linear", "stepwise"} <= set(SCHEDULES.names())
    params = config_model(SCHEDULES.get("linear")).model_validate({"end": 4})
    assert params.model_dump() == {"start": 0, "end": 4, "ramp": 0.5}
    with pytest.raises(ValueError):
        config_model(SCHEDULES.get("fixed")).model_validate({"k": "many"})
