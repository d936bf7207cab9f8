"""The prompt template: question and options, then (after the latent block) the answer cue.

    <bos> <image>*N  question options : A opt B opt ...  [latent block]  answer : TARGET <eos>

The cue ``answer :`` comes *after* the latent block, so every answer token is predicted from a
position of its own path (in the packed sequence the latent block's last position is shared by
both paths and could not tell them apart).

A latent template (``latents.template``) wraps the block: its opening text ends the question, its
closing text starts the answer, before the cue::

    ... question options ...  OPEN [latent block] CLOSE  answer : TARGET <eos>
"""

from __future__ import annotations

from collections.abc import Sequence

from crystalkit.data.sample import LETTERS

IGNORE_INDEX = -100
ANSWER_CUE = "answer :"


def format_question(question: str, options: Sequence[str]) -> str:
    """``question options : A opt B opt ...`` — the text the image is read against; an open-ended
    question (no options) is the question alone."""
    if not options:
        return question
    listed = " ".join(f"{LETTERS[i]} {option}" for i, option in enumerate(options))
    return f"{question} options : {listed}"


def template_text(*latent_template: str) -> str:
    """Every word the template itself adds (for building a vocabulary next to a dataset's), with
    the text of a latent template (``latents.template``: its open and close text) if given."""
    base = f"{format_question('', [''] * len(LETTERS))} {ANSWER_CUE}"
    return " ".join([base, *(text for text in latent_template if text)])
