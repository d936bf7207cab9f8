"""Weight schedules: the weight of a loss term at each step of its stage.

A weight schedule is a callable ``(step, total_steps) -> float >= 0``, the float sibling of the
latent schedules (which return an integer K). Any objective's ``weight`` and ``crystal.ce_weight``
take either a number (a constant) or a schedule::

    objectives:
      kl: {weight: {name: gate, until: 0.5}}          # on for the first half, then off
      attention: {weight: {name: linear, start: 0.0, end: 1.0, until: 0.2}}

``step`` counts from 0 within the stage that uses the term and ``total_steps`` is that stage's
length, so a schedule keeps its meaning when ``train.steps`` changes. The released CrystaL code's
gate (alignment while ``step <= vqa_only_stage``, then CE alone) is ``gate`` with
``until_step: vqa_only_stage + 1``.
"""

from __future__ import annotations

import math

from crystalkit.latents.schedules import check_step
from crystalkit.registries import WEIGHTS


def _check_fraction(name: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be a fraction of the stage in [0, 1], got {value}")


def _check_weight(name: str, value: float) -> None:
    if not value >= 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite weight >= 0, got {value}")


@WEIGHTS.register("constant")
class Constant:
    """The same weight at every step (what a plain number means).

    Args:
        value: the weight (>= 0).
    """

    def __init__(self, value: float = 1.0):
        _check_weight("value", value)
        self.value = value

    def __call__(self, step: int, total_steps: int) -> float:
        check_step(step, total_steps)
        return self.value


@WEIGHTS.register("linear")
class Linear:
    """``start`` until fraction ``begin`` of the stage, then a straight line to ``end`` at
    fraction ``until``, then ``end`` (a warm-up ramp, or a fade-out with ``start > end``).

    Args:
        start: weight before fraction ``begin`` of the stage.
        end: weight from fraction ``until`` on.
        begin: where the ramp starts, as a fraction of the stage in [0, 1].
        until: where the ramp ends, as a fraction of the stage in [0, 1] (after ``begin``).
    """

    def __init__(
        self, start: float = 0.0, end: float = 1.0, begin: float = 0.0, until: float = 1.0
    ):
        _check_weight("start", start)
        _check_weight("end", end)
        _check_fraction("begin", begin)
        _check_fraction("until", until)
        if until <= begin:
            raise ValueError(f"need begin < until, got begin={begin}, until={until}")
        self.start, self.end, self.begin, self.until = start, end, begin, until

    def __call__(self, step: int, total_steps: int) -> float:
        check_step(step, total_steps)
        progress = (step / total_steps - self.begin) / (self.until - self.begin)
        progress = min(1.0, max(0.0, progress))
        return self.start + progress * (self.end - self.start)


@WEIGHTS.register("gate")
class Gate:
    """``value`` for the steps before the gate, ``after`` from the gate on. The gate is at
    fraction ``until`` of the stage, or at step ``until_step`` when that is set (the released
    code's ``vqa_only_stage``: alignment while ``step <= N`` is ``until_step: N + 1``).

    Args:
        value: weight before the gate.
        until: the gate, as a fraction of the stage in [0, 1].
        until_step: the gate as a step of the stage instead (overrides ``until``).
        after: weight from the gate on.
    """

    def __init__(
        self,
        value: float = 1.0,
        until: float = 0.5,
        until_step: int | None = None,
        after: float = 0.0,
    ):
        _check_weight("value", value)
        _check_weight("after", after)
        _check_fraction("until", until)
        if until_step is not None and until_step < 0:
            raise ValueError(f"until_step must be >= 0, got {until_step}")
        self.value, self.until, self.until_step, self.after = value, until, until_step, after

    def __call__(self, step: int, total_steps: int) -> float:
        check_step(step, total_steps)
        gate = self.until_step if self.until_step is not None else self.until * total_steps
        return self.value if step < gate else self.after


@WEIGHTS.register("cosine")
class Cosine:
    """Half a cosine from ``start`` at the stage's first step to ``end`` at its last (a smooth
    fade-out by default).

    Args:
        start: weight at the stage's first step.
        end: weight at its last step.
    """

    def __init__(self, start: float = 1.0, end: float = 0.0):
        _check_weight("start", start)
        _check_weight("end", end)
        self.start, self.end = start, end

    def __call__(self, step: int, total_steps: int) -> float:
        check_step(step, total_steps)
        mix = 0.5 * (1 + math.cos(math.pi * step / total_steps))
        return self.end + (self.start - self.end) * mix
