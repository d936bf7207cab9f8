"""Batches laid out by segment: every segment of the packed sequence is one column range.

Each segment is padded to its widest sample (image + question on the left, answers on the right),
so a batch row reads ``A | B | C | D | E | D' | F`` with padding inside segments only. A path is
then a concatenation of column ranges — the intact path ``A C D E`` and the corrupted path
``A B D F`` are plain slices, the latent block sits at the same columns in every row, and the
packed and two-pass strategies cut the very same tensors. Masks and positions skip the padding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch

from crystalkit.crystal.packing import ORDER, Segment
from crystalkit.data.prompt import ANSWER_CUE, IGNORE_INDEX, format_question
from crystalkit.data.sample import Sample
from crystalkit.models.backbone import Backbone

S = Segment


@dataclass
class Layout:
    """``input_ids``, ``segments`` and ``labels`` (the target token at its own column) are
    ``[B, T]``; ``regions`` maps each present segment to its columns. ``recurrent`` marks latent
    blocks whose slots are filled with hidden states. ``pixel_values`` are the intact images and
    ``corrupted_pixels`` their corrupted versions (present when the corrupted path is);
    ``detach_corrupted_image`` stops the gradient at the corrupted image's features."""

    input_ids: torch.Tensor
    segments: torch.Tensor
    labels: torch.Tensor
    regions: dict[Segment, range]
    recurrent: bool
    pixel_values: torch.Tensor
    corrupted_pixels: torch.Tensor | None = None
    detach_corrupted_image: bool = False

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Layout:
        corrupted = self.corrupted_pixels
        return replace(
            self,
            input_ids=fn(self.input_ids),
            segments=fn(self.segments),
            labels=fn(self.labels),
            pixel_values=fn(self.pixel_values),
            corrupted_pixels=None if corrupted is None else fn(corrupted),
        )

    def to(self, device: torch.device | str) -> Layout:
        return self._map(lambda t: t.to(device))

    def rows(self, index: slice) -> Layout:
        """Some rows of the batch; columns (so every row's computation) are unchanged."""
        return self._map(lambda t: t[index])

    def has(self, segment: Segment) -> bool:
        return segment in self.regions and len(self.regions[segment]) > 0

    def select(self, segments: Sequence[Segment]) -> tuple[Layout, torch.Tensor]:
        """The sub-sequence made of ``segments`` (in packed order) and the packed columns it was
        cut from."""
        picked: list[int] = []
        regions: dict[Segment, range] = {}
        for s in ORDER:
            if s in segments and s in self.regions:
                regions[s] = range(len(picked), len(picked) + len(self.regions[s]))
                picked.extend(self.regions[s])
        cols = torch.tensor(picked, dtype=torch.long, device=self.input_ids.device)
        sub = replace(
            self,
            input_ids=self.input_ids[:, cols],
            segments=self.segments[:, cols],
            labels=self.labels[:, cols],
            regions=regions,
        )
        return sub, cols

    def image_pixels(self) -> torch.Tensor | None:
        """Pixel values in the order the image placeholders appear in a row: with both image
        segments, each sample's corrupted image (B) comes before its intact one (C)."""
        if self.has(S.CORRUPTED) and self.corrupted_pixels is not None:
            pair = torch.stack([self.corrupted_pixels, self.pixel_values], dim=1)
            return pair.flatten(0, 1)
        return self.pixel_values

    def slot_ranges(self) -> list[range]:
        """Columns of recurrent latent slots (inside each latent block, markers excluded)."""
        if not self.recurrent:
            return []
        return [
            range(r.start + 1, r.stop - 1)
            for s in (S.LATENT, S.LATENT_BLANK)
            if self.has(s) and len(r := self.regions[s]) > 2
        ]

    def answer_queries(self, segment: Segment) -> range:
        """Columns whose next-token logits predict the answer tokens of ``segment`` (E or F):
        all but its last column. Its first token is the answer cue, never a target."""
        r = self.regions[segment]
        return range(r.start, r.stop - 1)

    def answer_targets(self) -> torch.Tensor:
        """``[B, |E| - 1]`` targets predicted from :meth:`answer_queries` (IGNORE elsewhere)."""
        r = self.regions[S.ANSWER_INTACT]
        return self.labels[:, r.start + 1 : r.stop]


class Packer:
    """Lays out samples for one backbone (``answer``: train on the option letter or its text)."""

    def __init__(self, backbone: Backbone, answer: Literal["letter", "text"] = "letter"):
        self.backbone = backbone
        self.answer = answer
        tok = backbone.tokenizer
        self._eos, self._pad = tok.eos_token_id, tok.pad_token_id
        self._prefix = self._encode(backbone.prompt_prefix)
        self._suffix = self._encode(backbone.question_suffix)
        self._image = backbone.image_prompt_ids()
        self._cue = self._encode(ANSWER_CUE)

    def _encode(self, text: str) -> list[int]:
        return self.backbone.tokenizer.encode(text, add_special_tokens=False)

    def __call__(
        self,
        samples: Sequence[Sample],
        block: Sequence[int] = (),
        *,
        corrupted_images: torch.Tensor | None = None,
        blank_latents: bool = False,
        with_answer: bool = True,
        recurrent: bool = False,
    ) -> Layout:
        """Lay out ``samples`` with latent ``block`` ids. ``corrupted_images`` (float ``[B, 3, H,
        W]`` in [0, 1]) adds the corrupted path (B, F); ``blank_latents`` adds D' (no_copy).
        ``with_answer=False`` ends every row at the answer cue (generation prompts)."""
        two_paths = corrupted_images is not None
        questions = [
            self._image + self._encode(format_question(s.question, s.options)) + self._suffix
            for s in samples
        ]
        answers: list[tuple[list[int], list[int]]] = []
        for s in samples:
            if with_answer:
                target = s.answer if self.answer == "letter" else s.answer_text
                ids = [*self._encode(target), self._eos]
                answers.append((self._cue + ids, [IGNORE_INDEX] * len(self._cue) + ids))
            else:
                answers.append((list(self._cue), [IGNORE_INDEX] * len(self._cue)))
        pieces: dict[Segment, tuple[list[list[int]], list[list[int]] | None, str]] = {
            S.PREFIX: ([self._prefix] * len(samples), None, "left"),
            S.INTACT: (questions, None, "left"),
            S.LATENT: ([list(block)] * len(samples), None, "left"),
            S.ANSWER_INTACT: ([a for a, _ in answers], [lab for _, lab in answers], "right"),
        }
        if two_paths:
            pieces[S.CORRUPTED] = pieces[S.INTACT]
            pieces[S.ANSWER_CORRUPTED] = pieces[S.ANSWER_INTACT]
            if blank_latents:
                pieces[S.LATENT_BLANK] = pieces[S.LATENT]
        ids_parts, seg_parts, lab_parts, regions, start = [], [], [], {}, 0
        for segment in ORDER:
            if segment not in pieces:
                continue
            rows, labels, side = pieces[segment]
            width = max(len(r) for r in rows)
            ids = torch.full((len(samples), width), self._pad, dtype=torch.long)
            seg = torch.zeros_like(ids)
            lab = torch.full_like(ids, IGNORE_INDEX)
            for i, row in enumerate(rows):
                cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
                ids[i, cols] = torch.tensor(row, dtype=torch.long)
                seg[i, cols] = int(segment)
                if labels is not None:
                    lab[i, cols] = torch.tensor(labels[i], dtype=torch.long)
            ids_parts.append(ids)
            seg_parts.append(seg)
            lab_parts.append(lab)
            regions[segment] = range(start, start + width)
            start += width
        images = torch.stack([s.image for s in samples])
        preprocess = self.backbone.preprocess_images
        return Layout(
            input_ids=torch.cat(ids_parts, 1),
            segments=torch.cat(seg_parts, 1),
            labels=torch.cat(lab_parts, 1),
            regions=regions,
            recurrent=recurrent and len(block) > 0,
            pixel_values=preprocess(images.float() / 255.0),
            corrupted_pixels=preprocess(corrupted_images) if two_paths else None,
        )
