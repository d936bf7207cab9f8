"""Batched greedy decoding with a KV cache, over the :class:`Backbone` interface.

crystalkit decodes itself instead of calling ``generate``: evaluation must run exactly the
computation training runs (latent blocks included, in later methods), and a loop this small is
easier to keep identical than a generation config.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from crystalkit.data.collate import Batch
from crystalkit.models.backbone import Backbone
from crystalkit.models.masks import additive, causal_allowed, positions_from_mask


@torch.inference_mode()
def greedy_generate(
    backbone: Backbone, batch: Batch, max_new_tokens: int, stop_ids: Iterable[int]
) -> torch.Tensor:
    """Greedy continuation of left-padded prompts: ``[B, <= max_new_tokens]`` token ids, with the
    pad id after each row's first stop token."""
    stop = torch.tensor(sorted(set(stop_ids)), device=batch.input_ids.device)
    pad_id = backbone.tokenizer.pad_token_id
    mask = batch.attention_mask
    embeds = backbone.embed(batch.input_ids, batch.pixel_values)
    positions = positions_from_mask(mask)
    out = backbone(
        embeds,
        additive(causal_allowed(mask), embeds.dtype),
        positions,
        past_key_values=backbone.new_cache(),
        use_cache=True,
    )
    next_pos = positions[:, -1:] + 1
    generated: list[torch.Tensor] = []
    finished = torch.zeros(len(batch), dtype=torch.bool, device=mask.device)
    for step in range(max_new_tokens):
        token = out.logits[:, -1].argmax(-1)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        generated.append(token)
        finished |= torch.isin(token, stop)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        past = mask.shape[1]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        step_embeds = backbone.embed(token[:, None])
        out = backbone(
            step_embeds,
            additive(causal_allowed(mask, past_length=past), step_embeds.dtype),
            next_pos,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
        next_pos = next_pos + 1
    return torch.stack(generated, dim=1)
