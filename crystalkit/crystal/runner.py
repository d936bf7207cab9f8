"""Run one sequence through a backbone, filling recurrent latent slots on the way.

Everything CrystaL computes — the packed sequence, either pass of the two-pass form, the
intact-only path of direct finetuning and the generation prompt at evaluation — is one call of
:func:`run_sequence`, so training and evaluation cannot drift apart.

Without recurrent slots a sequence is one forward. With them it is cut into chunks at each slot:
the last-layer hidden state at the column before a slot becomes that slot's input embedding
(Coconut), and a KV cache carries the prefix, so nothing is recomputed. A column range can also be
*injected*: its keys and values come from another run (the two-pass form's latent copy).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from crystalkit.crystal.packing import packed_allowed
from crystalkit.models.attention_capture import AttentionRecording, record_attention
from crystalkit.models.backbone import Backbone
from crystalkit.models.compat import cache_layers_kv
from crystalkit.models.masks import additive

KV = list[tuple[torch.Tensor, torch.Tensor]]


def block_kv(cache: Any, block: range) -> KV:
    """Per-layer keys and values of the columns ``block`` of a run's KV cache (what an
    injection or a latent replacement swaps in)."""
    return [
        (k[:, :, block.start : block.stop], v[:, :, block.start : block.stop])
        for k, v in cache_layers_kv(cache)
    ]


@dataclass
class Inputs:
    """A laid-out batch as the language model reads it, every tensor column-aligned: segment labels
    ``[B, T]``, input embeddings ``[B, T, D]``, position ids ``[..., B, T]`` (``[B, T]``, or
    ``[3, B, T]`` for multimodal RoPE) and optional per-layer additions ``[L, B, T, D]``."""

    segments: torch.Tensor
    embeds: torch.Tensor
    positions: torch.Tensor
    layer_inputs: torch.Tensor | None = None

    def columns(self, cols: torch.Tensor | slice) -> Inputs:
        """The same batch restricted to ``cols`` (a path, or a chunk of one)."""
        extra = None if self.layer_inputs is None else self.layer_inputs[:, :, cols]
        return Inputs(
            self.segments[:, cols], self.embeds[:, cols], self.positions[..., cols], extra
        )


@dataclass
class SequenceRun:
    """Per-chunk outputs of :func:`run_sequence`, addressed by column."""

    logits_chunks: list[tuple[range, torch.Tensor]]
    hidden_chunks: list[tuple[range, torch.Tensor]]
    cache: Any
    positions: torch.Tensor
    #: ``(query request, layer) -> [B, H, |query|, keys]`` attention probabilities
    attention: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    #: recurrent slot column -> the input embedding it received ``[B, D]``
    slot_inputs: dict[int, torch.Tensor] = field(default_factory=dict)

    @staticmethod
    def _find(chunks: list[tuple[range, torch.Tensor]], cols: range) -> torch.Tensor:
        for span, values in chunks:
            if span.start <= cols.start and cols.stop <= span.stop:
                return values[:, cols.start - span.start : cols.stop - span.start]
        raise ValueError(f"columns {cols} are not inside one computed chunk")

    def logits(self, cols: range) -> torch.Tensor:
        return self._find(self.logits_chunks, cols)

    def logits_at(self, cols: Sequence[int]) -> torch.Tensor:
        """Logits ``[B, len(cols), V]`` of any computed columns, in the order given."""
        return torch.stack([self.logits(range(c, c + 1))[:, 0] for c in cols], dim=1)

    def hidden(self, cols: range) -> torch.Tensor:
        """Last-layer hidden states (requires ``hidden=True``)."""
        return self._find(self.hidden_chunks, cols)


def run_sequence(
    backbone: Backbone,
    inputs: Inputs,
    *,
    slots: Sequence[range] = (),
    inject: tuple[range, KV] | None = None,
    queries: Sequence[range] = (),
    layers: Sequence[int] = (),
    hidden: bool = False,
    keep_cache: bool = False,
) -> SequenceRun:
    """Forward ``inputs`` (the mask follows from their segments). ``slots``: recurrent latent
    columns; ``inject``: a column range and its per-layer keys/values; ``queries``: column ranges
    whose attention rows are recorded at ``layers`` (each range must lie between two slots);
    ``hidden``: keep last-layer hidden states."""
    length = inputs.embeds.shape[1]
    allowed = packed_allowed(inputs.segments)
    slot_cols = {c for r in slots for c in r}
    skip = inject[0] if inject is not None and len(inject[0]) else None
    stops = sorted(slot_cols | ({skip.start} if skip else set()))
    cache = backbone.new_cache() if keep_cache or slot_cols or skip else None
    run = SequenceRun([], [], cache, inputs.positions)
    t = 0
    while t < length:
        if skip is not None and t == skip.start:
            for i, (keys, values) in enumerate(inject[1]):
                run.cache.update(keys, values, i)
            t = skip.stop
            continue
        end = next((c for c in stops if c > t), length)
        chunk = inputs.columns(slice(t, end))
        inside = [
            (j, q) for j, q in enumerate(queries) if len(q) and t <= q.start and q.stop <= end
        ]
        with _recording(inside, layers, t, inputs.embeds) or nullcontext() as rec:
            out = backbone(
                _chunk_embeds(run, chunk, t),
                additive(allowed[:, t:end, :end], inputs.embeds.dtype),
                chunk.positions,
                past_key_values=run.cache,
                use_cache=run.cache is not None,
                output_hidden_states=hidden or end in slot_cols,
                layer_inputs=chunk.layer_inputs,
            )
        _keep(run, range(t, end), out, hidden, feeds_slot=end in slot_cols)
        if rec is not None:
            _keep_attention(run, rec, inside, layers)
        t = end
    return run


def _chunk_embeds(run: SequenceRun, chunk: Inputs, start: int) -> torch.Tensor:
    """The input embeddings of a chunk that begins at column ``start``; at a recurrent slot its
    first column is the hidden state the slot receives."""
    if start not in run.slot_inputs:
        return chunk.embeds
    slot = run.slot_inputs[start][:, None].to(chunk.embeds.dtype)
    return torch.cat([slot, chunk.embeds[:, 1:]], 1)


def _recording(
    inside: list[tuple[int, range]], layers: Sequence[int], start: int, embeds: torch.Tensor
) -> AbstractContextManager[AttentionRecording] | None:
    """A recorder of the attention rows of the query ranges ``inside`` a chunk that begins at
    column ``start`` (``None`` when the chunk records nothing)."""
    if not (inside and layers):
        return None
    index = torch.cat([torch.arange(q.start - start, q.stop - start) for _, q in inside])
    return record_attention(layers, index.to(embeds.device).expand(len(embeds), -1))


def _keep(run: SequenceRun, span: range, out: Any, hidden: bool, feeds_slot: bool) -> None:
    """Keep a chunk's logits, its last-layer hidden states (with ``hidden``), the input of the
    slot right after it (``feeds_slot``: its last hidden state) and the extended cache."""
    run.logits_chunks.append((span, out.logits))
    if out.hidden_states is not None:
        last = out.hidden_states[-1]
        if hidden:
            run.hidden_chunks.append((span, last))
        if feeds_slot:
            run.slot_inputs[span.stop] = last[:, -1]
    if out.past_key_values is not None:
        run.cache = out.past_key_values


def _keep_attention(
    run: SequenceRun,
    recording: AttentionRecording,
    inside: list[tuple[int, range]],
    layers: Sequence[int],
) -> None:
    """Split a chunk's recorded attention rows (per layer: the query ranges ``inside`` it one
    after the other) into :attr:`SequenceRun.attention`, by query request and layer."""
    offset = 0
    for j, q in inside:
        for layer in layers:
            run.attention[(j, layer)] = recording.rows[layer][:, :, offset : offset + len(q)]
        offset += len(q)
