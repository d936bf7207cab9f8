"""A synthetic fine-grained perception benchmark: the CPU stand-in for V* / HR-Bench.

Each image shows a few small coloured shapes on a noisy mid-grey background; the question asks for
the colour, shape, position (quadrant) or count of small objects, with four options (A-D). Scenes
are built so that neither the text nor a glance at the image gives the answer away:

* the referent is always unique ("the triangle" only when exactly one triangle exists);
* the wrong options of colour / shape questions are drawn uniformly and also *appear in the image*
  on distractors, so "which option colour is present?" does not work and, for text alone, every
  option is equally likely to be right;
* answers are uniform over the options and independent of the question text;
* position targets share their colour with one distractor and their shape with another, so the
  model has to bind colour and shape at the target.

Objects sit in the cells of an even grid (one object per cell, jittered inside it), so they never
overlap or touch and never straddle the image's midlines. Sample ``i`` of split ``s`` depends only
on ``(seed, s, i)``: it is regenerated on demand, identical across processes and calls.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from crystalkit.data.sample import LETTERS, Sample
from crystalkit.data.splits import SPLITS, named_split
from crystalkit.registries import DATASETS

Task = Literal["colour", "shape", "position", "count"]

NUM_OPTIONS = 4
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 90, 235),
    "yellow": (240, 220, 40),
    "purple": (170, 50, 220),
    "white": (245, 245, 245),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond")
QUADRANTS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
COUNTS: tuple[str, ...] = tuple(str(k) for k in range(1, NUM_OPTIONS + 1))
BACKGROUND = 128
_SHAPE_TASKS = frozenset({"colour", "shape", "position"})  # tasks that name or ask for a shape
_MARGIN = 1  # free pixels between an object and its grid cell's edge, so objects never touch
_SUPERSAMPLE = 8
#: the ``(min, max)`` config fields and the least ``min`` each allows
_RANGE_FLOORS = {"object_size": 3, "num_distractors": 0}

_COLOUR_NAMES = tuple(COLOURS)
_COLOUR_PIXELS = {
    name: torch.tensor(rgb, dtype=torch.float32)[:, None, None] for name, rgb in COLOURS.items()
}
_TEMPLATES = {
    "colour": "what colour is the {shape} ?",
    "shape": "what shape is the {colour} object ?",
    "position": "where is the {colour} {shape} ?",
    "count": "how many {colour} objects are there ?",
}


@functools.cache
def shape_mask(shape: str, side: int) -> torch.Tensor:
    """Boolean ``[side, side]`` mask of ``shape`` filling a ``side``-pixel square.

    A pixel is on when the shape covers at least half of it (8x8 supersampling), so small shapes
    keep crisp, exact colours; the triangle and cross are widened by half a pixel so that they
    reach the top row / stay visible at small sizes.
    """
    n = side * _SUPERSAMPLE
    t = (torch.arange(n, dtype=torch.float32) + 0.5) / n * 2 - 1
    v, u = torch.meshgrid(t, t, indexing="ij")  # v grows downwards, both in [-1, 1]
    half_px = 1 / side
    if shape == "circle":
        inside = u * u + v * v <= 1
    elif shape == "square":
        inside = torch.ones_like(u, dtype=torch.bool)
    elif shape == "triangle":
        inside = u.abs() <= (v + 1) / 2 + half_px
    elif shape == "cross":
        inside = torch.minimum(u.abs(), v.abs()) <= max(1 / 3, half_px)
    elif shape == "diamond":
        inside = u.abs() + v.abs() <= 1
    else:
        raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")
    coverage = inside.float().reshape(side, _SUPERSAMPLE, side, _SUPERSAMPLE).mean(dim=(1, 3))
    return coverage >= 0.5


def _ambiguous_shapes(side: int) -> tuple[str, str] | None:
    """The first pair of shapes that render identically at ``side`` pixels, if any."""
    for i, a in enumerate(SHAPES):
        for b in SHAPES[i + 1 :]:
            if torch.equal(shape_mask(a, side), shape_mask(b, side)):
                return a, b
    return None


def grid_cells(image_size: int, max_side: int) -> int:
    """Grid cells per axis: even (no cell straddles a midline), each fits the largest object."""
    return (image_size // (max_side + 2 * _MARGIN)) // 2 * 2


@dataclass(frozen=True)
class SceneObject:
    """One drawn object; ``box`` is ``(x0, y0, x1, y1)`` with exclusive ends."""

    shape: str
    colour: str
    box: tuple[int, int, int, int]

    @property
    def mask(self) -> torch.Tensor:
        """The object's pixels inside its box (``[h, w]`` bool)."""
        return shape_mask(self.shape, self.box[2] - self.box[0])


class SyntheticShapesSplit(torch.utils.data.Dataset):
    """One split of :class:`SyntheticShapes`; samples are generated on access."""

    def __init__(self, config: SyntheticShapes.Config, name: str, length: int):
        self.config = config
        self.name = name
        self.length = length
        self._split_code = SPLITS.index(name)
        self._cells = grid_cells(config.image_size, config.object_size[1])
        edges = [i * config.image_size // self._cells for i in range(self._cells + 1)]
        self._edges = np.array(edges)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Sample:
        task, scene, objects, options, rng = self._scene(index)
        return self._sample(index, task, scene, objects, options, rng)

    def counterfactual(self, index: int) -> Sample:
        """Sample ``index`` re-rendered with only its answer changed: the same question, options,
        objects and noise, except that the target moves to another quadrant (position), one
        object of the asked colour is added or removed (count), or the referent takes another
        option's colour or shape (colour, shape). The change is seeded by the sample."""
        task, scene, objects, options, rng = self._scene(index)
        edit = np.random.default_rng([self.config.seed, self._split_code, index, 1])
        objects, scene = _EDITS[task](self, objects, scene, edit)
        return self._sample(index, task, scene, objects, options, rng)

    def _scene(
        self, index: int
    ) -> tuple[str, _Scene, list[SceneObject], list[str], np.random.Generator]:
        """Everything of sample ``index`` but its pixels, and the generator left where rendering
        the noise starts."""
        if not 0 <= index < self.length:
            raise IndexError(f"{self.name} split index {index} out of range [0, {self.length})")
        rng = np.random.default_rng([self.config.seed, self._split_code, index])
        task = self.config.tasks[rng.integers(len(self.config.tasks))]
        scene = _SCENES[task](self.config, rng)
        objects = self._place(scene.drawn, rng)
        order = rng.permutation(NUM_OPTIONS) if self.config.shuffle_options else range(NUM_OPTIONS)
        return task, scene, objects, [scene.options[k] for k in order], rng

    def _sample(
        self,
        index: int,
        task: str,
        scene: _Scene,
        objects: list[SceneObject],
        options: list[str],
        rng: np.random.Generator,
    ) -> Sample:
        answer = scene.answer
        if answer is None:
            answer = quadrant(objects[scene.targets[0]].box, self.config.image_size)
        boxes = np.array([objects[t].box for t in scene.targets])
        box = (*boxes[:, :2].min(axis=0).tolist(), *boxes[:, 2:].max(axis=0).tolist())
        return Sample(
            index=index,
            image=self._render(objects, rng),
            question=scene.question,
            options=options,
            answer=LETTERS[options.index(scene.options[answer])],
            category=task,
            box=box,
            boxes=[objects[t].box for t in scene.targets],
            meta={
                "split": self.name,
                "objects": [{"shape": o.shape, "colour": o.colour, "box": o.box} for o in objects],
                "targets": scene.targets,
            },
        )

    def _free_cells(self, objects: list[SceneObject]) -> list[tuple[int, int]]:
        """Grid cells (row, col) no object occupies."""
        taken = {self._cell_of(o) for o in objects}
        return [
            (r, c) for r in range(self._cells) for c in range(self._cells) if (r, c) not in taken
        ]

    def _cell_of(self, obj: SceneObject) -> tuple[int, int]:
        x0, y0 = obj.box[:2]
        return int(np.searchsorted(self._edges, y0, "right") - 1), int(
            np.searchsorted(self._edges, x0, "right") - 1
        )

    def _put(
        self, obj: SceneObject, cell: tuple[int, int], rng: np.random.Generator
    ) -> SceneObject:
        """``obj`` at a random offset inside grid ``cell``."""
        side = obj.box[2] - obj.box[0]
        row, col = cell
        x_lo, y_lo = self._edges[col] + _MARGIN, self._edges[row] + _MARGIN
        x = x_lo + rng.integers(0, self._edges[col + 1] - _MARGIN - side - x_lo + 1)
        y = y_lo + rng.integers(0, self._edges[row + 1] - _MARGIN - side - y_lo + 1)
        return SceneObject(obj.shape, obj.colour, (int(x), int(y), int(x + side), int(y + side)))

    def _place(self, drawn: list[tuple[str, str]], rng: np.random.Generator) -> list[SceneObject]:
        """Give each (shape, colour) its own random grid cell and a random size and offset."""
        lo, hi = self.config.object_size
        n = len(drawn)
        cells = rng.choice(self._cells * self._cells, size=n, replace=False)
        sides = rng.integers(lo, hi + 1, size=n)
        rows, cols = np.divmod(cells, self._cells)
        x_lo, y_lo = self._edges[cols] + _MARGIN, self._edges[rows] + _MARGIN
        x_room = self._edges[cols + 1] - _MARGIN - sides - x_lo
        y_room = self._edges[rows + 1] - _MARGIN - sides - y_lo
        x0 = x_lo + rng.integers(0, x_room + 1)
        y0 = y_lo + rng.integers(0, y_room + 1)
        return [
            SceneObject(shape, colour, (int(x), int(y), int(x + s), int(y + s)))
            for (shape, colour), x, y, s in zip(drawn, x0, y0, sides, strict=True)
        ]

    def _render(self, objects: list[SceneObject], rng: np.random.Generator) -> torch.Tensor:
        """Paint the objects on mid-grey, add per-pixel Gaussian noise, quantise to uint8."""
        size = self.config.image_size
        image = torch.full((3, size, size), float(BACKGROUND))
        for obj in objects:
            x0, y0, x1, y1 = obj.box
            patch = image[:, y0:y1, x0:x1]
            patch[:] = torch.where(obj.mask, _COLOUR_PIXELS[obj.colour], patch)
        if self.config.background_noise > 0:
            noise = rng.standard_normal((3, size, size), dtype=np.float32)
            image.add_(torch.from_numpy(noise), alpha=255 * self.config.background_noise)
        # +0.5 then truncation rounds to nearest; on these images torch's round() was measured at
        # several milliseconds on CPU (torch 2.14), more than all the rest of a sample
        return image.add_(0.5).clamp_(0, 255).to(torch.uint8)


def quadrant(box: tuple[int, int, int, int], image_size: int) -> int:
    """Index into :data:`QUADRANTS` of the box's centre."""
    x0, y0, x1, y1 = box
    bottom = (y0 + y1) / 2 >= image_size / 2
    right = (x0 + x1) / 2 >= image_size / 2
    return 2 * bottom + right


@dataclass(frozen=True)
class _Scene:
    """What to draw and what to ask, before placement.

    ``drawn`` holds ``(shape, colour)`` pairs, targets first; ``answer`` indexes the canonical
    ``options``, or is ``None`` when it is the first target's quadrant (known after placement).
    """

    drawn: list[tuple[str, str]]
    targets: list[int]
    question: str
    options: tuple[str, ...]
    answer: int | None


def _pick(names: tuple[str, ...], rng: np.random.Generator, exclude: str | None = None) -> str:
    candidates = [n for n in names if n != exclude]
    return candidates[rng.integers(len(candidates))]


def _num_distractors(config: SyntheticShapes.Config, rng: np.random.Generator) -> int:
    lo, hi = config.num_distractors
    return int(rng.integers(lo, hi + 1))


def _attribute_scene(
    config: SyntheticShapes.Config,
    rng: np.random.Generator,
    asked: tuple[str, ...],
    other: tuple[str, ...],
) -> tuple[list[tuple[str, str]], tuple[str, ...], int, str]:
    """A referent unique by its ``other`` attribute whose ``asked`` attribute is the answer.

    The answer and the three wrong options are drawn uniformly, so the option set says nothing
    about which option is right; each wrong option is also shown on a distractor (while there are
    distractors), so the image contains every option and only the referent tells them apart.
    Returns ``(asked, other)`` pairs (referent first), canonical options, answer index, referent.
    """
    answer = _pick(asked, rng)
    referent = _pick(other, rng)
    rest = [a for a in asked if a != answer]
    foils = [rest[k] for k in rng.choice(len(rest), NUM_OPTIONS - 1, replace=False)]
    n = _num_distractors(config, rng)
    values = foils[:n] + [_pick(asked, rng) for _ in range(n - len(foils))]
    pairs = [(answer, referent)] + [(value, _pick(other, rng, referent)) for value in values]
    canonical = tuple(a for a in asked if a == answer or a in foils)
    return pairs, canonical, canonical.index(answer), referent


def _colour_scene(config: SyntheticShapes.Config, rng: np.random.Generator) -> _Scene:
    """'what colour is the triangle ?' with exactly one triangle."""
    pairs, options, answer, shape = _attribute_scene(config, rng, _COLOUR_NAMES, SHAPES)
    drawn = [(s, c) for c, s in pairs]
    return _Scene(drawn, [0], _TEMPLATES["colour"].format(shape=shape), options, answer)


def _shape_scene(config: SyntheticShapes.Config, rng: np.random.Generator) -> _Scene:
    """'what shape is the red object ?' with exactly one red object."""
    drawn, options, answer, colour = _attribute_scene(config, rng, SHAPES, _COLOUR_NAMES)
    return _Scene(drawn, [0], _TEMPLATES["shape"].format(colour=colour), options, answer)


def _position_scene(config: SyntheticShapes.Config, rng: np.random.Generator) -> _Scene:
    """'where is the red triangle ?': one distractor shares its colour, another its shape."""
    shape, colour = _pick(SHAPES, rng), _pick(_COLOUR_NAMES, rng)
    others = [(s, c) for s in SHAPES for c in _COLOUR_NAMES if (s, c) != (shape, colour)]
    drawn = [(shape, colour)]
    for j in range(_num_distractors(config, rng)):
        if j == 0:
            drawn.append((_pick(SHAPES, rng, shape), colour))
        elif j == 1:
            drawn.append((shape, _pick(_COLOUR_NAMES, rng, colour)))
        else:
            drawn.append(others[rng.integers(len(others))])
    question = _TEMPLATES["position"].format(colour=colour, shape=shape)
    return _Scene(drawn, [0], question, QUADRANTS, None)


def _count_scene(config: SyntheticShapes.Config, rng: np.random.Generator) -> _Scene:
    """'how many red objects are there ?': 1-4 of them (uniform), distractors in other colours."""
    colour = _pick(_COLOUR_NAMES, rng)
    k = int(rng.integers(1, NUM_OPTIONS + 1))
    drawn = [(_pick(SHAPES, rng), colour) for _ in range(k)]
    n = _num_distractors(config, rng)
    drawn += [(_pick(SHAPES, rng), _pick(_COLOUR_NAMES, rng, colour)) for _ in range(n)]
    return _Scene(drawn, list(range(k)), _TEMPLATES["count"].format(colour=colour), COUNTS, k - 1)


def _move_target(
    split: SyntheticShapesSplit,
    objects: list[SceneObject],
    scene: _Scene,
    rng: np.random.Generator,
) -> tuple[list[SceneObject], _Scene]:
    """Position: the target to a free cell of another quadrant."""
    target = scene.targets[0]
    size = split.config.image_size
    here = quadrant(objects[target].box, size)
    half = split._cells // 2
    cells = [(r, c) for r, c in split._free_cells(objects) if 2 * (r >= half) + (c >= half) != here]
    moved = split._put(objects[target], cells[rng.integers(len(cells))], rng)
    return [moved if i == target else o for i, o in enumerate(objects)], scene


def _recount(
    split: SyntheticShapesSplit,
    objects: list[SceneObject],
    scene: _Scene,
    rng: np.random.Generator,
) -> tuple[list[SceneObject], _Scene]:
    """Count: one more object of the asked colour (one fewer when there are already four)."""
    k = len(scene.targets)
    if k < NUM_OPTIONS:
        colour = objects[scene.targets[0]].colour
        free = split._free_cells(objects)
        template = SceneObject(_pick(SHAPES, rng), colour, objects[scene.targets[0]].box)
        added = split._put(template, free[rng.integers(len(free))], rng)
        objects = [*objects[:k], added, *objects[k:]]
        return objects, replace(scene, targets=list(range(k + 1)), answer=k)
    objects = objects[: k - 1] + objects[k:]
    return objects, replace(scene, targets=list(range(k - 1)), answer=k - 2)


def _reattribute(field: str) -> Callable[..., tuple[list[SceneObject], _Scene]]:
    """Colour / shape: the referent takes another option's ``field``."""

    def edit(
        split: SyntheticShapesSplit,
        objects: list[SceneObject],
        scene: _Scene,
        rng: np.random.Generator,
    ) -> tuple[list[SceneObject], _Scene]:
        referent = objects[0]
        others = [o for o in scene.options if o != getattr(referent, field)]
        value = others[rng.integers(len(others))]
        changed = replace(referent, **{field: value})
        return [changed, *objects[1:]], replace(scene, answer=scene.options.index(value))

    return edit


_EDITS = {
    "colour": _reattribute("colour"),
    "shape": _reattribute("shape"),
    "position": _move_target,
    "count": _recount,
}

_SCENES = {
    "colour": _colour_scene,
    "shape": _shape_scene,
    "position": _position_scene,
    "count": _count_scene,
}


@DATASETS.register("synthetic_shapes")
class SyntheticShapes:
    """Small coloured shapes among distractors; colour / shape / position / count questions.

    Every sample has four options (letters A-D). ``box`` is the asked-about object's box; for count
    questions it encloses all counted objects. ``meta`` holds the scene: ``objects`` (shape, colour,
    box of every object) and ``targets`` (indices of the asked-about ones).
    """

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        image_size: int = Field(
            64, ge=16, le=4096, description="side of the square RGB image, in pixels"
        )
        object_size: tuple[int, int] = Field(
            (6, 10),
            description="min and max object side in pixels; each object's side is drawn uniformly "
            "in between (shapes are told apart from 6 px up)",
        )
        num_distractors: tuple[int, int] = Field(
            (3, 6),
            description="min and max number of distractor objects besides the question's targets "
            "(clutter); below 3, wrong options of colour/shape questions may be missing from the "
            "image, which makes those questions easier",
        )
        tasks: list[Task] = Field(
            default_factory=lambda: list(_SCENES),
            description="question types, drawn uniformly per sample: colour (of a unique shape), "
            "shape (of a unique colour), position (quadrant of a unique colour+shape), "
            "count (objects of a colour, 1-4)",
        )
        train_size: int = Field(
            20000, ge=0, le=10_000_000, description="samples in the train split"
        )
        val_size: int = Field(512, ge=0, le=10_000_000, description="samples in the val split")
        test_size: int = Field(1024, ge=0, le=10_000_000, description="samples in the test split")
        background_noise: float = Field(
            0.08,
            ge=0,
            le=1,
            description="std of the per-pixel Gaussian noise added to the whole mid-grey image, "
            "as a fraction of full intensity (0 = clean)",
        )
        shuffle_options: bool = Field(
            True,
            description="random option order per sample (answer letter uniform); if false, "
            "options keep a fixed canonical order (palette, shape list, quadrants, 1-4)",
        )
        seed: int = Field(
            0, ge=0, description="dataset seed; sample i of split s depends only on (seed, s, i)"
        )

        @field_validator(*_RANGE_FLOORS)
        @classmethod
        def _check_range(cls, value: tuple[int, int], info: ValidationInfo) -> tuple[int, int]:
            lo, hi = value
            floor = _RANGE_FLOORS[info.field_name]
            if lo < floor or lo > hi:
                raise ValueError(
                    f"{info.field_name} must be (min, max) with {floor} <= min <= max, got {value}"
                )
            return value

        @field_validator("tasks")
        @classmethod
        def _check_tasks(cls, value: list[Task]) -> list[Task]:
            if not value or len(set(value)) != len(value):
                raise ValueError(f"tasks must be a non-empty list without repeats, got {value}")
            return value

        @model_validator(mode="after")
        def _check_scene_fits(self) -> SyntheticShapes.Config:
            lo, hi = self.object_size
            cells = grid_cells(self.image_size, hi)
            if cells < 2:
                raise ValueError(
                    f"image_size {self.image_size} is too small for objects of {hi} px; "
                    f"need image_size >= {2 * (hi + 2 * _MARGIN)}"
                )
            targets = NUM_OPTIONS if "count" in self.tasks else 1
            needed = self.num_distractors[1] + targets
            if needed > cells * cells:
                raise ValueError(
                    f"image_size {self.image_size} with objects up to {hi} px holds at most "
                    f"{cells * cells} objects ({cells}x{cells} grid), but a scene may need "
                    f"{needed} ({self.num_distractors[1]} distractors + {targets} targets); "
                    "enlarge image_size, shrink object_size or reduce num_distractors"
                )
            if _SHAPE_TASKS.intersection(self.tasks):
                for side in range(lo, hi + 1):
                    pair = _ambiguous_shapes(side)
                    if pair is not None:
                        raise ValueError(
                            f"object_size {self.object_size}: a {pair[0]} and a {pair[1]} look "
                            f"identical at {side} px, so colour/shape/position questions would be "
                            "ambiguous; raise object_size or use tasks ['count']"
                        )
            return self

    def __init__(self, config: SyntheticShapes.Config | None = None):
        self.config = config if config is not None else self.Config()
        sizes = (self.config.train_size, self.config.val_size, self.config.test_size)
        self._splits = {
            name: SyntheticShapesSplit(self.config, name, size)
            for name, size in zip(SPLITS, sizes, strict=True)
        }

    def split(self, name: str) -> SyntheticShapesSplit:
        """The ``train``, ``val`` or ``test`` split (disjoint: each has its own seed stream)."""
        return named_split("synthetic_shapes", self._splits, name)

    def corpus(self) -> list[str]:
        """Every word of any question, option or answer letter, sorted.

        It covers all tasks whatever ``tasks`` selects, so a tokenizer built from it stays valid
        when a model trained on some tasks is evaluated on others.
        """
        texts = [*_TEMPLATES.values(), *_COLOUR_NAMES, *SHAPES, *QUADRANTS, *COUNTS]
        words = {w for text in texts for w in text.split() if not w.startswith("{")}
        return sorted(words | set(LETTERS[:NUM_OPTIONS]))
