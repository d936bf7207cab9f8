"""What the analysis measures the latents by: their per-layer keys and values.

A latent's content, in both latent families, is what the answer can read of it: its keys and
values at every decoder layer (the same thing the latent probes replace). A *state* here is one
position's keys and values at one layer, concatenated over heads: ``[2 * H_kv * d]``. Next to the
latent block's states, the same forward gives two references: the mean state of the image tokens
(what the latents could copy) and the mean state of the question's text tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crystalkit.crystal.layout import Layout
from crystalkit.crystal.packing import Segment
from crystalkit.crystal.paths import layout_inputs, run_intact
from crystalkit.crystal.runner import block_kv
from crystalkit.models.backbone import Backbone


@dataclass
class States:
    """``latents`` ``[L, B, K, D]``; ``image``, ``question`` and ``tokens`` ``[L, B, D]`` (means over
    the image tokens, the question's text tokens and every token of the prompt), with
    ``D = 2 * H_kv * d`` and ``L`` decoder layers."""

    latents: torch.Tensor
    image: torch.Tensor
    question: torch.Tensor
    tokens: torch.Tensor


def _per_layer(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``[(k, v) [B, H, T, d]] * L`` -> ``[L, B, T, 2 * H * d]``."""
    return torch.stack(
        [torch.cat([k, v], dim=1).permute(0, 2, 1, 3).flatten(2) for k, v in kv]
    ).float()


@torch.inference_mode()
def prompt_states(backbone: Backbone, layout: Layout) -> States:
    """The states of a prompt layout's intact path (``with_answer=False`` layouts)."""
    intact, run, _ = run_intact(backbone, layout, layout_inputs(backbone, layout), keep_cache=True)
    everything = _per_layer(block_kv(run.cache, range(0, len(intact.segments[0]))))
    latents = everything[:, :, intact.regions[Segment.LATENT]]
    question = intact.regions[Segment.INTACT]
    ids = intact.input_ids[:, question.start : question.stop]
    valid = intact.segments[:, question.start : question.stop] != Segment.PAD
    is_image = ids == backbone.image_token_id
    markers = torch.tensor(backbone.image_prompt_ids(), device=ids.device)
    is_text = valid & ~is_image & ~torch.isin(ids, markers)
    within = everything[:, :, question.start : question.stop]
    tokens = _masked_mean(everything, intact.segments != Segment.PAD)
    return States(latents, _masked_mean(within, is_image), _masked_mean(within, is_text), tokens)


def _masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[L, B, T, D]`` averaged over the ``T`` columns ``mask`` ``[B, T]`` keeps."""
    weights = mask.float() / mask.float().sum(-1, keepdim=True).clamp(min=1)
    return torch.einsum("lbtd,bt->lbd", states, weights)
