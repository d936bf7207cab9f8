"""4-D additive attention masks.

crystalkit always hands the language model an explicit ``[batch, 1, query, key]`` float mask: the
packed CrystaL sequence needs a block mask that no 2-D padding mask can express, and an additive
float mask means the same thing under SDPA, eager and flash-style kernels (a boolean 4-D mask is
silently misread by eager attention in some transformers releases).
"""

from __future__ import annotations

import torch


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Turn a boolean "may attend" tensor into 0 / -inf-like additive form (``[B, 1, Q, K]``)."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1) if mask.dim() == 3 else mask


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
