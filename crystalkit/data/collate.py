"""Turn samples into model batches: prompt template, image placeholders, answer labels.

Sequences are left-padded so that training, teacher-forced evaluation and batched greedy decoding
all share one layout (the answer always ends at the right edge); positions skip the padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Literal

import torch

from crystalkit.data.sample import LETTERS, Sample
from crystalkit.models.backbone import Backbone

IGNORE_INDEX = -100


def format_prompt(question: str, options: Sequence[str]) -> str:
    """``question options : A opt B opt ... answer :`` — the text the model conditions on."""
    listed = " ".join(f"{LETTERS[i]} {option}" for i, option in enumerate(options))
    return f"{question} options : {listed} answer :"


def template_text() -> str:
    """Every word the template itself adds (for building a vocabulary next to a dataset's)."""
    return format_prompt("", [""] * len(LETTERS))


@dataclass
class Batch:
    """``input_ids``/``attention_mask``/``labels`` are ``[B, T]``; ``labels`` hold the target
    token at its own position (shifted inside the loss) and ``IGNORE_INDEX`` elsewhere."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor
    images: torch.Tensor  # uint8 originals, for corruptions applied on the fly

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __len__(self) -> int:
        return self.input_ids.shape[0]


class Collator:
    """Builds :class:`Batch` es for one backbone; ``with_answer=False`` gives generation prompts.
    ``answer`` chooses the target text: the option ``letter`` or the option's ``text``."""

    def __init__(
        self,
        backbone: Backbone,
        with_answer: bool = True,
        answer: Literal["letter", "text"] = "letter",
    ):
        self.backbone = backbone
        self.with_answer = with_answer
        self.answer = answer
        tok = backbone.tokenizer
        self._prefix = [tok.bos_token_id] + [backbone.image_token_id] * backbone.num_image_tokens
        self._eos = tok.eos_token_id
        self._pad = tok.pad_token_id

    def encode(self, sample: Sample) -> tuple[list[int], list[int]]:
        """Token ids and labels of one sample."""
        encode = self.backbone.tokenizer.encode
        prompt = self._prefix + encode(
            format_prompt(sample.question, sample.options), add_special_tokens=False
        )
        if not self.with_answer:
            return prompt, [IGNORE_INDEX] * len(prompt)
        target = sample.answer if self.answer == "letter" else sample.answer_text
        answer = [*encode(target, add_special_tokens=False), self._eos]
        return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer

    def __call__(self, samples: Sequence[Sample]) -> Batch:
        encoded = [self.encode(s) for s in samples]
        width = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(samples), width), self._pad, dtype=torch.long)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        attention_mask = torch.zeros_like(input_ids)
        for row, (ids, labs) in enumerate(encoded):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            labels[row, width - len(labs) :] = torch.tensor(labs)
            attention_mask[row, width - len(ids) :] = 1
        images = torch.stack([s.image for s in samples])
        return Batch(
            input_ids, attention_mask, labels, self.backbone.preprocess_images(images), images
        )
