"""Evidence boxes as corruptions receive them, and the geometry crystalkit applies to them.

A box is ``(x0, y0, x1, y1)`` in pixels of the image a corruption receives, exclusive ends, as
:attr:`~crystalkit.data.sample.Sample.boxes` holds it. A corruption that reads the evidence gets
one list of boxes per image (:data:`Boxes`). When ``crystal.corrupt_at: model_input`` resizes an
image first, its boxes are resized with it (:func:`resized_box`) to cover every pixel the
evidence reaches through the resize's filter, so removing the box removes the object's blurred
edge too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from crystalkit.data.boxes import Box

#: one list of evidence boxes per image of a batch
Boxes = list[list[Box]]
ResizeMode = Literal["bilinear", "bicubic"]

#: how far (in input pixels, at scale 1) a pixel reaches through torch's antialiased resize of
#: each mode: the half-width of its filter (triangle: 1, Keys cubic: 2); a downscale by ``s``
#: widens it ``s`` times
FILTER_REACH: dict[ResizeMode, float] = {"bilinear": 1.0, "bicubic": 2.0}


#: output pixels of slack in :func:`_resized_span`: a filter edge that falls exactly on a pixel
#: centre counts however the division rounds
_SLACK = 1e-6


def _resized_span(low: int, high: int, size: int, new_size: int, reach: float) -> tuple[int, int]:
    """Output pixels ``[a, b)`` whose filter, centred at ``scale * (i + 0.5)`` input pixels
    (``scale = size / new_size``, torch's antialiased resize), may weigh an input pixel of
    ``[low, high)``: those whose centre is within ``reach * max(scale, 1)`` of one of theirs (the
    filter's edge included, where rounding leaves a weight of a few ulps). An axis of unchanged
    size is copied as it is."""
    if size == new_size:
        return low, high
    scale = size / new_size
    support = reach * max(scale, 1.0)
    first = math.ceil((low + 0.5 - support) / scale - 0.5 - _SLACK)
    end = math.floor((high - 0.5 + support) / scale - 0.5 + _SLACK) + 1
    return max(first, 0), min(end, new_size)


def resized_box(
    box: Box, size: Sequence[int], new_size: Sequence[int], mode: ResizeMode = "bilinear"
) -> Box:
    """``box`` of an image of ``size`` ``(height, width)`` after torch's antialiased ``mode``
    resize to ``new_size``: every output pixel that any pixel of the box contributes to."""
    (height, width), (new_height, new_width) = size, new_size
    if (height, width) == (new_height, new_width):
        return box
    reach = FILTER_REACH[mode]
    x0, x1 = _resized_span(box[0], box[2], width, new_width, reach)
    y0, y1 = _resized_span(box[1], box[3], height, new_height, reach)
    return x0, y0, x1, y1


def widened_box(box: Box, margin: float, height: int, width: int) -> Box:
    """``box`` grown on every side by ``margin`` times its side along that axis (rounded
    outwards), clipped to the image."""
    x0, y0, x1, y1 = box
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    return (
        max(math.floor(x0 - dx), 0),
        max(math.floor(y0 - dy), 0),
        min(math.ceil(x1 + dx), width),
        min(math.ceil(y1 + dy), height),
    )


def evidence_size(boxes: Sequence[Box]) -> float:
    """One image's evidence size in pixels: the mean over its boxes of each box's mean side
    (``(width + height) / 2``); 0 without boxes."""
    if not boxes:
        return 0.0
    return sum((x1 - x0 + y1 - y0) / 2 for x0, y0, x1, y1 in boxes) / len(boxes)
