"""Evidence boxes: ``(x0, y0, x1, y1)`` in pixels with exclusive ends."""

from __future__ import annotations

Box = tuple[int, int, int, int]


def enclosing(boxes: list[Box]) -> Box:
    """The tightest box around all of ``boxes`` (at least one)."""
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )
