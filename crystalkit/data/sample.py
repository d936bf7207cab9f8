"""The one sample type every dataset and benchmark format produces."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

LETTERS = "ABCDEFGH"


@dataclass
class Sample:
    """A visual question, multiple choice or open-ended.

    ``image`` is ``uint8`` ``[3, H, W]``; ``answer`` is the letter of the correct option, or, for an
    open-ended question (no ``options``, e.g. conversation data whose options, if any, are part of
    the question text), the answer text itself;
    ``box`` (``x0, y0, x1, y1`` in pixels, exclusive ends) marks the object the question is about,
    kept for grounding analysis of the latents' attention.
    """

    index: int
    image: torch.Tensor
    question: str
    options: list[str]
    answer: str
    category: str = ""
    box: tuple[int, int, int, int] | None = None
    meta: dict = field(default_factory=dict)

    @property
    def answer_text(self) -> str:
        return self.options[LETTERS.index(self.answer)] if self.options else self.answer
