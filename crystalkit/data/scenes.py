"""What the synthetic benchmark draws and asks, before anything is placed: one scene per task.

Scenes close the shortcuts that let a model answer without looking closely:

* the referent is always unique ("the triangle" only when exactly one triangle exists);
* the wrong options of colour / shape questions are drawn uniformly and also *appear in the image*
  on distractors, so "which option colour is present?" does not work and, for text alone, every
  option is equally likely to be right;
* answers are uniform over the options and independent of the question text;
* position targets share their colour with one distractor and their shape with another, so the
  model has to bind colour and shape at the target.

How alike the distractors are to the referent is a dial (:data:`Distractors`): ``different``
draws them freely; ``same_colour`` gives position questions distractors in the target's colour
(the other tasks' referents are named by their colour or asked for it, so it leaves them alone);
``detail`` gives colour, shape and position questions distractors whose shape differs from the
referent's only by a detail (:data:`~crystalkit.data.shapes.DETAIL_PAIRS`). Counting goes by
colour, so neither changes count questions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from crystalkit.data.shapes import ALL_SHAPES, DETAIL_PAIRS, DETAIL_SHAPES, SHAPES, partner

Task = Literal["colour", "shape", "position", "count"]
Distractors = Literal["different", "same_colour", "detail"]

NUM_OPTIONS = 4
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 90, 235),
    "yellow": (240, 220, 40),
    "purple": (170, 50, 220),
    "white": (245, 245, 245),
}
COLOUR_NAMES = tuple(COLOURS)
QUADRANTS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
COUNTS: tuple[str, ...] = tuple(str(k) for k in range(1, NUM_OPTIONS + 1))
TEMPLATES = {
    "colour": "what colour is the {shape} ?",
    "shape": "what shape is the {colour} object ?",
    "position": "where is the {colour} {shape} ?",
    "count": "how many {colour} objects are there ?",
}
#: the tasks each distractor setting changes
DISTRACTOR_TASKS: dict[str, frozenset[str]] = {
    "different": frozenset(TEMPLATES),
    "same_colour": frozenset({"position"}),
    "detail": frozenset({"colour", "shape", "position"}),
}


@dataclass(frozen=True)
class Scene:
    """What to draw and what to ask, before placement.

    ``drawn`` holds ``(shape, colour)`` pairs, targets first; ``answer`` indexes the canonical
    ``options``, or is ``None`` when it is the first target's quadrant (known after placement).
    """

    drawn: list[tuple[str, str]]
    targets: list[int]
    question: str
    options: tuple[str, ...]
    answer: int | None


#: builds a task's scene from the sample's generator, the (min, max) number of distractors and
#: the distractor setting
SceneBuilder = Callable[[np.random.Generator, tuple[int, int], Distractors], Scene]


def pick(names: tuple[str, ...], rng: np.random.Generator, exclude: str | None = None) -> str:
    candidates = [n for n in names if n != exclude]
    return candidates[rng.integers(len(candidates))]


def _num_distractors(clutter: tuple[int, int], rng: np.random.Generator) -> int:
    lo, hi = clutter
    return int(rng.integers(lo, hi + 1))


def _uniform_foils(asked: tuple[str, ...], answer: str, rng: np.random.Generator) -> list[str]:
    rest = [a for a in asked if a != answer]
    return [rest[k] for k in rng.choice(len(rest), NUM_OPTIONS - 1, replace=False)]


def _pair_foils(asked: tuple[str, ...], answer: str, rng: np.random.Generator) -> list[str]:
    """The answer's detail partner, then both shapes of another detail pair in random order: the
    options are two whole pairs, so the option set says nothing about which one is right."""
    others = [pair for pair in DETAIL_PAIRS if answer not in pair]
    second = others[rng.integers(len(others))]
    return [partner(answer), *(second[k] for k in rng.permutation(2))]


def _attribute_scene(
    rng: np.random.Generator,
    clutter: tuple[int, int],
    asked: tuple[str, ...],
    other: tuple[str, ...],
    foils_of: Callable[[tuple[str, ...], str, np.random.Generator], list[str]] = _uniform_foils,
    detail: bool = False,
) -> tuple[list[tuple[str, str]], tuple[str, ...], int, str]:
    """A referent unique by its ``other`` attribute whose ``asked`` attribute is the answer.

    The answer and the three wrong options (``foils_of``) are drawn uniformly, so the option set
    says nothing about which option is right; each wrong option is also shown on a distractor
    (while there are distractors), so the image contains every option and only the referent tells
    them apart. The distractors' ``other`` attribute is any other value, or with ``detail`` the
    referent's detail partner. Returns ``(asked, other)`` pairs (referent first), canonical
    options, answer index, referent.
    """
    answer = pick(asked, rng)
    referent = pick(other, rng)
    foils = foils_of(asked, answer, rng)
    n = _num_distractors(clutter, rng)
    values = foils[:n] + [pick(asked, rng) for _ in range(n - len(foils))]
    unlike = [partner(referent)] * n if detail else [pick(other, rng, referent) for _ in values]
    pairs = [(answer, referent), *zip(values, unlike, strict=True)]
    canonical = tuple(a for a in asked if a == answer or a in foils)
    return pairs, canonical, canonical.index(answer), referent


def colour_scene(
    rng: np.random.Generator, clutter: tuple[int, int], distractors: Distractors
) -> Scene:
    """'what colour is the triangle ?' with exactly one triangle."""
    detail = distractors == "detail"
    shapes = DETAIL_SHAPES if detail else SHAPES
    pairs, options, answer, shape = _attribute_scene(
        rng, clutter, COLOUR_NAMES, shapes, detail=detail
    )
    drawn = [(s, c) for c, s in pairs]
    return Scene(drawn, [0], TEMPLATES["colour"].format(shape=shape), options, answer)


def shape_scene(
    rng: np.random.Generator, clutter: tuple[int, int], distractors: Distractors
) -> Scene:
    """'what shape is the red object ?' with exactly one red object."""
    if distractors == "detail":
        drawn, options, answer, colour = _attribute_scene(
            rng, clutter, DETAIL_SHAPES, COLOUR_NAMES, _pair_foils
        )
    else:
        drawn, options, answer, colour = _attribute_scene(rng, clutter, SHAPES, COLOUR_NAMES)
    return Scene(drawn, [0], TEMPLATES["shape"].format(colour=colour), options, answer)


def position_scene(
    rng: np.random.Generator, clutter: tuple[int, int], distractors: Distractors
) -> Scene:
    """'where is the red triangle ?': one distractor shares its colour, another its shape; the
    rest are any other (shape, colour), or in the target's colour (``same_colour``), or the
    target's detail partner (``detail``)."""
    shapes = DETAIL_SHAPES if distractors == "detail" else SHAPES
    shape, colour = pick(shapes, rng), pick(COLOUR_NAMES, rng)
    others = [(s, c) for s in SHAPES for c in COLOUR_NAMES if (s, c) != (shape, colour)]
    drawn = [(shape, colour)]
    for j in range(_num_distractors(clutter, rng)):
        if j == 1:
            drawn.append((shape, pick(COLOUR_NAMES, rng, colour)))
        elif distractors == "detail":
            drawn.append((partner(shape), colour if j == 0 else pick(COLOUR_NAMES, rng)))
        elif j == 0 or distractors == "same_colour":
            drawn.append((pick(SHAPES, rng, shape), colour))
        else:
            drawn.append(others[rng.integers(len(others))])
    question = TEMPLATES["position"].format(colour=colour, shape=shape)
    return Scene(drawn, [0], question, QUADRANTS, None)


def count_scene(rng: np.random.Generator, clutter: tuple[int, int], _: Distractors) -> Scene:
    """'how many red objects are there ?': 1-4 of them (uniform), distractors in other colours."""
    colour = pick(COLOUR_NAMES, rng)
    k = int(rng.integers(1, NUM_OPTIONS + 1))
    drawn = [(pick(SHAPES, rng), colour) for _ in range(k)]
    n = _num_distractors(clutter, rng)
    drawn += [(pick(SHAPES, rng), pick(COLOUR_NAMES, rng, colour)) for _ in range(n)]
    return Scene(drawn, list(range(k)), TEMPLATES["count"].format(colour=colour), COUNTS, k - 1)


SCENES: dict[str, SceneBuilder] = {
    "colour": colour_scene,
    "shape": shape_scene,
    "position": position_scene,
    "count": count_scene,
}


def corpus_words(distractors: Distractors) -> set[str]:
    """Every word of any question or option the scenes can ask with ``distractors``: all tasks
    whatever the task mix, so that one tokenizer serves every mix."""
    shapes = ALL_SHAPES if distractors == "detail" else SHAPES
    texts = [*TEMPLATES.values(), *COLOUR_NAMES, *shapes, *QUADRANTS, *COUNTS]
    return {w for text in texts for w in text.split() if not w.startswith("{")}
