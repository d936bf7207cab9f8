"""Batched loss kernels behind the alignment objectives (METHOD.md, "The objective").

Pure tensor functions, so each can be checked against a slow reference on hand-made inputs. The
intact path is the target: it is detached here (stop-gradient) unless ``stop_gradient=False`` is
asked for (the symmetric variant).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Divergence = Literal["kl", "js", "mse"]


def token_kl(
    target_logits: torch.Tensor, student_logits: torch.Tensor, stop_gradient: bool = True
) -> torch.Tensor:
    """``KL(P_target || P_student)`` at every position: ``[B, T, V]`` x 2 -> ``[B, T]`` (float32)."""
    target = target_logits.float()
    if stop_gradient:
        target = target.detach()
    log_p = F.log_softmax(target, dim=-1)
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def hardest_mean(
    values: torch.Tensor, mask: torch.Tensor, fraction: float = 0.1, min_count: int = 1
) -> torch.Tensor:
    """Per sample, the mean of the ``max(min_count, floor(fraction * n))`` largest ``values`` among
    its ``n`` masked-in positions; then the mean over samples that have any (0 if none do).
    ``fraction=1`` averages every position."""
    valid = mask.bool()
    counts = valid.sum(-1)
    keep = torch.clamp(torch.floor(counts.float() * fraction + 1e-6).long(), min=min_count)
    keep = torch.minimum(keep, counts)
    ranked = values.masked_fill(~valid, float("-inf")).sort(dim=-1, descending=True).values
    selected = torch.arange(values.shape[-1], device=values.device)[None] < keep[:, None]
    per_sample = ranked.masked_fill(~selected, 0.0).sum(-1) / keep.clamp(min=1)
    has_any = counts > 0
    if not bool(has_any.any()):
        return values.sum() * 0.0
    return per_sample[has_any].mean()


def latent_attention(
    probs: torch.Tensor, key_mask: torch.Tensor, eps: float = 1e-12
) -> torch.Tensor:
    """Head-averaged attention over the latent keys only, each row renormalised to sum to 1:
    ``[B, H, Q, K]`` probabilities and ``[B, K]`` latent-key mask -> ``[B, Q, K_latent]``."""
    averaged = probs.float().mean(1)
    index = key_mask.bool()
    counts = index.sum(-1)
    if not bool((counts == counts[0]).all()):
        raise ValueError("every sample must have the same number of latent keys")
    picked = (
        averaged.transpose(1, 2)[index].view(probs.shape[0], int(counts[0]), -1).transpose(1, 2)
    )
    return picked / picked.sum(-1, keepdim=True).clamp(min=eps)


def attention_divergence(
    target: torch.Tensor,
    student: torch.Tensor,
    row_mask: torch.Tensor,
    kind: Divergence = "kl",
    stop_gradient: bool = True,
    eps: float = 1e-12,
) -> torch.Tensor:
    """Mean divergence between attention rows ``[B, Q, K]`` (each row a distribution) over the rows
    selected by ``row_mask`` ``[B, Q]``: KL(target || student), Jensen-Shannon, or squared error
    summed over keys."""
    p = target.float().detach() if stop_gradient else target.float()
    q = student.float()
    if kind == "kl":
        per_row = (p * (torch.log(p + eps) - torch.log(q + eps))).sum(-1)
    elif kind == "js":
        m = 0.5 * (p + q)
        log_m = torch.log(m + eps)
        per_row = 0.5 * (p * (torch.log(p + eps) - log_m)).sum(-1) + 0.5 * (
            q * (torch.log(q + eps) - log_m)
        ).sum(-1)
    elif kind == "mse":
        per_row = (p - q).pow(2).sum(-1)
    else:
        raise ValueError(f"unknown divergence {kind!r}; expected kl, js or mse")
    rows = row_mask.bool()
    if not bool(rows.any()):
        return per_row.sum() * 0.0
    return per_row[rows].mean()


def cosine_distance(
    target: torch.Tensor, student: torch.Tensor, mask: torch.Tensor, stop_gradient: bool = True
) -> torch.Tensor:
    """Mean ``1 - cos`` between hidden states ``[B, T, D]`` at the masked-in positions."""
    a = target.float().detach() if stop_gradient else target.float()
    distance = 1.0 - F.cosine_similarity(a, student.float(), dim=-1)
    positions = mask.bool()
    if not bool(positions.any()):
        return distance.sum() * 0.0
    return distance[positions].mean()


#: the largest value the JS divergence (natural log) can take, for sanity checks
JS_MAX = math.log(2.0)
