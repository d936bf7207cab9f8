"""4-D additive attention masks.

crystalkit always hands the language model an explicit ``[batch, 1, query, key]`` float mask: the
packed CrystaL sequence needs a block mask that no 2-D padding mask can express. An additive float
mask means the same thing under SDPA and eager attention (a boolean 4-D mask is silently misread by
eager attention in some transformers releases, so backbones convert one with :func:`as_additive`).
FlashAttention-2 kernels take no such mask at all: transformers reads the mask it hands them as a
2-D ``[batch, key]`` padding mask, so the language model refuses ``flash_attention_2``
(``HFConfig.attn_implementation``).
"""

from __future__ import annotations

import torch


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Turn a boolean "may attend" tensor into 0 / -inf-like additive form (``[B, 1, Q, K]``)."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1) if mask.dim() == 3 else mask


def as_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``mask`` as an additive mask in ``dtype``. A boolean "may attend" mask is converted with
    :func:`additive`: cast as it is, it would add 1 to the allowed scores and 0 to the masked ones,
    i.e. mask nothing."""
    return additive(mask, dtype) if mask.dtype == torch.bool else mask.to(dtype)


def causal_allowed(attention_mask: torch.Tensor, past_length: int = 0) -> torch.Tensor:
    """Boolean ``[B, Q, K]``: causal attention over non-padding keys.

    ``attention_mask`` is the 2-D ``[B, K]`` validity mask of all keys (cache + new tokens); the
    queries are the last ``K - past_length`` positions. A padding query may see itself so that no
    row is fully masked (fully masked rows turn softmax into NaN under SDPA).
    """
    valid = attention_mask.bool()
    batch, keys = valid.shape
    queries = keys - past_length
    q_pos = torch.arange(past_length, keys, device=valid.device)
    k_pos = torch.arange(keys, device=valid.device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None] & valid[:, None, :]
    diagonal = k_pos[None, :] == q_pos[:, None]
    return allowed | (diagonal[None] & ~valid[:, past_length:, None]).expand(batch, queries, keys)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """1-D position ids that skip padding (works for left and right padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
