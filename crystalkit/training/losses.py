"""Cross-entropy on the answer, from logits already aligned with their targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from crystalkit.data.prompt import IGNORE_INDEX


def answer_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy: ``logits`` ``[B, W, V]`` predict ``targets`` ``[B, W]``."""
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX
    )
