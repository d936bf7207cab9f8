"""The reference's single packed forward: both paths in one sequence.

    A = shared prefix      B = corrupted image + question      C = intact image + question
    D = latent block       E = answer (intact path)            F = answer (corrupted path)

    sequence A B C D E F;  causal, and C, D, E may not see B;  F may not see C or E
    positions: C reuses B's, F reuses E's

so the intact path is ``A C D E``, the corrupted path is ``A B D F``, the latent block D is computed
once (from the intact image) and F reads D's keys and values at every layer: that is the copy.

The ``no_copy`` control adds a blank latent block D' between E and F: D' sees only A and itself
(no image at all) and takes D's positions; F then reads D' instead of D.

Segments are given per token as a ``[B, T]`` label tensor; padding may sit anywhere (crystalkit
pads each segment to a common width so that every segment is one column range of the batch).
"""

from __future__ import annotations

from enum import IntEnum

import torch


class Segment(IntEnum):
    PAD = 0
    PREFIX = 1  # A
    CORRUPTED = 2  # B
    INTACT = 3  # C
    LATENT = 4  # D
    ANSWER_INTACT = 5  # E
    ANSWER_CORRUPTED = 6  # F
    LATENT_BLANK = 7  # D' (no_copy control)


#: the order segments take in a packed row
ORDER = (
    Segment.PREFIX,
    Segment.CORRUPTED,
    Segment.INTACT,
    Segment.LATENT,
    Segment.ANSWER_INTACT,
    Segment.LATENT_BLANK,
    Segment.ANSWER_CORRUPTED,
)
INTACT_PATH = (Segment.PREFIX, Segment.INTACT, Segment.LATENT, Segment.ANSWER_INTACT)
CORRUPTED_PATH = (Segment.PREFIX, Segment.CORRUPTED, Segment.LATENT, Segment.ANSWER_CORRUPTED)
#: the corrupted path of the ``no_copy`` control: it reads the image-free block D'
BLANK_PATH = (Segment.PREFIX, Segment.CORRUPTED, Segment.LATENT_BLANK, Segment.ANSWER_CORRUPTED)


def _is(segments: torch.Tensor, members: tuple[Segment, ...]) -> torch.Tensor:
    return torch.isin(segments, torch.tensor([int(m) for m in members], device=segments.device))


def _has_blank(segments: torch.Tensor) -> torch.Tensor:
    return (segments == Segment.LATENT_BLANK).any(-1, keepdim=True)


def packed_allowed(segments: torch.Tensor) -> torch.Tensor:
    """Boolean ``[B, T, T]`` "query may attend to key" for a packed batch (padding queries see
    only themselves, so no softmax row is empty). A single path's segments give its causal mask."""
    length = segments.shape[-1]
    valid = segments != Segment.PAD
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    allowed = causal[None] & valid[:, None, :]
    q_sees_no_corrupted = _is(segments, (Segment.INTACT, Segment.LATENT, Segment.ANSWER_INTACT))
    allowed &= ~(q_sees_no_corrupted[:, :, None] & (segments == Segment.CORRUPTED)[:, None, :])
    hidden_from_f = _is(segments, (Segment.INTACT, Segment.ANSWER_INTACT)) | (
        (segments == Segment.LATENT) & _has_blank(segments)
    )
    allowed &= ~((segments == Segment.ANSWER_CORRUPTED)[:, :, None] & hidden_from_f[:, None, :])
    blank_sees = _is(segments, (Segment.PREFIX, Segment.LATENT_BLANK))
    allowed &= ~((segments == Segment.LATENT_BLANK)[:, :, None] & ~blank_sees[:, None, :])
    eye = torch.eye(length, dtype=torch.bool, device=segments.device)[None]
    return allowed | (eye & ~valid[:, :, None])


def packed_positions(segments: torch.Tensor) -> torch.Tensor:
    """Position ids ``[B, T]``: each token's position within its own path, so C takes B's
    positions, F takes E's and D' takes D's (B and C, D and D', E and F have equal lengths)."""
    blank = _has_blank(segments)
    intact = _is(segments, INTACT_PATH).long().cumsum(-1) - 1
    on_corrupted_path = _is(
        segments,
        (Segment.PREFIX, Segment.CORRUPTED, Segment.LATENT_BLANK, Segment.ANSWER_CORRUPTED),
    ) | ((segments == Segment.LATENT) & ~blank)
    corrupted = on_corrupted_path.long().cumsum(-1) - 1
    own = _is(segments, (Segment.CORRUPTED, Segment.LATENT_BLANK, Segment.ANSWER_CORRUPTED))
    return torch.where(own, corrupted, intact).clamp(min=0)


def sequence_positions(segments: torch.Tensor) -> torch.Tensor:
    """Positions of any laid-out sequence: tied positions when it packs both image segments,
    else each token's index among the row's non-padding tokens (a single path)."""
    present = set(segments.unique().tolist())
    if {Segment.CORRUPTED, Segment.INTACT} <= present:
        return packed_positions(segments)
    return ((segments != Segment.PAD).long().cumsum(-1) - 1).clamp(min=0)


def check_segments(segments: torch.Tensor) -> None:
    """Raise ``ValueError`` unless every row's non-padding segments come in the order
    A B C D E D' F, each one contiguous, with ``|B| = |C|``, ``|D| = |D'|`` and ``|E| = |F|``."""
    for row, labels in enumerate(segments.tolist()):
        runs = [
            label for i, label in enumerate(labels) if label and (i == 0 or labels[i - 1] != label)
        ]
        real = [label for label in labels if label]
        order = [Segment(label) for label in dict.fromkeys(real)]
        if len(runs) != len(order):
            raise ValueError(f"row {row}: each segment must be contiguous (padding aside)")
        if order != [s for s in ORDER if s in order]:
            raise ValueError(
                f"row {row}: segments must come in the order A B C D E D' F, got {order}"
            )
        count = {s: real.count(int(s)) for s in order}
        for a, b in (
            (Segment.CORRUPTED, Segment.INTACT),
            (Segment.ANSWER_INTACT, Segment.ANSWER_CORRUPTED),
        ):
            if Segment.CORRUPTED in count and count.get(a, 0) != count.get(b, 0):
                raise ValueError(f"row {row}: {a.name} and {b.name} must have equal lengths")
        if Segment.LATENT_BLANK in count and count[Segment.LATENT_BLANK] != count.get(
            Segment.LATENT, 0
        ):
            raise ValueError(f"row {row}: LATENT and LATENT_BLANK must have equal lengths")
