"""Prompts from a checkpoint's own chat template.

The template is rendered once for a user turn holding an image and a sentinel question, with the
generation prompt, and the text is cut around the family's image markup and the sentinel::

    PREFIX  <image markup>  BETWEEN  question  SUFFIX (end of the user turn + generation prompt)

crystalkit lays out ``PREFIX``, its own image tokens (``image_prompt_ids``: the markup expanded the
way the family's processor expands it), ``BETWEEN``, the question and ``SUFFIX``; the latent block,
the answer cue and the answer follow in the assistant turn. A system turn appears only where the
template inserts one by itself (Qwen2-VL / Qwen2.5-VL); crystalkit adds none.

The offline test tokenizers carry the real template of their family, copied into
``chat_templates/FAMILY.jinja`` (each file names its source).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crystalkit.errors import UsageError, first_line

TEMPLATES = Path(__file__).with_name("chat_templates")
#: stands in for the question while the template is rendered
QUESTION = "crystalkit question 7f3a"
HINT = "set backbone.prompt: plain for the family's fixed prompt"


@dataclass(frozen=True)
class PromptParts:
    """The text around one image and its question: ``prefix`` opens the prompt, ``between`` sits
    between the image and the question, ``suffix`` ends the user turn and opens the answer;
    ``bos`` is the bos token the family's processor adds when it encodes the prompt (the rendered
    text holds none), else empty."""

    prefix: str
    between: str
    suffix: str
    bos: str = ""


def packaged_template(family: str) -> str:
    """The chat template shipped for ``family`` (``chat_templates/FAMILY.jinja``)."""
    return (TEMPLATES / f"{family}.jinja").read_text(encoding="utf-8")


def user_turn(question: str) -> list[dict[str, Any]]:
    """One user message: an image, then ``question``."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def split_chat_template(tokenizer: Any, image_markup: str, source: str) -> PromptParts:
    """Cut ``tokenizer``'s chat template around ``image_markup`` (the text its template writes for
    one image) and the question. ``source`` names the checkpoint in errors. Raises
    :class:`UsageError` when the template is missing or cannot be cut unambiguously."""
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"backbone.prompt: {source} has no chat template; {HINT}")
    try:
        text = tokenizer.apply_chat_template(
            user_turn(QUESTION), add_generation_prompt=True, tokenize=False
        )
    except Exception as exc:  # jinja raises many types; the template is the user's input
        reason = first_line(exc) or type(exc).__name__
        raise UsageError(
            f"backbone.prompt: the chat template of {source} does not render an image and a "
            f"question ({reason}); {HINT}"
        ) from None
    images, questions = text.count(image_markup), text.count(QUESTION)
    if images != 1 or questions != 1:
        raise UsageError(
            f"backbone.prompt: cannot split the chat template of {source}: a user turn with one "
            f"image and one question renders the image markup {image_markup!r} {images} times and "
            f"the question {questions} times (expected once each); {HINT}"
        )
    at_image, at_question = text.index(image_markup), text.index(QUESTION)
    if at_question < at_image:
        raise UsageError(
            f"backbone.prompt: the chat template of {source} puts the question before the image; "
            f"{HINT}"
        )
    return PromptParts(
        prefix=text[:at_image],
        between=text[at_image + len(image_markup) : at_question],
        suffix=text[at_question + len(QUESTION) :],
    )


def leading_bos(tokenizer: Any, prefix: str) -> str:
    """The bos token when the family's processor would add it: the tokenizer adds it on encode
    and the rendered prompt does not start with it (LLaVA's template writes none; Idefics3's
    writes its own)."""
    bos = tokenizer.bos_token
    if not bos or prefix.startswith(bos):
        return ""
    added = tokenizer.encode("a", add_special_tokens=True)
    plain = tokenizer.encode("a", add_special_tokens=False)
    adds_bos = added[:1] == [tokenizer.bos_token_id] and plain[:1] != [tokenizer.bos_token_id]
    return bos if adds_bos else ""


def checkpoint_chat_template(source: str) -> str | None:
    """The processor's chat template of checkpoint ``source`` (``chat_template.jinja``, or the
    legacy ``chat_template.json`` / ``processor_config.json`` key), or ``None``. VLM checkpoints
    keep their multimodal template there; the tokenizer's own may be a text-only one."""
    from transformers.utils import cached_file

    for name in ("chat_template.jinja", "chat_template.json", "processor_config.json"):
        try:
            path = cached_file(
                source,
                name,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
            )
        except (OSError, ValueError):
            return None
        if path is None:
            continue
        text = Path(path).read_text(encoding="utf-8")
        if name.endswith(".jinja"):
            return text
        template = json.loads(text).get("chat_template")
        if isinstance(template, str) and template:
            return template
    return None
