"""Difficulty buckets by how small the evidence is (V* / HR-Bench style): a sample's bucket is
the share of the image its smallest evidence box covers, cut at ``eval.area_buckets``.

The smallest box decides, not the mean: a count question is only as easy as its hardest object
to see. Bucket ``i`` holds the areas in ``[edges[i-1], edges[i])`` (lower edge in, upper edge
out); with the default edges ``[0.005, 0.05]`` the labels are ``<0.5%``, ``0.5-5%`` and
``>=5%``. A sample without evidence boxes has no bucket: it counts in no per-bucket accuracy
(lumping unknown areas into one bucket would read as a difficulty they may not have).
"""

from __future__ import annotations

import bisect
import itertools
from collections import defaultdict
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from crystalkit.data.boxes import Box
from crystalkit.data.sample import Sample


def box_area(box: Box, height: int, width: int) -> float:
    """The share of a ``height`` x ``width`` image that ``box`` (``x0, y0, x1, y1``, exclusive
    ends) covers, clipped to the image; 0 for an empty box."""
    x0, y0, x1, y1 = box
    across = max(0, min(x1, width) - max(x0, 0))
    down = max(0, min(y1, height) - max(y0, 0))
    return across * down / (height * width)


def evidence_area(sample: Sample) -> float | None:
    """The share of the image that the sample's smallest evidence box covers (``None`` without
    evidence)."""
    boxes = sample.evidence
    if not boxes:
        return None
    height, width = sample.image.shape[-2:]
    return min(box_area(box, int(height), int(width)) for box in boxes)


def _percent(edge: float) -> str:
    """``0.005`` -> ``0.5``: the edge as the user wrote it, times 100, exactly (two different
    edges never print alike, so labels stay distinct)."""
    return format((Decimal(repr(edge)) * 100).normalize(), "f")


def bucket_labels(edges: Sequence[float]) -> list[str]:
    """One ASCII label per bucket of ``edges`` (increasing fractions): ``<a%``, ``a-b%``, ...,
    ``>=z%``; no labels without edges."""
    if not edges:
        return []
    shown = [_percent(edge) for edge in edges]
    inner = [f"{low}-{high}%" for low, high in itertools.pairwise(shown)]
    return [f"<{shown[0]}%", *inner, f">={shown[-1]}%"]


def area_bucket(area: float | None, edges: Sequence[float]) -> str | None:
    """The label of the bucket ``area`` falls in (an area equal to an edge: the bucket above
    it); ``None`` without an area or without edges."""
    if area is None or not edges:
        return None
    return bucket_labels(edges)[bisect.bisect_right(edges, area)]


def bucket_accuracy(
    predictions: Sequence[dict[str, Any]],
) -> tuple[dict[str, float], dict[str, int]]:
    """Accuracy and number of samples per area bucket of prediction records (their ``bucket``
    and ``evidence_area``), smallest evidence first. Records without a bucket (no evidence, or
    written before buckets existed) are left out."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for p in predictions:
        if p.get("bucket") is not None:
            groups[p["bucket"]].append(p)
    ordered = sorted(groups.items(), key=lambda item: min(p["evidence_area"] for p in item[1]))
    accuracy = {label: sum(bool(p["correct"]) for p in rows) / len(rows) for label, rows in ordered}
    return accuracy, {label: len(rows) for label, rows in ordered}
