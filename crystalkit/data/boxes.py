"""Evidence boxes: ``(x0, y0, x1, y1)`` in pixels with exclusive ends. Benchmark files' boxes are
checked against their image and carried along when the image is resized, so that
``Sample.boxes`` is always in the sample's own pixels."""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral

Box = tuple[int, int, int, int]


def box_breach(box: Sequence[int], height: int, width: int) -> str | None:
    """Why ``box`` is not a non-empty box inside a ``height x width`` image (one phrase), or
    ``None``."""
    if len(box) != 4 or not all(isinstance(v, Integral) and not isinstance(v, bool) for v in box):
        return "is not four integers (x0, y0, x1, y1)"
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        return (
            f"is empty or outside the {width}x{height} image (expected 0 <= x0 < x1 <= width and "
            "0 <= y0 < y1 <= height, exclusive ends)"
        )
    return None


def read_boxes(value: object, width: int, height: int) -> list[Box]:
    """``value`` as ``[x0, y0, x1, y1]`` pixel boxes of a ``width`` x ``height`` image, exclusive
    ends; fractional coordinates widen to whole pixels. ``None`` or ``[]`` is no box; anything
    else raises ``ValueError`` saying what was expected."""
    if value is None or value == []:
        return []
    expected = (
        f"'boxes' must be a list of [x0, y0, x1, y1] pixel boxes inside the {width} x {height} "
        "image, with x0 < x1 and y0 < y1"
    )
    if not isinstance(value, list):
        raise ValueError(f"{expected}, got {value!r:.80}")
    boxes = []
    for box in value:
        if not (isinstance(box, list) and len(box) == 4 and all(map(_finite, box))):
            raise ValueError(f"{expected}, got the box {box!r:.80}")
        pixels = (math.floor(box[0]), math.floor(box[1]), math.ceil(box[2]), math.ceil(box[3]))
        if box_breach(pixels, height, width) is not None:
            raise ValueError(f"{expected}, got the box {box!r:.80}")
        boxes.append(pixels)
    return boxes


def _finite(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, int) and not isinstance(value, bool)


def resize_boxes(boxes: list[Box], width: int, height: int, size: int | None) -> list[Box]:
    """``boxes`` of a ``width`` x ``height`` image on that image squared to ``size`` x ``size``:
    every output pixel whose footprint overlaps a box is in it (starts round down, ends up).
    ``None`` keeps the native size, and the boxes."""
    if size is None:
        return list(boxes)
    return [
        (x0 * size // width, y0 * size // height, -(-x1 * size // width), -(-y1 * size // height))
        for x0, y0, x1, y1 in boxes
    ]


def enclosing(boxes: list[Box]) -> Box:
    """The tightest box around all of ``boxes`` (at least one)."""
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )
