"""The two ways to compute both paths, and the intact path alone.

* :func:`packed` — the reference's single forward over ``A B C D E [D'] F``.
* :func:`two_pass` — the intact pass ``A C D E``, then the corrupted pass ``A B D F`` with D's
  per-layer keys and values copied from the intact pass (or ``A B D' F`` for ``no_copy``).
* :func:`intact_only` — ``A C D E``: direct finetuning, and the computation evaluation repeats.

All three embed the whole laid-out batch once (every image through the encoder in one call, so
batch-statistics layers see the same batch either way) and cut their paths out of it, which is why
the strategies give the same losses and gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from crystalkit.crystal.layout import Layout
from crystalkit.crystal.packing import (
    BLANK_PATH,
    CORRUPTED_PATH,
    INTACT_PATH,
    Segment,
    sequence_positions,
)
from crystalkit.crystal.runner import Inputs, SequenceRun, block_kv, run_sequence
from crystalkit.models.backbone import Backbone
from crystalkit.objectives.functional import latent_attention
from crystalkit.objectives.outputs import PathOutputs

S = Segment


@dataclass(frozen=True)
class Needs:
    """What the objectives read besides logits: attention rows at ``layers`` (negative indices
    count from the last layer) and last-layer hidden states."""

    layers: tuple[int, ...] = ()
    hidden: bool = False


Strategy = Callable[[Backbone, Layout, Needs], PathOutputs]
#: one path's (answer logits, latent attention rows per layer, answer hidden states)
Side = tuple[torch.Tensor, dict[int, torch.Tensor], torch.Tensor | None]


def resolve_layers(backbone: Backbone, layers: tuple[int, ...]) -> dict[int, int]:
    """Requested layer index -> decoder layer (``-1`` = last); out-of-range is a ``ValueError``."""
    n = backbone.num_layers
    bad = [layer for layer in layers if not -n <= layer < n]
    if bad:
        raise ValueError(f"attention layers {bad} out of range for a {n}-layer model")
    return {layer: layer % n for layer in layers}


def _latent_rows(probs: torch.Tensor, keys: range) -> torch.Tensor:
    mask = torch.zeros(probs.shape[0], probs.shape[-1], dtype=torch.bool, device=probs.device)
    mask[:, keys.start : keys.stop] = True
    return latent_attention(probs, mask)


def _side(
    run: SequenceRun, query: range, request: int, keys: range, layers: dict[int, int], hidden: bool
) -> Side:
    attention = {}
    if len(keys):
        attention = {
            asked: _latent_rows(run.attention[(request, layer)], keys)
            for asked, layer in layers.items()
        }
    return run.logits(query), attention, run.hidden(query) if hidden else None


def _written(
    layout: Layout, owners: dict[str, tuple[SequenceRun, torch.Tensor | None]]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The written template's ``(logits, targets)`` per owner (:meth:`Layout.written_pairs`),
    the logits read from the run that computed the owner's query columns: ``owners`` maps an
    owner to that run and the packed columns it ran over (``None``: all of them)."""
    written = {}
    for owner, (queries, targets) in layout.written_pairs().items():
        if owner not in owners:
            continue
        run, cols = owners[owner]
        index = queries.tolist()
        if cols is not None:
            where = {c: i for i, c in enumerate(cols.tolist())}
            index = [where[q] for q in index]
        written[owner] = (run.logits_at(index), layout.labels[:, targets])
    return written


def layout_inputs(backbone: Backbone, layout: Layout) -> Inputs:
    """Embed a whole laid-out batch once (all its images in one encoder call) with its positions;
    paths are column cuts of the result. With ``layout.detach_corrupted_image`` the corrupted
    image's features (and per-layer additions) carry no gradient back to the vision encoder."""
    grids = layout.image_grids()
    per_image = {} if grids is None else {"image_grid": grids}
    embeds, layer_inputs = backbone.embed_inputs(
        layout.input_ids, layout.image_pixels(), **per_image
    )
    if layout.detach_corrupted_image and layout.has(S.CORRUPTED):
        cut = (layout.segments == S.CORRUPTED) & (layout.input_ids == backbone.image_token_id)
        embeds = torch.where(cut[..., None], embeds.detach(), embeds)
        if layer_inputs is not None:
            layer_inputs = torch.where(cut[None, ..., None], layer_inputs.detach(), layer_inputs)
    valid = layout.segments != S.PAD
    order = sequence_positions(layout.segments)
    per_row = {} if layout.image_grid is None else {"image_grid": layout.image_grid}
    positions = backbone.position_ids(layout.input_ids, order, valid, **per_row)
    return Inputs(layout.segments, embeds, positions, layer_inputs)


def run_intact(
    backbone: Backbone,
    layout: Layout,
    inputs: Inputs,
    needs: Needs = Needs(),
    keep_cache: bool = False,
) -> tuple[Layout, SequenceRun, dict[int, int]]:
    """The intact path ``A C D E`` of a laid-out batch (whose packed inputs are ``inputs``)."""
    intact, cols = layout.select(INTACT_PATH)
    layers = resolve_layers(backbone, needs.layers)
    run = run_sequence(
        backbone,
        inputs.columns(cols),
        slots=intact.slot_ranges(),
        queries=[intact.answer_queries(S.ANSWER_INTACT)],
        layers=sorted(set(layers.values())),
        hidden=needs.hidden,
        keep_cache=keep_cache,
    )
    return intact, run, layers


def _intact_side(intact: Layout, run: SequenceRun, layers: dict[int, int], needs: Needs) -> Side:
    """The intact path's side, from :func:`run_intact`'s path layout and run."""
    queries = intact.answer_queries(S.ANSWER_INTACT)
    return _side(run, queries, 0, intact.regions[S.LATENT], layers, needs.hidden)


def _intact_owners(layout: Layout, run: SequenceRun) -> dict[str, tuple[SequenceRun, torch.Tensor]]:
    """The written owners the intact path's run computes (for :func:`_written`): its own
    columns, and the latent block D, which it computes for both paths."""
    cols = layout.select(INTACT_PATH)[1]
    return {"intact": (run, cols), "shared": (run, cols)}


def intact_only(backbone: Backbone, layout: Layout, needs: Needs = Needs()) -> PathOutputs:
    intact, run, layers = run_intact(backbone, layout, layout_inputs(backbone, layout), needs)
    written = {}
    if layout.written is not None:
        written = _written(layout, _intact_owners(layout, run))
    return _pair(layout, _intact_side(intact, run, layers, needs), written=written)


def packed(backbone: Backbone, layout: Layout, needs: Needs = Needs()) -> PathOutputs:
    layers = resolve_layers(backbone, needs.layers)
    e, f = layout.answer_queries(S.ANSWER_INTACT), layout.answer_queries(S.ANSWER_CORRUPTED)
    run = run_sequence(
        backbone,
        layout_inputs(backbone, layout),
        slots=layout.slot_ranges(),
        queries=[e, f],
        layers=sorted(set(layers.values())),
        hidden=needs.hidden,
    )
    read = S.LATENT_BLANK if layout.has(S.LATENT_BLANK) else S.LATENT
    intact = _side(run, e, 0, layout.regions[S.LATENT], layers, needs.hidden)
    corrupted = _side(run, f, 1, layout.regions[read], layers, needs.hidden)
    written = _written(layout, dict.fromkeys(("intact", "corrupted", "shared"), (run, None)))
    return _pair(layout, intact, corrupted, written)


def two_pass(backbone: Backbone, layout: Layout, needs: Needs = Needs()) -> PathOutputs:
    inputs = layout_inputs(backbone, layout)
    blank = layout.has(S.LATENT_BLANK)
    intact_layout, intact_run, layers = run_intact(
        backbone, layout, inputs, needs, keep_cache=not blank
    )
    corrupted_layout, cols = layout.select(BLANK_PATH if blank else CORRUPTED_PATH)
    inject = None
    if not blank:
        kv = block_kv(intact_run.cache, intact_layout.regions[S.LATENT])
        inject = (corrupted_layout.regions[S.LATENT], kv)
    f = corrupted_layout.answer_queries(S.ANSWER_CORRUPTED)
    corrupted_run = run_sequence(
        backbone,
        inputs.columns(cols),
        slots=corrupted_layout.slot_ranges(),
        inject=inject,
        queries=[f],
        layers=sorted(set(layers.values())),
        hidden=needs.hidden,
    )
    read = S.LATENT_BLANK if blank else S.LATENT
    intact = _intact_side(intact_layout, intact_run, layers, needs)
    corrupted = _side(corrupted_run, f, 0, corrupted_layout.regions[read], layers, needs.hidden)
    written = {}
    if layout.written is not None:
        owners = {**_intact_owners(layout, intact_run), "corrupted": (corrupted_run, cols)}
        written = _written(layout, owners)
    return _pair(layout, intact, corrupted, written)


def _pair(
    layout: Layout,
    intact: Side,
    corrupted: Side = (None, {}, None),
    written: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> PathOutputs:
    return PathOutputs(
        targets=layout.answer_targets(),
        intact_logits=intact[0],
        corrupted_logits=corrupted[0],
        intact_attention=intact[1],
        corrupted_attention=corrupted[1],
        intact_hidden=intact[2],
        corrupted_hidden=corrupted[2],
        num_latents=len(layout.regions[S.LATENT]),
        written=written or {},
    )


STRATEGIES: dict[str, Strategy] = {"packed": packed, "two_pass": two_pass}
