"""Attention capture: attention rows for alignment, without switching the model to eager attention.

Attention probabilities only come back from eager attention, which materialises every head's full
``T x T`` map and costs far more time and memory than SDPA or FlashAttention. CrystaL needs a few
rows of it: the answer tokens' queries, at one or a few layers. crystalkit registers a wrapper
attention function through transformers' public ``AttentionInterface``: the fast kernel still
computes the layer's output, and for the layers being recorded the wrapper recomputes
``softmax(q_rows k^T * scale + mask_rows)`` for just the requested query rows, from the very
queries and keys the kernel used (after RoPE and any q/k norms). Gradients flow through the rows.

Under gradient checkpointing a layer's forward runs again during backward, and the rows' saved
tensors are rebuilt by that rerun: :func:`checkpoint_context` makes the rerun record the same rows
(into a throwaway recording), so the recomputed graph matches the original and gradients stay exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

PREFIX = "crystalkit_capture_"


@dataclass
class AttentionRecording:
    """Requested ``layers`` and per-sample ``query_index`` ``[B, Q]`` (positions in the current
    forward's queries); ``rows[layer]`` receives ``[B, H, Q, K]`` probabilities (float32)."""

    layers: frozenset[int]
    query_index: torch.Tensor
    rows: dict[int, torch.Tensor] = field(default_factory=dict)


_ACTIVE: ContextVar[AttentionRecording | None] = ContextVar("crystalkit_attention", default=None)


@contextmanager
def record_attention(
    layers: Iterable[int], query_index: torch.Tensor
) -> Iterator[AttentionRecording]:
    """Within this block, forwards of a model with attention capture record the given query rows."""
    recording = AttentionRecording(frozenset(layers), query_index)
    token = _ACTIVE.set(recording)
    try:
        yield recording
    finally:
        _ACTIVE.reset(token)


@contextmanager
def _replay(recording: AttentionRecording | None) -> Iterator[None]:
    replay = (
        None if recording is None else AttentionRecording(recording.layers, recording.query_index)
    )
    token = _ACTIVE.set(replay)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def checkpoint_context() -> tuple[AbstractContextManager[None], AbstractContextManager[None]]:
    """``context_fn`` for ``torch.utils.checkpoint`` (non-reentrant): the recompute records what the
    original forward recorded."""
    return nullcontext(), _replay(_ACTIVE.get())


def attention_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    query_index: torch.Tensor,
) -> torch.Tensor:
    """``[B, H, Q, K]`` attention probabilities of the selected query rows (GQA keys repeated)."""
    batch, heads, _, dim = query.shape
    rows = query.gather(2, query_index[:, None, :, None].expand(batch, heads, -1, dim))
    keys = key.repeat_interleave(heads // key.shape[1], dim=1)
    scores = torch.matmul(rows.float(), keys.float().transpose(-1, -2)) * scaling
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : keys.shape[-2]]
        index = query_index[:, None, :, None].expand(batch, mask.shape[1], -1, mask.shape[-1])
        scores = scores + mask.gather(2, index).float()
    return scores.softmax(-1)


def _capturing(base: str) -> Callable[..., Any]:
    kernel = ALL_ATTENTION_FUNCTIONS[base]

    def capture(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Any]:
        output = kernel(module, query, key, value, attention_mask, *args, **kwargs)
        recording = _ACTIVE.get()
        if recording is not None and module.layer_idx in recording.layers:
            scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
            recording.rows[module.layer_idx] = attention_rows(
                query, key, attention_mask, scaling, recording.query_index
            )
        return output

    return capture


def enable_attention_capture(model: nn.Module) -> None:
    """Route ``model``'s attention through the recording wrapper around its current kernel
    (SDPA, or eager). Forwards outside :func:`record_attention` are unchanged."""
    base = model.config._attn_implementation
    if base.startswith(PREFIX):
        return
    name = PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _capturing(base))
    model.set_attn_implementation(name)
