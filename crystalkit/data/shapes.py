"""The shapes of the synthetic benchmark as pixel masks, and the checks that keep them apart.

Besides the five base shapes there are *detail pairs*: a base shape and a variant of it that
differs only in a small detail (a hole, a notch), for scenes whose distractors may only be told
from the referent by that detail.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond")
#: (base shape, its variant told apart only by a detail)
DETAIL_PAIRS: tuple[tuple[str, str], ...] = (
    ("circle", "ring"),
    ("square", "notched square"),
    ("triangle", "notched triangle"),
)
DETAIL_SHAPES: tuple[str, ...] = tuple(shape for pair in DETAIL_PAIRS for shape in pair)
ALL_SHAPES: tuple[str, ...] = tuple(dict.fromkeys(SHAPES + DETAIL_SHAPES))
_SUPERSAMPLE = 8
_PARTNERS = {a: b for pair in DETAIL_PAIRS for a, b in (pair, pair[::-1])}


def partner(shape: str) -> str:
    """The other shape of ``shape``'s detail pair."""
    return _PARTNERS[shape]


@functools.cache
def shape_mask(shape: str, side: int) -> torch.Tensor:
    """Boolean ``[side, side]`` mask of ``shape`` filling a ``side``-pixel square.

    A pixel is on when the shape covers at least half of it (8x8 supersampling), so small shapes
    keep crisp, exact colours; the triangle and cross are widened by half a pixel so that they
    reach the top row / stay visible at small sizes. The details scale with the shape: the ring's
    hole has 0.4 of its radius, the notches are a third of the side wide.
    """
    n = side * _SUPERSAMPLE
    t = (torch.arange(n, dtype=torch.float32) + 0.5) / n * 2 - 1
    v, u = torch.meshgrid(t, t, indexing="ij")  # v grows downwards, both in [-1, 1]
    half_px = 1 / side
    if shape in ("circle", "ring"):
        inside = u * u + v * v <= 1
        if shape == "ring":
            inside &= u * u + v * v > 0.4**2
    elif shape in ("square", "notched square"):
        inside = torch.ones_like(u, dtype=torch.bool)
        if shape == "notched square":  # the top right corner cut out
            inside &= ~((u > 1 / 3) & (v < -1 / 3))
    elif shape in ("triangle", "notched triangle"):
        inside = u.abs() <= (v + 1) / 2 + half_px
        if shape == "notched triangle":  # a notch in the middle of the base
            inside &= ~((u.abs() < 1 / 3) & (v > 1 / 3))
    elif shape == "cross":
        inside = torch.minimum(u.abs(), v.abs()) <= max(1 / 3, half_px)
    elif shape == "diamond":
        inside = u.abs() + v.abs() <= 1
    else:
        raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(ALL_SHAPES)}")
    coverage = inside.float().reshape(side, _SUPERSAMPLE, side, _SUPERSAMPLE).mean(dim=(1, 3))
    return coverage >= 0.5


def ambiguous_shapes(side: int, shapes: Iterable[str] = SHAPES) -> tuple[str, str] | None:
    """The first pair of ``shapes`` that render identically at ``side`` pixels, if any."""
    shapes = tuple(shapes)
    for i, a in enumerate(shapes):
        for b in shapes[i + 1 :]:
            if torch.equal(shape_mask(a, side), shape_mask(b, side)):
                return a, b
    return None
