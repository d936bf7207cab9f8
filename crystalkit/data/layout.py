"""Where the synthetic benchmark's objects go: an even grid of cells, one object per cell, and the
occluder bars that hide part of an object.

The grid has an even number of cells per axis, so that no cell straddles a midline and every
object's quadrant is unambiguous; each cell fits the largest object plus a free margin, so objects
never overlap or touch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from crystalkit.data.boxes import Box
from crystalkit.data.shapes import shape_mask

_MARGIN = 1  # free pixels between an object and its grid cell's edge, so objects never touch


@dataclass(frozen=True)
class SceneObject:
    """One drawn object; ``box`` is ``(x0, y0, x1, y1)`` with exclusive ends. ``occluder`` is the
    box of an opaque bar drawn over part of it (inside its grid cell), if any."""

    shape: str
    colour: str
    box: Box
    occluder: Box | None = None

    @property
    def mask(self) -> torch.Tensor:
        """The object's pixels inside its box (``[h, w]`` bool)."""
        return shape_mask(self.shape, self.box[2] - self.box[0])

    def describe(self) -> dict:
        """The object as ``meta["objects"]`` lists it."""
        described = {"shape": self.shape, "colour": self.colour, "box": self.box}
        if self.occluder is not None:
            described["occluder"] = self.occluder
        return described


def grid_cells(image_size: int, max_side: int) -> int:
    """Grid cells per axis: even (no cell straddles a midline), each fits the largest object."""
    return (image_size // (max_side + 2 * _MARGIN)) // 2 * 2


def min_image_size(max_side: int) -> int:
    """The least image side whose grid has two cells per axis for objects of ``max_side``."""
    return 2 * (max_side + 2 * _MARGIN)


@dataclass(frozen=True, eq=False)
class Grid:
    """An even grid of ``cells`` x ``cells`` cells over the image; ``edges`` are the cells'
    pixel boundaries along either axis."""

    cells: int
    edges: np.ndarray = field(repr=False)

    @classmethod
    def fit(cls, image_size: int, max_side: int) -> Grid:
        """The finest grid whose cells fit objects up to ``max_side`` pixels."""
        cells = grid_cells(image_size, max_side)
        return cls(cells, np.array([i * image_size // cells for i in range(cells + 1)]))

    def place(
        self,
        drawn: list[tuple[str, str]],
        rng: np.random.Generator,
        sides: np.ndarray | tuple[int, int],
    ) -> list[SceneObject]:
        """Give each (shape, colour) its own random cell and a random offset inside it; its side
        is ``sides[i]``, or drawn uniformly in ``sides`` given as a (min, max) range."""
        n = len(drawn)
        cells = rng.choice(self.cells * self.cells, size=n, replace=False)
        if isinstance(sides, tuple):
            sides = rng.integers(sides[0], sides[1] + 1, size=n)
        rows, cols = np.divmod(cells, self.cells)
        x_lo, y_lo = self.edges[cols] + _MARGIN, self.edges[rows] + _MARGIN
        x_room = self.edges[cols + 1] - _MARGIN - sides - x_lo
        y_room = self.edges[rows + 1] - _MARGIN - sides - y_lo
        x0 = x_lo + rng.integers(0, x_room + 1)
        y0 = y_lo + rng.integers(0, y_room + 1)
        return [
            SceneObject(shape, colour, (int(x), int(y), int(x + s), int(y + s)))
            for (shape, colour), x, y, s in zip(drawn, x0, y0, sides, strict=True)
        ]

    def free_cells(self, objects: list[SceneObject]) -> list[tuple[int, int]]:
        """Cells (row, col) no object occupies."""
        taken = {self.cell_of(o) for o in objects}
        return [(r, c) for r in range(self.cells) for c in range(self.cells) if (r, c) not in taken]

    def cell_of(self, obj: SceneObject) -> tuple[int, int]:
        x0, y0 = obj.box[:2]
        return int(np.searchsorted(self.edges, y0, "right") - 1), int(
            np.searchsorted(self.edges, x0, "right") - 1
        )

    def bounds(self, cell: tuple[int, int]) -> Box:
        """The pixel box of ``cell``."""
        row, col = cell
        e = self.edges
        return int(e[col]), int(e[row]), int(e[col + 1]), int(e[row + 1])

    def put(self, obj: SceneObject, cell: tuple[int, int], rng: np.random.Generator) -> SceneObject:
        """``obj`` at a random offset inside ``cell`` (without an occluder)."""
        side = obj.box[2] - obj.box[0]
        x_lo, y_lo, x_hi, y_hi = self.bounds(cell)
        x = x_lo + _MARGIN + rng.integers(0, x_hi - x_lo - 2 * _MARGIN - side + 1)
        y = y_lo + _MARGIN + rng.integers(0, y_hi - y_lo - 2 * _MARGIN - side + 1)
        return SceneObject(obj.shape, obj.colour, (int(x), int(y), int(x + side), int(y + side)))


def occlude(obj: SceneObject, cell: Box, fraction: float, rng: np.random.Generator) -> SceneObject:
    """``obj`` partly behind an opaque bar that comes in from a random side.

    The bar covers the deepest run of rows (columns) from that side that hides at most
    ``fraction`` of the object's pixels, so at least ``1 - fraction`` of them stay visible; it
    reaches a third of the object's side beyond the object (at least one pixel, and never out of
    the object's cell), so it reads as a bar in front of the object, not as a cut shape.
    """
    x0, y0, x1, y1 = obj.box
    side = x1 - x0
    mask = obj.mask
    edge = int(rng.integers(4))  # 0 top, 1 bottom, 2 left, 3 right
    profile = mask.sum(dim=1 if edge < 2 else 0)
    if edge in (1, 3):
        profile = profile.flip(0)
    hidden = torch.cat([torch.zeros(1, dtype=profile.dtype), profile.cumsum(0)])
    depth = int((hidden <= fraction * int(mask.sum()) + 1e-9).nonzero().max())
    out = max(1, side // 3)
    bars = {
        0: (x0 - out, y0 - out, x1 + out, y0 + depth),
        1: (x0 - out, y1 - depth, x1 + out, y1 + out),
        2: (x0 - out, y0 - out, x0 + depth, y1 + out),
        3: (x1 - depth, y0 - out, x1 + out, y1 + out),
    }
    bx0, by0, bx1, by1 = bars[edge]
    cx0, cy0, cx1, cy1 = cell
    bar = (max(bx0, cx0), max(by0, cy0), min(bx1, cx1), min(by1, cy1))
    return replace(obj, occluder=bar)


def quadrant(box: Box, image_size: int) -> int:
    """Index into the quadrants (top left, top right, bottom left, bottom right) of the box's
    centre."""
    x0, y0, x1, y1 = box
    bottom = (y0 + y1) / 2 >= image_size / 2
    right = (x0 + x1) / 2 >= image_size / 2
    return 2 * bottom + right
