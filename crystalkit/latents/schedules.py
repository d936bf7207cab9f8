"""Latent schedules: the number of latent slots K a training step uses.

A schedule is a callable ``(step, total_steps) -> K``. K = 0 means no latent block at all (the
direct-finetune baseline). Growing K over training is Coconut's curriculum; Coconut's users found
that adding many latents at once destabilises training, hence ramps and stages.
"""

from __future__ import annotations

import math

from crystalkit.registries import SCHEDULES

#: most latent slots a schedule may ask for: each is a token added to the vocabulary and a
#: position in every sequence (the reference uses 8)
MAX_K = 4096


def check_step(step: int, total_steps: int) -> None:
    """Schedules (latent K, loss weights) are defined on steps ``0 .. total_steps``."""
    if total_steps < 1 or not 0 <= step <= total_steps:
        raise ValueError(f"step must be in [0, total_steps], got step={step}, total={total_steps}")


@SCHEDULES.register("fixed")
class Fixed:
    """The same K at every step (reference: K = 8; K = 0 is direct finetuning).

    Args:
        k: latent slots at every step; 0 = no latent block.
    """

    def __init__(self, k: int = 8):
        if not 0 <= k <= MAX_K:
            raise ValueError(f"k must be >= 0 and <= {MAX_K}, got {k}")
        self.k = k

    def __call__(self, step: int, total_steps: int) -> int:
        check_step(step, total_steps)
        return self.k


@SCHEDULES.register("linear")
class Linear:
    """K grows linearly from ``start`` to ``end`` over the first ``ramp`` fraction of training.

    Args:
        start: K at the first step.
        end: K once the ramp is over.
        ramp: share of training over which K grows, in (0, 1].
    """

    def __init__(self, start: int = 0, end: int = 8, ramp: float = 0.5):
        if not 0 <= start <= end <= MAX_K:
            raise ValueError(f"need 0 <= start <= end <= {MAX_K}, got start={start}, end={end}")
        if not 0 < ramp <= 1:
            raise ValueError(f"ramp must be in (0, 1], got {ramp}")
        self.start, self.end, self.ramp = start, end, ramp

    def __call__(self, step: int, total_steps: int) -> int:
        check_step(step, total_steps)
        progress = min(1.0, step / (self.ramp * total_steps))
        return self.start + math.floor(progress * (self.end - self.start) + 1e-9)


@SCHEDULES.register("stepwise")
class Stepwise:
    """Coconut-style stages: ``stages[i]`` latents during the i-th of ``len(stages)`` equal parts of
    training, or for ``every`` steps each when ``every`` is set (the last stage then persists).

    Args:
        stages: K of each stage, non-decreasing (Coconut: 0, 2, 4, 8).
        every: steps per stage; null = ``len(stages)`` equal parts of training.
    """

    def __init__(self, stages: list[int] | None = None, every: int | None = None):
        stages = [0, 2, 4, 8] if stages is None else stages
        if not stages or any(not 0 <= k <= MAX_K for k in stages) or stages != sorted(stages):
            raise ValueError(
                f"stages must be a non-empty, non-decreasing list of K in [0, {MAX_K}], got "
                f"{stages}"
            )
        if every is not None and every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.stages, self.every = list(stages), every

    def __call__(self, step: int, total_steps: int) -> int:
        check_step(step, total_steps)
        if self.every is not None:
            index = step // self.every
        else:
            index = step * len(self.stages) // total_steps
        return self.stages[min(index, len(self.stages) - 1)]
