"""The one sample type every dataset and benchmark format produces."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from crystalkit.data.boxes import Box

LETTERS = "ABCDEFGH"


class OptionKeyError(ValueError):
    """Options given as a mapping whose keys are not the letters A, B, ...: how the file writes its
    options is misread, which no row of it escapes (unlike one row's bad value)."""


def ordered_options(options: object) -> object:
    """Options as benchmark files write them, in letter order: a list stays as it is; a mapping
    keyed by the letters ``A`` to ``H`` in any order (``{"B": "blue", "A": "red"}``) becomes the
    list of its values from ``A`` on. Any other value is returned unchanged for the caller to
    check; a mapping with another key, or a letter gap, raises :class:`OptionKeyError`."""
    if not isinstance(options, dict):
        return options
    for key in options:
        if not (isinstance(key, str) and len(key) == 1 and key in LETTERS):
            raise OptionKeyError(
                f"'options' key {key!r} is not an option letter (expected keys A to "
                f'{LETTERS[-1]}, e.g. {{"A": "red", "B": "blue"}}, or a list of options)'
            )
    expected = LETTERS[: len(options)]
    missing = [letter for letter in expected if letter not in options]
    if missing:
        raise OptionKeyError(
            f"'options' keys {', '.join(sorted(options))} skip {missing[0]} (expected "
            "consecutive letters from A)"
        )
    return [options[letter] for letter in expected]


@dataclass
class Sample:
    """A visual question, multiple choice or open-ended.

    ``image`` is ``uint8`` ``[3, H, W]``; ``answer`` is the letter of the correct option, or, for an
    open-ended question (no ``options``, e.g. conversation data whose options, if any, are part of
    the question text), the answer text itself;
    ``box`` (``x0, y0, x1, y1`` in pixels, exclusive ends) marks the object the question is about,
    kept for grounding analysis of the latents' attention; ``boxes`` lists the evidence one by one
    (every object the answer depends on: the referent, or each counted object), so that a
    corruption can remove exactly it and evaluation can bucket items by how small it is.
    """

    index: int
    image: torch.Tensor
    question: str
    options: list[str]
    answer: str
    category: str = ""
    box: Box | None = None
    meta: dict = field(default_factory=dict)
    boxes: list[Box] = field(default_factory=list)

    @property
    def evidence(self) -> list[Box]:
        """The evidence boxes: ``boxes``, else ``[box]`` when only the enclosing box is known."""
        if self.boxes:
            return list(self.boxes)
        return [self.box] if self.box is not None else []

    @property
    def answer_text(self) -> str:
        return self.options[LETTERS.index(self.answer)] if self.options else self.answer
