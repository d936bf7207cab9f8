"""The reference's single packed forward: both paths in one sequence.

    A = shared prefix      B = corrupted image + question      C = intact image + question
    D = latent block       E = answer (intact path)            F = answer (corrupted path)

    sequence A B C D E F;  causal, and C, D, E may not see B;  F may not see C or E
    positions: C reuses B's, F reuses E's

so the intact path is ``A C D E``, the corrupted path is ``A B D F``, the latent block D is computed
once (from the intact image) and F reads D's keys and values at every layer: that is the copy.
Segments are given per token as a ``[B, T]`` label tensor, so samples of different lengths pack
into one left-padded batch.
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


INTACT_PATH = (Segment.PREFIX, Segment.INTACT, Segment.LATENT, Segment.ANSWER_INTACT)
CORRUPTED_PATH = (Segment.PREFIX, Segment.CORRUPTED, Segment.LATENT, Segment.ANSWER_CORRUPTED)


def _is(segments: torch.Tensor, members: tuple[Segment, ...]) -> torch.Tensor:
    return torch.isin(segments, torch.tensor([int(m) for m in members], device=segments.device))


def packed_allowed(segments: torch.Tensor) -> torch.Tensor:
    """Boolean ``[B, T, T]`` "query may attend to key" for a packed batch (padding queries see
    only themselves, so no softmax row is empty)."""
    length = segments.shape[-1]
    valid = segments != Segment.PAD
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    allowed = causal[None] & valid[:, None, :]
    q_sees_no_corrupted = _is(segments, (Segment.INTACT, Segment.LATENT, Segment.ANSWER_INTACT))
    allowed &= ~(q_sees_no_corrupted[:, :, None] & (segments == Segment.CORRUPTED)[:, None, :])
    k_intact_only = _is(segments, (Segment.INTACT, Segment.ANSWER_INTACT))
    allowed &= ~((segments == Segment.ANSWER_CORRUPTED)[:, :, None] & k_intact_only[:, None, :])
    eye = torch.eye(length, dtype=torch.bool, device=segments.device)[None]
    return allowed | (eye & ~valid[:, :, None])


def packed_positions(segments: torch.Tensor) -> torch.Tensor:
    """Position ids ``[B, T]``: each token's position within its own path, so C takes B's
    positions and F takes E's (B and C, E and F must have equal lengths per sample)."""
    intact = _is(segments, INTACT_PATH).long().cumsum(-1) - 1
    corrupted = _is(segments, CORRUPTED_PATH).long().cumsum(-1) - 1
    on_corrupted = _is(segments, (Segment.CORRUPTED, Segment.ANSWER_CORRUPTED))
    return torch.where(on_corrupted, corrupted, intact).clamp(min=0)


def check_segments(segments: torch.Tensor) -> None:
    """Raise ``ValueError`` unless every row is padding then A B C D E F in order, with
    ``|B| = |C|`` and ``|E| = |F|``."""
    for row, labels in enumerate(segments.tolist()):
        runs: list[list[int]] = []
        for label in labels:
            if runs and runs[-1][0] == label:
                runs[-1][1] += 1
            else:
                runs.append([label, 1])
        order = [label for label, _ in runs if label != Segment.PAD]
        expected = [s for s in Segment if s != Segment.PAD and s in order]
        if order != expected:
            raise ValueError(f"row {row}: segments must be PAD* A B C D E F in order, got {order}")
        if Segment.PAD in [label for label, _ in runs[1:]]:
            raise ValueError(f"row {row}: padding must be on the left")
        count = {Segment(label): n for label, n in runs}
        for a, b in (
            (Segment.CORRUPTED, Segment.INTACT),
            (Segment.ANSWER_INTACT, Segment.ANSWER_CORRUPTED),
        ):
            if count.get(a, 0) != count.get(b, 0):
                raise ValueError(f"row {row}: {a.name} and {b.name} must have equal lengths")
