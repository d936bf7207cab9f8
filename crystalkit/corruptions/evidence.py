"""The target-aware corruption: it removes exactly the question's evidence, by construction.

A whole-image corruption removes evidence only as a side effect of its strength, which depends on
how small the objects are. ``evidence`` reads the boxes of every object the answer depends on
(:attr:`~crystalkit.data.sample.Sample.boxes`) and erases, blurs or occludes just those, leaving
every other pixel as it was.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from crystalkit.corruptions.basic import (
    GaussianBlur,
    Generator,
    Params,
    Sampled,
    Shape,
    check_unit,
    per_image_boxes,
    work_dtype,
)
from crystalkit.corruptions.boxes import Box, Boxes, evidence_size, widened_box
from crystalkit.registries import CORRUPTIONS

Tensor = torch.Tensor
Mode = Literal["erase", "blur", "occlude"]
Scope = Literal["evidence", "objects"]
#: the ring whose pixels an erased box's fill imitates reaches this many pixels past the box, at
#: least (else the box's own larger side)
MIN_RING = 4
#: fewer ring pixels than this outside the evidence (a box filling its image): the fill imitates
#: all of the image's pixels outside the evidence instead
MIN_RING_PIXELS = 16
#: median absolute deviation -> standard deviation of a normal distribution
MAD_TO_STD = 1.4826


@CORRUPTIONS.register("evidence")
class EvidenceCorruption(Sampled):
    """Removes exactly the question's evidence: erases, blurs or occludes its boxes (reads them).

    Args:
        mode: erase: fill every evidence box with noise matched to the background around it, so
            that nothing shows where, or how many, the objects were; blur: blur inside the boxes
            only (sigma ``sigma`` times the evidence size); occlude: paste an opaque patch of
            ``value`` (visible by design).
        margin: grows each box on every side by this fraction of its side along that axis (0 =
            the box itself), for boxes drawn tighter than the object's edge.
        sigma: blur mode's standard deviation, in multiples of the sample's evidence size (the
            mean side of its boxes, averaged over its boxes).
        value: occlude mode's patch value in [0, 1] (0.5 = mid grey).
        scope: evidence: the boxes of the objects the answer depends on; objects: every object
            of the scene (``meta["objects"]``), so that nothing is left to answer by
            elimination (erasing the one triangle leaves the other objects' colours, and the
            answer is the option no object shows).
    """

    uses_boxes = True

    def __init__(
        self,
        mode: Mode = "erase",
        margin: float = 0.0,
        sigma: float = 2.0,
        value: float = 0.5,
        scope: Scope = "evidence",
    ) -> None:
        if mode not in ("erase", "blur", "occlude"):
            raise ValueError(f"mode must be one of erase, blur, occlude, got {mode!r}")
        if scope not in ("evidence", "objects"):
            raise ValueError(f"scope must be one of evidence, objects, got {scope!r}")
        self.box_scope = scope
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        check_unit("value", value)
        self.mode = mode
        self.margin = float(margin)
        self.sigma = float(sigma)
        self.value = float(value)
        self._blur = GaussianBlur()

    def sample(self, shape: Shape, generator: Generator, boxes: Boxes | None = None) -> Params:
        """``boxes``: each widened box as ``[image, x0, y0, x1, y1]`` (``[N, 5]``); ``noise``
        (erase): a standard normal draw per pixel; ``sigma`` (blur): per image, in pixels."""
        batch, _, height, width = shape
        boxes = per_image_boxes("evidence", boxes, batch)
        widened = [
            (i, *widened_box(box, self.margin, height, width))
            for i, image_boxes in enumerate(boxes)
            for box in image_boxes
        ]
        params = {"boxes": torch.tensor(widened, dtype=torch.long).view(-1, 5)}
        if self.mode == "erase":
            params["noise"] = torch.randn(
                tuple(shape), generator=generator, device=generator.device
            )
        elif self.mode == "blur":
            params["sigma"] = torch.tensor([self.sigma * evidence_size(b) for b in boxes])
        return params

    def apply(self, images: Tensor, params: Params) -> Tensor:
        boxes = [(int(i), (x0, y0, x1, y1)) for i, x0, y0, x1, y1 in params["boxes"].tolist()]
        region = _region(boxes, images)
        if self.mode == "occlude":
            return images.masked_fill(region, self.value)
        if self.mode == "blur":
            return torch.where(region, self._blur.apply(images, {"sigma": params["sigma"]}), images)
        return _erase(images, boxes, region, params["noise"])


def _region(boxes: list[tuple[int, Box]], images: Tensor) -> Tensor:
    """``[B, 1, H, W]``: the pixels inside any of the boxes (of their image)."""
    batch, _, height, width = images.shape
    region = torch.zeros(batch, 1, height, width, dtype=torch.bool, device=images.device)
    for i, (x0, y0, x1, y1) in boxes:
        region[i, :, y0:y1, x0:x1] = True
    return region


def _erase(images: Tensor, boxes: list[tuple[int, Box]], region: Tensor, noise: Tensor) -> Tensor:
    """Each box filled with ``median + spread * noise`` per channel, where median and spread
    (median absolute deviation, as a normal's standard deviation) are those of the pixels around
    the box outside every evidence box (:func:`_rings`): robust statistics, so a distractor in the
    ring barely moves them, and per box, so a background that varies across the image is
    followed. The statistics of all boxes are taken at once (NaN outside each ring)."""
    dtype = work_dtype(images)
    x = images.to(dtype)
    out = x.clone()
    if not boxes:
        return out.to(images.dtype)
    index = torch.tensor([i for i, _ in boxes], device=images.device)
    rings = _rings([box for _, box in boxes], ~region[index, 0])
    pixels = x[index].flatten(2).masked_fill(~rings.flatten(1)[:, None], math.nan)  # [N, 3, HW]
    median = pixels.nanmedian(dim=2).values
    spread = (pixels - median[..., None]).abs().nanmedian(dim=2).values * MAD_TO_STD
    for n, (i, (x0, y0, x1, y1)) in enumerate(boxes):
        fill = noise[i, :, y0:y1, x0:x1].to(dtype) * spread[n, :, None, None]
        out[i, :, y0:y1, x0:x1] = (fill + median[n, :, None, None]).clamp(0.0, 1.0)
    return out.to(images.dtype)


def _rings(boxes: list[Box], outside: Tensor) -> Tensor:
    """``[N, H, W]``: per box, the pixels of ``outside`` (its image's pixels outside every evidence
    box) within its larger side (at least :data:`MIN_RING`) of it; all of ``outside`` where that
    leaves fewer than :data:`MIN_RING_PIXELS`, all the image where ``outside`` is empty."""
    _, height, width = outside.shape
    corners = torch.tensor(boxes, device=outside.device)  # [N, 4]: x0, y0, x1, y1
    sides = corners[:, 2:] - corners[:, :2]
    reach = sides.amax(dim=1, keepdim=True).clamp_min(MIN_RING)
    low, high = corners[:, :2] - reach, corners[:, 2:] + reach
    cols = torch.arange(width, device=outside.device)
    rows = torch.arange(height, device=outside.device)
    in_cols = (cols >= low[:, :1]) & (cols < high[:, :1])  # [N, W]
    in_rows = (rows >= low[:, 1:]) & (rows < high[:, 1:])  # [N, H]
    rings = in_rows[:, :, None] & in_cols[:, None, :] & outside
    few = rings.sum(dim=(1, 2)) < MIN_RING_PIXELS
    rings = torch.where(few[:, None, None], outside, rings)
    return rings | ~rings.any(dim=(1, 2))[:, None, None]
