"""Batched greedy answers after the latent block, with a KV cache.

crystalkit decodes itself instead of calling ``generate``: the prompt goes through exactly the
computation training runs (:func:`~crystalkit.crystal.paths.run_intact`: the same layout, the same
latent block, the recurrent loop for recurrent latents), and a loop this small is easier to keep
identical than a generation config.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from crystalkit.crystal.layout import Layout
from crystalkit.crystal.packing import INTACT_PATH, Segment
from crystalkit.crystal.paths import layout_inputs, run_intact
from crystalkit.crystal.runner import block_kv, run_sequence
from crystalkit.models.backbone import Backbone
from crystalkit.models.masks import additive, causal_allowed


@dataclass
class Generation:
    """``tokens`` ``[B, <= max_new_tokens]`` (pad after each row's stop token) and ``first_logits``
    ``[B, V]``, the distribution the first answer token was drawn from."""

    tokens: torch.Tensor
    first_logits: torch.Tensor


@torch.inference_mode()
def generate_answers(
    backbone: Backbone,
    layout: Layout,
    max_new_tokens: int,
    stop_ids: Iterable[int],
    latent_probe: Callable[..., Any] | None = None,
) -> Generation:
    """Greedy answers for a prompt layout (``with_answer=False``: rows end at the answer cue).
    ``latent_probe(backbone, layout, kv) -> kv`` replaces the latent block's per-layer keys and
    values before the answer cue reads them (:mod:`crystalkit.evaluation.probes`)."""
    inputs = layout_inputs(backbone, layout)
    intact, run, _ = run_intact(backbone, layout, inputs, keep_cache=True)
    block = intact.regions[Segment.LATENT]
    if latent_probe is not None and len(block):
        kv = block_kv(run.cache, block)
        _, cols = layout.select(INTACT_PATH)
        run = run_sequence(
            backbone,
            inputs.columns(cols),
            inject=(block, latent_probe(backbone, layout, kv)),
            keep_cache=True,
        )
    cue = intact.regions[Segment.ANSWER_INTACT]
    logits = run.logits(range(cue.stop - 1, cue.stop))[:, -1]
    first_logits = logits.float()
    mask = (intact.segments != Segment.PAD).long()
    next_pos = run.positions[..., -1:] + 1
    cache = run.cache
    stop = torch.tensor(sorted(set(stop_ids)), device=mask.device)
    pad_id = backbone.tokenizer.pad_token_id
    generated: list[torch.Tensor] = []
    finished = torch.zeros(len(layout), dtype=torch.bool, device=mask.device)
    for step in range(max_new_tokens):
        token = logits.argmax(-1)
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
            past_key_values=cache,
            use_cache=True,
        )
        cache, logits = out.past_key_values, out.logits[:, -1]
        next_pos = next_pos + 1
    return Generation(torch.stack(generated, dim=1), first_logits)
