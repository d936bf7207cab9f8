"""Cross-entropy on the answer (and the written latent template), from logits already aligned
with their targets."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from crystalkit.data.prompt import IGNORE_INDEX


def answer_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy: ``logits`` ``[B, W, V]`` predict ``targets`` ``[B, W]``. Zero
    (not NaN) without any target, like the alignment terms: a data-parallel shard or micro-batch
    may hold no answer token and then contributes nothing."""
    if not bool((targets != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX
    )


def pooled_cross_entropy(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean token cross-entropy over every target of several ``(logits [B, W, V], targets
    [B, W])`` pairs together (each token counts once, whichever pair holds it); zero without any
    target."""
    count = sum(int((targets != IGNORE_INDEX).sum()) for _, targets in pairs)
    if not count:
        return torch.stack([logits.sum() * 0.0 for logits, _ in pairs]).sum()
    total = sum(
        F.cross_entropy(
            logits.flatten(0, 1).float(),
            targets.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        for logits, targets in pairs
    )
    return total / count
