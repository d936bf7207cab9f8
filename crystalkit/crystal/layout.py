"""Batches laid out by segment: every segment of the packed sequence is one column range.

Each segment is padded to its widest sample (image + question on the left, answers on the right),
so a batch row reads ``A | B | C | D | E | D' | F`` with padding inside segments only. A path is
then a concatenation of column ranges — the intact path ``A C D E`` and the corrupted path
``A B D F`` are plain slices, the latent block sits at the same columns in every row, and the
packed and two-pass strategies cut the very same tensors. Masks and positions skip the padding.

A latent template (``latents.template``) keeps D exactly the latent block: its opening text ends
the question segments B and C, its closing text starts the answer segments E and F (before the
answer cue), the same text on both paths. With ``latents.write`` the template is labelled too —
the opening text, every token of D, the closing text and the cue — so the model learns to write
its own block (see :meth:`Layout.written_pairs` for which column predicts what).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch

from crystalkit.crystal.packing import BLANK_PATH, CORRUPTED_PATH, INTACT_PATH, ORDER, Segment
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
    ``detach_corrupted_image`` stops the gradient at the corrupted image's features. ``written``
    (``[B, T]`` bool, with ``latents.write``) marks the labels of the latent template the model
    writes (opening text, latent block, closing text, answer cue) apart from the answer's;
    ``cell_labels`` (``[B, A, cells]``, ``method: perceive``) each image cell's class per
    attribute."""

    input_ids: torch.Tensor
    segments: torch.Tensor
    labels: torch.Tensor
    regions: dict[Segment, range]
    recurrent: bool
    pixel_values: torch.Tensor
    corrupted_pixels: torch.Tensor | None = None
    detach_corrupted_image: bool = False
    written: torch.Tensor | None = None
    image_grid: torch.Tensor | None = None
    cell_labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Layout:
        corrupted, written, grid = self.corrupted_pixels, self.written, self.image_grid
        cells = self.cell_labels
        return replace(
            self,
            input_ids=fn(self.input_ids),
            segments=fn(self.segments),
            labels=fn(self.labels),
            pixel_values=fn(self.pixel_values),
            corrupted_pixels=None if corrupted is None else fn(corrupted),
            written=None if written is None else fn(written),
            image_grid=None if grid is None else fn(grid),
            cell_labels=None if cells is None else fn(cells),
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
            written=None if self.written is None else self.written[:, cols],
        )
        return sub, cols

    def image_pixels(self) -> torch.Tensor | None:
        """Pixel values in the order the image placeholders appear in a row: with both image
        segments, each sample's corrupted image (B) comes before its intact one (C)."""
        if self.has(S.CORRUPTED) and self.corrupted_pixels is not None:
            pair = torch.stack([self.corrupted_pixels, self.pixel_values], dim=1)
            return pair.flatten(0, 1)
        return self.pixel_values

    def image_grids(self) -> torch.Tensor | None:
        """:attr:`image_grid` in the order of :meth:`image_pixels` (``None`` without grids)."""
        if self.image_grid is None:
            return None
        if self.has(S.CORRUPTED) and self.corrupted_pixels is not None:
            return self.image_grid.repeat_interleave(2, dim=0)
        return self.image_grid

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
        """``[B, |E| - 1]`` answer targets predicted from :meth:`answer_queries` (IGNORE elsewhere,
        the written closing text and cue included: the alignment objectives read the answer)."""
        r = self.regions[S.ANSWER_INTACT]
        targets = self.labels[:, r.start + 1 : r.stop]
        if self.written is not None:
            targets = targets.masked_fill(self.written[:, r.start + 1 : r.stop], IGNORE_INDEX)
        return targets

    def written_pairs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The written template's next-token pairs ``(query columns, target columns)``, by the
        computation the query column belongs to: ``intact`` (C and E), ``corrupted`` (B, D' and
        F) or ``shared`` (the latent block D while the corrupted path reads it: computed once,
        from the intact image, so counted once). A target is predicted from the column before it
        on its path: the last opening-text token predicts the block's first token, each block
        token the next, the block's last token the first closing token. Owners without a pair are
        left out; empty without :attr:`written`."""
        if self.written is None:
            return {}
        labelled = self.written.any(0).tolist()
        copy = self.has(S.CORRUPTED) and not self.has(S.LATENT_BLANK)
        block = set(self.regions.get(S.LATENT, range(0)))
        paths = [("intact", INTACT_PATH)]
        if self.has(S.CORRUPTED):
            paths.append(("corrupted", BLANK_PATH if self.has(S.LATENT_BLANK) else CORRUPTED_PATH))
        pairs: dict[str, tuple[list[int], list[int]]] = {}
        for owner, path in paths:
            cols = [c for s in ORDER if s in path and s in self.regions for c in self.regions[s]]
            for query, target in itertools.pairwise(cols):
                if not labelled[target]:
                    continue
                key = owner
                if copy and query in block:
                    if owner == "corrupted":
                        continue  # the same logits and target as the intact path's shared pair
                    key = "shared"
                queries, targets = pairs.setdefault(key, ([], []))
                queries.append(query)
                targets.append(target)
        device = self.input_ids.device
        return {
            key: (torch.tensor(q, device=device), torch.tensor(t, device=device))
            for key, (q, t) in pairs.items()
        }

    def written_counts(self) -> dict[str, int]:
        """How many written targets each owner of :meth:`written_pairs` holds."""
        return {
            key: int((self.labels[:, targets] != IGNORE_INDEX).sum())
            for key, (_, targets) in self.written_pairs().items()
        }


#: the segments that hold the latent template (question and latent block): without ``write``
#: they carry no labels, only the answer segments do
_TEMPLATE_SEGMENTS = (S.INTACT, S.CORRUPTED, S.LATENT, S.LATENT_BLANK)


@dataclass(frozen=True)
class _Piece:
    """One segment's rows before padding: token ids, their labels (``None``: unlabelled), the
    template part of each row the model writes (token counts from its start and from its end)
    and the side the padding goes."""

    rows: list[list[int]]
    labels: list[list[int]] | None
    written: tuple[int, int] = (0, 0)
    side: Literal["left", "right"] = "left"

    def pad(
        self, segment: Segment, pad_id: int, labelled: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids, segment labels, labels (``IGNORE_INDEX`` unless ``labelled``) and written marks
        ``[B, width]``, every row padded to the widest on :attr:`side`."""
        width = max(len(r) for r in self.rows)
        ids = torch.full((len(self.rows), width), pad_id, dtype=torch.long)
        seg = torch.zeros_like(ids)
        lab = torch.full_like(ids, IGNORE_INDEX)
        written = torch.zeros_like(ids, dtype=torch.bool)
        head, tail = self.written
        for i, row in enumerate(self.rows):
            cols = slice(width - len(row), width) if self.side == "left" else slice(0, len(row))
            ids[i, cols] = torch.tensor(row, dtype=torch.long)
            seg[i, cols] = int(segment)
            if labelled and self.labels is not None:
                lab[i, cols] = torch.tensor(self.labels[i], dtype=torch.long)
            written[i, cols.start : cols.start + head] = True
            written[i, cols.stop - tail : cols.stop] = True
        return ids, seg, lab, written & (lab != IGNORE_INDEX)


class Packer:
    """Lays out samples for one backbone (``answer``: train on the option letter or its text;
    ``template``: the latent template's opening and closing text; ``write``: label the template
    and the latent block as well as the answer; ``question_first``: the question before the
    image)."""

    def __init__(
        self,
        backbone: Backbone,
        answer: Literal["letter", "text"] = "letter",
        template: tuple[str, str] = ("", ""),
        write: bool = False,
        question_first: bool = False,
    ):
        self.backbone = backbone
        self.question_first = question_first
        self.answer = answer
        self.write = write
        tok = backbone.tokenizer
        self._eos, self._pad = tok.eos_token_id, tok.pad_token_id
        self._prefix = backbone.prompt_ids("", question_first)[0]
        self._image = backbone.image_prompt_ids()
        self._cue = self._encode(ANSWER_CUE)
        self._open, self._close = (self._encode(text) if text else [] for text in template)

    def _encode(self, text: str) -> list[int]:
        return self.backbone.tokenizer.encode(text, add_special_tokens=False)

    @property
    def cue_ids(self) -> list[int]:
        return list(self._cue)

    @property
    def opening_ids(self) -> list[int]:
        """The latent template's opening text (before the block), as ids."""
        return list(self._open)

    def written_ids(self, block: Sequence[int]) -> list[int]:
        """What a forced prompt holds after the question and the model writes itself in
        generated mode: opening text, latent ``block``, closing text, answer cue."""
        return [*self._open, *block, *self._close, *self._cue]

    def __call__(
        self,
        samples: Sequence[Sample],
        block: Sequence[int] = (),
        *,
        corrupted_images: torch.Tensor | None = None,
        blank_latents: bool = False,
        with_answer: bool = True,
        recurrent: bool = False,
        until_question: bool = False,
    ) -> Layout:
        """Lay out ``samples`` with latent ``block`` ids. ``corrupted_images`` (float ``[B, 3, H,
        W]`` in [0, 1], or a list of ``[3, H, W]`` when sizes differ) adds the corrupted path (B,
        F); when the backbone resizes images itself, each sample's image gets its own grid and
        placeholder count (the corrupted image must have the intact one's size, so the same);
        ``blank_latents`` adds D' (no_copy).
        ``with_answer=False`` ends every row at the answer cue (generation prompts);
        ``until_question`` ends it at the question, before the latent template (prompts of
        generated latents: the model writes the rest)."""
        two_paths = corrupted_images is not None
        if until_question and (two_paths or len(block)):
            raise ValueError("a prompt that ends at the question has no block and no 2nd image")
        grids = self._grids(samples, corrupted_images)
        opening = [] if until_question else self._open
        closing = [] if until_question else [*self._close, *self._cue]
        blocks = [list(block)] * len(samples)
        pieces = {
            S.PREFIX: _Piece([self._prefix] * len(samples), None),
            S.INTACT: self._questions(samples, grids, opening),
            S.LATENT: _Piece(blocks, blocks, (0, len(block))),
            S.ANSWER_INTACT: self._answers(samples, closing, with_answer and not until_question),
        }
        if two_paths:
            pieces[S.CORRUPTED] = pieces[S.INTACT]
            pieces[S.ANSWER_CORRUPTED] = pieces[S.ANSWER_INTACT]
            if blank_latents:
                pieces[S.LATENT_BLANK] = pieces[S.LATENT]
        ids, segments, labels, written, regions = self._columns(pieces)
        preprocess = self.backbone.preprocess_images
        return Layout(
            input_ids=ids,
            segments=segments,
            labels=labels,
            regions=regions,
            recurrent=recurrent and len(block) > 0,
            pixel_values=self._pixels(samples),
            corrupted_pixels=preprocess(corrupted_images) if two_paths else None,
            written=written if self.write else None,
            image_grid=None if grids[0] is None else torch.stack(grids),
        )

    def _grids(
        self, samples: Sequence[Sample], corrupted_images: torch.Tensor | None
    ) -> list[torch.Tensor | None]:
        """Each sample's image grid (``None`` when the backbone has none); a corrupted image must
        have its intact image's grid, or the two paths would hold different placeholder counts."""
        backbone = self.backbone
        grids = [backbone.image_grid_of(*s.image.shape[-2:]) for s in samples]
        if corrupted_images is not None and grids[0] is not None:
            for grid, c in zip(grids, corrupted_images, strict=True):
                other = backbone.image_grid_of(*c.shape[-2:])
                if not torch.equal(other, grid):
                    raise ValueError(
                        f"a corrupted image of grid {other.tolist()} for an image of grid "
                        f"{grid.tolist()}: both paths of a sample need the same grid"
                    )
        return grids

    def _questions(
        self,
        samples: Sequence[Sample],
        grids: Sequence[torch.Tensor | None],
        opening: list[int],
    ) -> _Piece:
        """The question segment: image placeholders and question (or question and image), then
        the template's ``opening`` text (labelled: the model writes it)."""
        rows: list[list[int]] = []
        labels: list[list[int]] = []
        for s, grid in zip(samples, grids, strict=True):
            text = format_question(s.question, s.options)
            prefix, before, after = self.backbone.prompt_ids(text, self.question_first)
            if prefix != self._prefix:
                raise ValueError(f"the prompt's prefix depends on the question: {s.question!r}")
            image = self._image if grid is None else self.backbone.image_prompt_ids(grid)
            ids = [*before, *image, *after, *opening]
            rows.append(ids)
            labels.append([IGNORE_INDEX] * (len(ids) - len(opening)) + opening)
        return _Piece(rows, labels, (0, len(opening)))

    def _answers(self, samples: Sequence[Sample], closing: list[int], answer: bool) -> _Piece:
        """The answer segment: the template's ``closing`` text and cue (labelled only with
        ``write``), then with ``answer`` the answer and eos."""
        closing_labels = closing if self.write else [IGNORE_INDEX] * len(closing)
        rows: list[list[int]] = []
        labels: list[list[int]] = []
        for s in samples:
            ids: list[int] = []
            if answer:
                target = s.answer if self.answer == "letter" else s.answer_text
                ids = [*self._encode(target), self._eos]
            rows.append(closing + ids)
            labels.append(closing_labels + ids)
        return _Piece(rows, labels, (len(closing), 0), "right")

    def _columns(
        self, pieces: dict[Segment, _Piece]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[Segment, range]]:
        """``pieces`` padded and joined in packed order: ids, segments, labels and written marks
        ``[B, T]``, and each segment's columns."""
        parts: list[tuple[torch.Tensor, ...]] = []
        regions: dict[Segment, range] = {}
        start = 0
        for segment in ORDER:
            if segment not in pieces:
                continue
            labelled = self.write or segment not in _TEMPLATE_SEGMENTS
            parts.append(pieces[segment].pad(segment, self._pad, labelled))
            width = parts[-1][0].shape[1]
            regions[segment] = range(start, start + width)
            start += width
        ids, segments, labels, written = (
            torch.cat(column, 1) for column in zip(*parts, strict=True)
        )
        return ids, segments, labels, written, regions

    def _pixels(self, samples: Sequence[Sample]) -> torch.Tensor:
        """The intact images as the backbone reads them."""
        preprocess = self.backbone.preprocess_images
        if self.backbone.resizes_itself:  # at their own sizes: the processor resizes (and rescales)
            return preprocess([s.image for s in samples])
        # at any sizes: resized to the backbone's square
        return preprocess([s.image.float() / 255.0 for s in samples])
