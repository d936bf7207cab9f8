"""Small-sample statistics for seed studies: a figure over a few seeds is a distribution.

* :func:`summary` — mean, sample standard deviation, a 95 % confidence interval of the mean and a
  95 % prediction interval for one more seed (``mean ± t·s·√(1 + 1/n)``: where a fresh run, e.g. a
  newcomer's clone, should land);
* paired differences (same seed, same starting checkpoint) are summarised the same way.

Student-t quantiles come from a table (df ≤ 30) and the Cornish-Fisher expansion beyond, accurate
to 1e-3: no SciPy needed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
_Z975 = 1.959964


def t975(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (two-sided 95 %)."""
    if df < 1:
        raise ValueError(f"need at least one degree of freedom, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class Summary:
    """``n`` values: mean, sample sd, and 95 % intervals (``None`` with fewer than 2 values)."""

    n: int
    mean: float
    sd: float | None
    ci: tuple[float, float] | None
    pi: tuple[float, float] | None


def summary(values: Sequence[float]) -> Summary:
    if not values:
        raise ValueError("no values to summarise")
    n, mean = len(values), statistics.fmean(values)
    if n < 2:
        return Summary(n, mean, None, None, None)
    sd = statistics.stdev(values)
    t = t975(n - 1)
    half_ci, half_pi = t * sd / math.sqrt(n), t * sd * math.sqrt(1 + 1 / n)
    return Summary(n, mean, sd, (mean - half_ci, mean + half_ci), (mean - half_pi, mean + half_pi))


def paired_differences(values: dict[int, float], reference: dict[int, float]) -> dict[int, float]:
    """``values - reference`` for every seed both have."""
    return {seed: values[seed] - reference[seed] for seed in sorted(values) if seed in reference}
