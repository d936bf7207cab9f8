"""Seed statistics: t quantiles, confidence and prediction intervals, paired differences."""

from __future__ import annotations

import math
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crystalkit.ablation.stats import paired_differences, summary, t975

#: scipy.stats.t.ppf(0.975, df) for a few df, to 4 decimals
KNOWN = {
    1: 12.7062,
    2: 4.3027,
    4: 2.7764,
    9: 2.2622,
    30: 2.0423,
    31: 2.0395,
    60: 2.0003,
    1000: 1.9623,
}


@pytest.mark.parametrize(("df", "quantile"), KNOWN.items())
def test_t_quantiles(df, quantile):
    assert t975(df) == pytest.approx(quantile, abs=1e-3)


def test_t_quantiles_decrease_towards_the_normal_one():
    values = [t975(df) for df in range(1, 200)]
    assert values == sorted(values, reverse=True) and values[-1] > 1.959964


@given(st.lists(st.floats(-100, 100, allow_nan=False), min_size=2, max_size=30))
def test_intervals_are_centred_and_the_prediction_interval_is_wider(values):
    stats = summary(values)
    mean, sd, n = statistics.fmean(values), statistics.stdev(values), len(values)
    assert stats.mean == pytest.approx(mean) and stats.sd == pytest.approx(sd)
    half = t975(n - 1) * sd
    assert stats.ci == pytest.approx((mean - half / math.sqrt(n), mean + half / math.sqrt(n)))
    assert stats.pi == pytest.approx(
        (mean - half * math.sqrt(1 + 1 / n), mean + half * math.sqrt(1 + 1 / n))
    )
    assert stats.pi[1] - stats.pi[0] >= stats.ci[1] - stats.ci[0]


def test_one_value_has_no_spread_and_no_values_are_refused():
    assert summary([0.5]) == summary([0.5]).__class__(1, 0.5, None, None, None)
    with pytest.raises(ValueError):
        summary([])


def test_paired_differences_use_the_seeds_both_rows_have():
    assert paired_differences({0: 0.5, 1: 0.7, 3: 0.1}, {0: 0.4, 1: 0.9, 2: 0.0}) == pytest.approx(
        {0: 0.1, 1: -0.2}
    )
