"""Built-in alignment objectives (METHOD.md, "The objective").

An objective is a callable ``(PathOutputs) -> scalar`` that declares what it reads besides the
answer logits: ``attention_layers`` (attention rows of the answer queries over the latent keys at
those decoder layers; -1 = last) and ``needs_hidden`` (last-layer hidden states at the answer
columns), and what its value is a mean over: ``units`` (:mod:`crystalkit.objectives.contract`).
Its weight lives in the recipe, not in the objective. Register your own with
``@OBJECTIVES.register("name")``.
"""

from __future__ import annotations

import torch

from crystalkit.objectives.contract import Units
from crystalkit.objectives.functional import (
    Divergence,
    attention_divergence,
    cosine_distance,
    hardest_mean,
    token_kl,
)
from crystalkit.objectives.outputs import PathOutputs
from crystalkit.registries import OBJECTIVES


@OBJECTIVES.register("kl")
class AnswerKL:
    """``KL(sg[P_intact] ‖ P_corrupted)`` per answer token; per sample the mean of the hardest
    ``max(min_count, floor(fraction * n))`` tokens (reference: 10 %, at least 1); ``fraction: 1``
    averages all tokens.

    Args:
        fraction: share of each sample's answer tokens averaged, hardest (largest KL) first;
            1 averages all of them.
        min_count: at least this many tokens per sample.
        stop_gradient: no gradient through the intact path's distribution (the reference's
            ``detach``): the corrupted path moves towards the intact one, not the reverse.
    """

    attention_layers: tuple[int, ...] = ()
    needs_hidden = False
    units: Units = "answer_samples"  # per-sample top-fraction mean, then mean over samples

    def __init__(self, fraction: float = 0.1, min_count: int = 1, stop_gradient: bool = True):
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        self.fraction, self.min_count, self.stop_gradient = fraction, min_count, stop_gradient

    def __call__(self, outputs: PathOutputs) -> torch.Tensor:
        per_token = token_kl(outputs.intact_logits, outputs.corrupted_logits, self.stop_gradient)
        return hardest_mean(per_token, outputs.answer_mask, self.fraction, self.min_count)


@OBJECTIVES.register("attention")
class AttentionAlignment:
    """Align the answer queries' attention over the latent keys between the paths: head-averaged,
    renormalised over the latent keys, ``divergence(sg[A_intact], A_corrupted)`` averaged over
    answer rows and layers (reference: last layer, KL). Zero at steps without latents.

    Args:
        layers: decoder layers whose attention is aligned; negative indices count from the last
            (-1 = last layer, the reference).
        divergence: ``kl`` (reference), ``js`` or ``mse`` between the two attention distributions.
        stop_gradient: no gradient through the intact path's attention.
    """

    needs_hidden = False
    units: Units = "answer_tokens"  # mean over answer rows (per layer, then over layers)

    def __init__(
        self,
        layers: tuple[int, ...] = (-1,),
        divergence: Divergence = "kl",
        stop_gradient: bool = True,
    ):
        if not layers:
            raise ValueError("layers must name at least one decoder layer")
        self.attention_layers = tuple(layers)
        self.divergence, self.stop_gradient = divergence, stop_gradient

    def __call__(self, outputs: PathOutputs) -> torch.Tensor:
        if not outputs.intact_attention:
            return outputs.intact_logits.sum() * 0.0
        terms = [
            attention_divergence(
                outputs.intact_attention[layer],
                outputs.corrupted_attention[layer],
                outputs.answer_mask,
                self.divergence,
                self.stop_gradient,
            )
            for layer in self.attention_layers
        ]
        return torch.stack(terms).mean()


@OBJECTIVES.register("cosine")
class HiddenCosine:
    """``1 - cos(sg[h_intact], h_corrupted)`` of the last-layer hidden states at the answer
    columns, averaged.

    Args:
        stop_gradient: no gradient through the intact path's hidden states.
    """

    attention_layers: tuple[int, ...] = ()
    needs_hidden = True
    units: Units = "answer_tokens"  # mean over answer positions

    def __init__(self, stop_gradient: bool = True):
        self.stop_gradient = stop_gradient

    def __call__(self, outputs: PathOutputs) -> torch.Tensor:
        return cosine_distance(
            outputs.intact_hidden, outputs.corrupted_hidden, outputs.answer_mask, self.stop_gradient
        )
