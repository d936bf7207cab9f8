"""Cross-entropy on the answer, from logits already aligned with their targets."""

from __future__ import annotations

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
