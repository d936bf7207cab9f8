"""A synthetic fine-grained perception benchmark: the CPU stand-in for V* / HR-Bench.

Each image shows a few small coloured shapes on a noisy mid-grey background (or a dimmed
photograph); the question asks for the colour, shape, position (quadrant) or count of small
objects, with four options (A-D). The scenes (:mod:`crystalkit.data.scenes`) are built so that
neither the text nor a glance at the image gives the answer away.

Difficulty dials: the objects' size relative to the image (``target_area``), how alike the
distractors are to the referent (``distractors``), occluder bars over the objects of count
questions (``occlusion``) and photographs as backgrounds (``background``); their defaults keep
the original benchmark, sample for sample.

Objects sit in the cells of an even grid (one object per cell, jittered inside it;
:mod:`crystalkit.data.layout`), so they never overlap or touch and never straddle the image's
midlines. Sample ``i`` of split ``s`` depends only on ``(seed, s, i)``: it is regenerated on
demand, identical across processes and calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from crystalkit.data.backgrounds import GREY, photo_background, photo_files
from crystalkit.data.boxes import enclosing
from crystalkit.data.layout import Grid, SceneObject, grid_cells, min_image_size, occlude, quadrant
from crystalkit.data.sample import LETTERS, Sample
from crystalkit.data.scenes import (
    COLOUR_NAMES,
    COLOURS,
    DISTRACTOR_TASKS,
    NUM_OPTIONS,
    QUADRANTS,
    SCENES,
    Distractors,
    Scene,
    Task,
    corpus_words,
    pick,
)
from crystalkit.data.shapes import ALL_SHAPES, SHAPES, ambiguous_shapes, shape_mask
from crystalkit.data.splits import SPLITS, named_split
from crystalkit.registries import DATASETS

__all__ = [
    "COLOURS",
    "OCCLUDER",
    "QUADRANTS",
    "SHAPES",
    "SceneObject",
    "SyntheticShapes",
    "SyntheticShapesSplit",
    "area_sides",
    "grid_cells",
    "quadrant",
    "shape_mask",
]

#: the occluder bars' colour: near black, far from the background and from every palette colour
OCCLUDER = (24, 24, 24)
_SHAPE_TASKS = frozenset({"colour", "shape", "position"})  # tasks that name or ask for a shape
#: the ``(min, max)`` config fields and the least ``min`` each allows
_RANGE_FLOORS = {"object_size": 3, "num_distractors": 0}
_MIN_SIDE = _RANGE_FLOORS["object_size"]
#: under target_area, a distractor's side is the target's within this relative jitter
_SIZE_JITTER = 0.1

_PIXELS = {
    name: torch.tensor(rgb, dtype=torch.float32)[:, None, None]
    for name, rgb in (*COLOURS.items(), ("occluder", OCCLUDER))
}


def area_sides(area: tuple[float, float], image_size: int) -> tuple[int, int]:
    """The least and greatest whole-pixel side whose square covers a fraction of an
    ``image_size`` x ``image_size`` image within ``area`` (min > max when none does)."""
    pixels = image_size * image_size
    lo_pixels, hi_pixels = area[0] * pixels, area[1] * pixels
    lo = math.isqrt(math.ceil(lo_pixels))
    while lo * lo < lo_pixels:
        lo += 1
    return lo, math.isqrt(math.floor(hi_pixels))


@dataclass(frozen=True)
class _Draft:
    """A sample before rendering: its index, task, scene, placed objects, option order and
    grid."""

    index: int
    task: str
    scene: Scene
    objects: list[SceneObject]
    options: list[str]
    grid: Grid


class SyntheticShapesSplit(torch.utils.data.Dataset):
    """One split of :class:`SyntheticShapes`; samples are generated on access."""

    def __init__(self, config: SyntheticShapes.Config, name: str, length: int):
        self.config = config
        self.name = name
        self.length = length
        self._split_code = SPLITS.index(name)
        self._sides = config.object_sides()
        self._grid = Grid.fit(config.image_size, self._sides[1])

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Sample:
        draft, rng = self._draft(index)
        return self._sample(draft, rng)

    def counterfactual(self, index: int) -> Sample:
        """Sample ``index`` re-rendered with only its answer changed: the same question, options,
        objects and background, except that the target moves to another quadrant (position), one
        object of the asked colour is added or removed (count; an added one has an occluder of
        its own under ``occlusion``), or the referent takes another option's colour or shape
        (colour, shape). The change is seeded by the sample."""
        draft, rng = self._draft(index)
        edit = np.random.default_rng([self.config.seed, self._split_code, index, 1])
        objects, scene = _EDITS[draft.task](self, draft, edit)
        return self._sample(replace(draft, objects=objects, scene=scene), rng)

    def _draft(self, index: int) -> tuple[_Draft, np.random.Generator]:
        """Everything of sample ``index`` but its pixels, and the generator left where rendering
        the background starts."""
        if not 0 <= index < self.length:
            raise IndexError(f"{self.name} split index {index} out of range [0, {self.length})")
        config = self.config
        rng = np.random.default_rng([config.seed, self._split_code, index])
        task = config.tasks[rng.integers(len(config.tasks))]
        scene = SCENES[task](rng, config.num_distractors, config.distractors)
        if config.target_area is None:
            grid = self._grid
            objects = grid.place(scene.drawn, rng, self._sides)
        else:
            sides = self._scene_sides(scene, rng)
            grid = Grid.fit(config.image_size, int(sides.max()))
            objects = grid.place(scene.drawn, rng, sides)
        if task == "count" and config.occlusion > 0:
            objects = [self._occlude(o, grid, rng) for o in objects]
        order = rng.permutation(NUM_OPTIONS) if config.shuffle_options else range(NUM_OPTIONS)
        options = [scene.options[k] for k in order]
        return _Draft(index, task, scene, objects, options, grid), rng

    def _scene_sides(self, scene: Scene, rng: np.random.Generator) -> np.ndarray:
        """Sides under ``target_area``: the targets' area is drawn log-uniformly (then rounded to
        a whole-pixel side within the range); the distractors take the targets' side within
        +-10 %, so the area bucket describes the whole scene and size never marks the targets."""
        lo, hi = self._sides
        size = self.config.image_size
        area = math.exp(rng.uniform(*np.log(self.config.target_area)))
        side = min(max(round(math.sqrt(area) * size), lo), hi)
        jitter_lo = max(lo, round(side * (1 - _SIZE_JITTER)))
        jitter_hi = min(hi, round(side * (1 + _SIZE_JITTER)))
        sides = rng.integers(jitter_lo, jitter_hi + 1, size=len(scene.drawn))
        sides[scene.targets] = side
        return sides

    def _occlude(self, obj: SceneObject, grid: Grid, rng: np.random.Generator) -> SceneObject:
        return occlude(obj, grid.bounds(grid.cell_of(obj)), self.config.occlusion, rng)

    def _sample(self, draft: _Draft, rng: np.random.Generator) -> Sample:
        scene, objects, options = draft.scene, draft.objects, draft.options
        answer = scene.answer
        if answer is None:
            answer = quadrant(objects[scene.targets[0]].box, self.config.image_size)
        boxes = [objects[t].box for t in scene.targets]
        return Sample(
            index=draft.index,
            image=self._render(objects, rng),
            question=scene.question,
            options=options,
            answer=LETTERS[options.index(scene.options[answer])],
            category=draft.task,
            box=enclosing(boxes),
            boxes=boxes,
            meta={
                "split": self.name,
                "objects": [o.describe() for o in objects],
                "targets": scene.targets,
            },
        )

    def _render(self, objects: list[SceneObject], rng: np.random.Generator) -> torch.Tensor:
        """Paint the objects on the background, then their occluders, add per-pixel Gaussian
        noise, quantise to uint8."""
        size = self.config.image_size
        if self.config.background == "photo":
            image = photo_background(size, rng)
        else:
            image = torch.full((3, size, size), float(GREY))
        for obj in objects:
            x0, y0, x1, y1 = obj.box
            patch = image[:, y0:y1, x0:x1]
            patch[:] = torch.where(obj.mask, _PIXELS[obj.colour], patch)
        for obj in objects:
            if obj.occluder is not None:
                x0, y0, x1, y1 = obj.occluder
                image[:, y0:y1, x0:x1] = _PIXELS["occluder"]
        if self.config.background_noise > 0:
            noise = rng.standard_normal((3, size, size), dtype=np.float32)
            image.add_(torch.from_numpy(noise), alpha=255 * self.config.background_noise)
        # +0.5 then truncation rounds to nearest; on these images torch's round() was measured at
        # several milliseconds on CPU (torch 2.14), more than all the rest of a sample
        return image.add_(0.5).clamp_(0, 255).to(torch.uint8)


#: a counterfactual edit: (split, draft, the edit's generator) -> (objects, scene)
_Edit = Callable[
    [SyntheticShapesSplit, _Draft, np.random.Generator], tuple[list[SceneObject], Scene]
]


def _move_target(
    split: SyntheticShapesSplit, draft: _Draft, rng: np.random.Generator
) -> tuple[list[SceneObject], Scene]:
    """Position: the target to a free cell of another quadrant."""
    objects, grid, target = draft.objects, draft.grid, draft.scene.targets[0]
    here = quadrant(objects[target].box, split.config.image_size)
    half = grid.cells // 2
    cells = [(r, c) for r, c in grid.free_cells(objects) if 2 * (r >= half) + (c >= half) != here]
    if not cells:
        raise ValueError(
            f"{split.name} sample {draft.index} has no counterfactual: its {len(objects)} objects "
            "fill every grid cell outside the target's quadrant, so the target cannot move; "
            "reduce num_distractors"
        )
    moved = grid.put(objects[target], cells[rng.integers(len(cells))], rng)
    return [moved if i == target else o for i, o in enumerate(objects)], draft.scene


def _recount(
    split: SyntheticShapesSplit, draft: _Draft, rng: np.random.Generator
) -> tuple[list[SceneObject], Scene]:
    """Count: one more object of the asked colour (one fewer when there are already four)."""
    objects, scene, grid = draft.objects, draft.scene, draft.grid
    k = len(scene.targets)
    if k < NUM_OPTIONS:
        colour = objects[scene.targets[0]].colour
        free = grid.free_cells(objects)
        template = SceneObject(pick(SHAPES, rng), colour, objects[scene.targets[0]].box)
        added = grid.put(template, free[rng.integers(len(free))], rng)
        if split.config.occlusion > 0:
            added = split._occlude(added, grid, rng)
        objects = [*objects[:k], added, *objects[k:]]
        return objects, replace(scene, targets=list(range(k + 1)), answer=k)
    objects = objects[: k - 1] + objects[k:]
    return objects, replace(scene, targets=list(range(k - 1)), answer=k - 2)


def _reattribute(field: str) -> _Edit:
    """Colour / shape: the referent takes another option's ``field``."""

    def edit(
        split: SyntheticShapesSplit, draft: _Draft, rng: np.random.Generator
    ) -> tuple[list[SceneObject], Scene]:
        referent, scene = draft.objects[0], draft.scene
        others = [o for o in scene.options if o != getattr(referent, field)]
        value = others[rng.integers(len(others))]
        changed = replace(referent, **{field: value})
        return [changed, *draft.objects[1:]], replace(scene, answer=scene.options.index(value))

    return edit


_EDITS: dict[str, _Edit] = {
    "colour": _reattribute("colour"),
    "shape": _reattribute("shape"),
    "position": _move_target,
    "count": _recount,
}


@DATASETS.register("synthetic_shapes")
class SyntheticShapes:
    """Small coloured shapes among distractors; colour / shape / position / count questions.

    Every sample has four options (letters A-D). ``box`` is the asked-about object's box; for count
    questions it encloses all counted objects, and ``boxes`` lists them one by one. ``meta`` holds
    the scene: ``objects`` (shape, colour, box of every object, and the box of its ``occluder``
    bar if it has one) and ``targets`` (indices of the asked-about ones).
    """

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        image_size: int = Field(
            64, ge=16, le=4096, description="side of the square RGB image, in pixels"
        )
        object_size: tuple[int, int] | None = Field(
            (6, 10),
            description="min and max object side in pixels; each object's side is drawn uniformly "
            "in between (shapes are told apart from 6 px up); null when target_area sizes the "
            "objects",
        )
        target_area: tuple[float, float] | None = Field(
            None,
            description="min and max area of the question's targets as a fraction of the image "
            "(box area / image area), drawn log-uniformly per sample; the distractors take the "
            "targets' side within +-10 % (and within the range). Replaces object_size, which "
            "must then be null; null = sizes from object_size",
        )
        num_distractors: tuple[int, int] = Field(
            (3, 6),
            description="min and max number of distractor objects besides the question's targets "
            "(clutter); below 3, wrong options of colour/shape questions may be missing from the "
            "image, which makes those questions easier",
        )
        distractors: Distractors = Field(
            "different",
            description="how alike distractors are to the referent: different (any shape and "
            "colour); same_colour (position questions: every distractor but one in the target's "
            "colour, with another shape); detail (colour, shape and position questions: "
            "distractors whose shape differs from the referent's only by a detail: circle/ring, "
            "square/notched square, triangle/notched triangle)",
        )
        tasks: list[Task] = Field(
            default_factory=lambda: list(SCENES),
            description="question types, drawn uniformly per sample: colour (of a unique shape), "
            "shape (of a unique colour), position (quadrant of a unique colour+shape), "
            "count (objects of a colour, 1-4)",
        )
        train_size: int = Field(
            20000, ge=0, le=10_000_000, description="samples in the train split"
        )
        val_size: int = Field(512, ge=0, le=10_000_000, description="samples in the val split")
        test_size: int = Field(1024, ge=0, le=10_000_000, description="samples in the test split")
        background: Literal["noise", "photo"] = Field(
            "noise",
            description="noise: mid-grey; photo: a random crop of one of scikit-learn's two "
            "sample photographs, at a quarter of its contrast around mid-grey so that objects "
            "stay the nearest colour to themselves (background_noise is added to either)",
        )
        background_noise: float = Field(
            0.08,
            ge=0,
            le=1,
            description="std of the per-pixel Gaussian noise added to the whole image, "
            "as a fraction of full intensity (0 = clean)",
        )
        occlusion: float = Field(
            0.0,
            ge=0,
            le=0.75,
            description="count questions: every object (counted or not) lies partly behind a "
            "near-black bar that hides at most this fraction of its pixels (at least 1 - "
            "occlusion stays visible); 0 = no bars",
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
        def _check_range(
            cls, value: tuple[int, int] | None, info: ValidationInfo
        ) -> tuple[int, int] | None:
            if value is None:
                return value
            lo, hi = value
            floor = _RANGE_FLOORS[info.field_name]
            if lo < floor or lo > hi:
                raise ValueError(
                    f"{info.field_name} must be (min, max) with {floor} <= min <= max, got {value}"
                )
            return value

        @field_validator("target_area")
        @classmethod
        def _check_area(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
            if value is not None and not 0 < value[0] <= value[1] < 1:
                raise ValueError(
                    f"target_area must be (min, max) fractions of the image area with "
                    f"0 < min <= max < 1, got {value}"
                )
            return value

        @field_validator("tasks")
        @classmethod
        def _check_tasks(cls, value: list[Task]) -> list[Task]:
            if not value or len(set(value)) != len(value):
                raise ValueError(f"tasks must be a non-empty list without repeats, got {value}")
            return value

        def object_sides(self) -> tuple[int, int]:
            """The least and greatest object side in pixels, whichever key sizes the objects."""
            if self.object_size is not None:
                return self.object_size
            assert self.target_area is not None  # the validator requires one of them
            return area_sides(self.target_area, self.image_size)

        @model_validator(mode="after")
        def _check_scene_fits(self) -> SyntheticShapes.Config:
            self._check_sizing()
            key = "object_size" if self.target_area is None else "target_area"
            value = getattr(self, key)
            lo, hi = self.object_sides()
            cells = grid_cells(self.image_size, hi)
            if cells < 2:
                raise ValueError(
                    f"image_size {self.image_size} is too small for objects of {hi} px ({key} "
                    f"{value}); need image_size >= {min_image_size(hi)}"
                )
            targets = NUM_OPTIONS if "count" in self.tasks else 1
            needed = self.num_distractors[1] + targets
            if needed > cells * cells:
                raise ValueError(
                    f"image_size {self.image_size} with objects up to {hi} px ({key} {value}) "
                    f"holds at most {cells * cells} objects ({cells}x{cells} grid), but a scene "
                    f"may need {needed} ({self.num_distractors[1]} distractors + {targets} "
                    f"targets); enlarge image_size, shrink {key} or reduce num_distractors"
                )
            self._check_dials_apply()
            if _SHAPE_TASKS.intersection(self.tasks):
                shapes = ALL_SHAPES if self.distractors == "detail" else SHAPES
                for side in range(lo, hi + 1):
                    pair = ambiguous_shapes(side, shapes)
                    if pair is not None:
                        raise ValueError(
                            f"{key} {value}: a {pair[0]} and a {pair[1]} look identical at "
                            f"{side} px, so colour/shape/position questions would be ambiguous; "
                            f"raise {key} or use tasks ['count']"
                        )
            return self

        def _check_sizing(self) -> None:
            """Exactly one of object_size and target_area sizes the objects, at least 3 px."""
            if self.object_size is None and self.target_area is None:
                raise ValueError(
                    "object_size is null but target_area is not set: one of them must size the "
                    "objects (e.g. object_size: [6, 10])"
                )
            if self.object_size is not None and self.target_area is not None:
                raise ValueError(
                    f"target_area {self.target_area} sizes every object relative to the image, "
                    f"so object_size must be null (it is {self.object_size}); set object_size: "
                    "null"
                )
            if self.target_area is None:
                return
            lo, hi = area_sides(self.target_area, self.image_size)
            if lo > hi:
                raise ValueError(
                    f"target_area {self.target_area} holds no whole-pixel side on a "
                    f"{self.image_size} px image (a side of {hi} px is below it, {lo} px above "
                    "it); widen the range or change image_size"
                )
            if lo < _MIN_SIDE:
                least = _MIN_SIDE**2 / self.image_size**2
                raise ValueError(
                    f"target_area {self.target_area} allows sides of {lo} px on a "
                    f"{self.image_size} px image, below the least {_MIN_SIDE} px; raise its min "
                    f"to at least {least:.3g}"
                )

        def _check_dials_apply(self) -> None:
            """A dial that changes none of the configured tasks is a mistake, not a no-op; photo
            backgrounds need their files."""
            changed = DISTRACTOR_TASKS[self.distractors]
            if not changed.intersection(self.tasks):
                raise ValueError(
                    f"distractors {self.distractors!r} changes {'/'.join(sorted(changed))} "
                    f"questions only, and tasks {self.tasks} has none"
                )
            if self.background == "photo":
                photo_files()  # missing photos: an error when the recipe loads, not mid-run
            if self.occlusion > 0 and "count" not in self.tasks:
                raise ValueError(
                    f"occlusion {self.occlusion} hides parts of the objects of count questions "
                    f"only, and tasks {self.tasks} has none; add 'count' or set occlusion: 0"
                )

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

    @property
    def object_attributes(self) -> dict[str, tuple[str, ...]]:
        """The values each attribute of ``meta["objects"]`` may take (what ``method: perceive``
        classifies): every colour and every shape, the detail shapes included, whatever the
        config draws, so heads trained on one config fit another."""
        return {"colour": COLOUR_NAMES, "shape": ALL_SHAPES}

    def corpus(self) -> list[str]:
        """Every word of any question, option or answer letter, sorted.

        It covers all tasks whatever ``tasks`` selects, so a tokenizer built from it stays valid
        when a model trained on some tasks is evaluated on others; ``distractors: detail`` adds
        the detail shapes' words.
        """
        return sorted(corpus_words(self.config.distractors) | set(LETTERS[:NUM_OPTIONS]))
