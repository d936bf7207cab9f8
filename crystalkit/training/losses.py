"""The supervised (direct finetune) objective."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from crystalkit.data.collate import IGNORE_INDEX, Batch
from crystalkit.models.backbone import Backbone
from crystalkit.models.masks import additive, causal_allowed, positions_from_mask


def answer_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over labelled positions (mean over answer tokens)."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


def finetune_loss(backbone: Backbone, batch: Batch) -> dict[str, torch.Tensor]:
    """Direct finetuning: one pass over image + question + answer, CE on the answer."""
    embeds = backbone.embed(batch.input_ids, batch.pixel_values)
    mask = additive(causal_allowed(batch.attention_mask), embeds.dtype)
    out = backbone(embeds, mask, positions_from_mask(batch.attention_mask))
    return {"ce": answer_cross_entropy(out.logits, batch.labels)}
