"""Batched greedy answers after the latent block, with a KV cache.

crystalkit decodes itself instead of calling ``generate``: the prompt goes through exactly the
computation training runs (:func:`~crystalkit.crystal.paths.run_intact`: the same layout, the same
latent block, the recurrent loop for recurrent latents), and a loop this small is easier to keep
identical than a generation config.

With generated latents (``eval.latent_block: generated``) the prompt ends at the question and the
same loop writes the latent template, the block and the answer; :func:`split_written` then finds
the answer after the block. A latent replacement acts on the written block (:class:`WrittenBlock`): once
a row has written the template's opening text and the block exactly, the block's cached keys and
values are replaced, and the model goes on writing (closing text, cue, answer) from the replaced
block.

The corrupted path can be decoded too, from a prompt layout that holds both images
(:meth:`~crystalkit.crystal.method.Method.control_layout`): ``copied`` answers from the corrupted
image with the intact path's latent block injected (the corrupted path of training, as the
two-pass strategy computes it), ``no_copy`` from the corrupted image with a latent block that saw
no image (the ``no_copy`` control's path).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from crystalkit.crystal.layout import Layout
from crystalkit.crystal.packing import CORRUPTED_PATH, INTACT_PATH, Segment
from crystalkit.crystal.paths import BLANK_PATH, layout_inputs, run_intact
from crystalkit.crystal.runner import KV, block_kv, run_sequence
from crystalkit.models.backbone import Backbone
from crystalkit.models.compat import cache_layers_kv
from crystalkit.models.masks import additive, causal_allowed


@dataclass
class Generation:
    """``tokens`` ``[B, <= max_new_tokens]`` (pad after each row's stop token) and ``first_logits``
    ``[B, V]``, the distribution the first token was drawn from (the first answer token, unless the
    prompt ends at the question and the model writes its latent block first). ``replaced`` ``[B]``:
    the rows whose written block a :class:`WrittenBlock` replaced (``None`` without one)."""

    tokens: torch.Tensor
    first_logits: torch.Tensor
    replaced: torch.Tensor | None = None


@dataclass
class WrittenBlock:
    """A latent replacement on a block the model writes itself: ``prefix`` is what a row must write first
    (the template's opening text, then the block), the block is ``prefix[start:]``, and ``kv``
    (per layer ``[B, H_kv, len(block), d]``) replaces its cached keys and values as soon as a row
    has written ``prefix`` exactly. The first token after the block is still predicted by the
    block's own last column (computed before the replacement); everything after reads ``kv``, as
    the answer does under a replacement on a forced block."""

    prefix: Sequence[int]
    start: int
    kv: KV

    def replace(self, prompt: Prompt, written: torch.Tensor, past: int) -> torch.Tensor:
        """Write ``kv`` over the block's columns in ``prompt.cache`` for the rows whose
        ``written`` ``[B, len(prefix)]`` tokens are ``prefix`` (``past``: the columns cached
        before the first written token); returns those rows."""
        expected = torch.tensor(list(self.prefix), device=written.device)
        rows = (written == expected).all(-1)
        block = slice(past + self.start, past + len(self.prefix))
        for (keys, values), (k, v) in zip(cache_layers_kv(prompt.cache), self.kv, strict=True):
            if k.shape[-2] != block.stop - block.start:
                raise ValueError(f"{k.shape[-2]} replacement columns for a block of {block}")
            keys[rows, :, block] = k[rows].to(keys.dtype)
            values[rows, :, block] = v[rows].to(values.dtype)
        return rows


#: which path answers: the intact one, or the corrupted one reading copied / image-free latents
View = Literal["intact", "copied", "no_copy"]


@dataclass
class Prompt:
    """A prompt layout run up to its answer cue: the KV cache, the validity mask of the cached
    columns ``[B, P]``, the position of the next token (``[B, 1]`` or ``[3, B, 1]``) and the
    logits after the cue ``[B, V]`` (the first answer token's distribution)."""

    cache: Any
    mask: torch.Tensor
    next_positions: torch.Tensor
    logits: torch.Tensor


def run_prompt(
    backbone: Backbone,
    layout: Layout,
    replacement: Callable[..., Any] | None = None,
    view: View = "intact",
) -> Prompt:
    """Run a prompt layout (``with_answer=False``: rows end at the answer cue) through the path
    ``view`` names. ``replacement(backbone, layout, kv) -> kv`` replaces the latent block's
    per-layer keys and values before the answer cue reads them
    (:mod:`crystalkit.evaluation.replacement`); ``copied`` / ``no_copy`` run the corrupted path of a
    two-image prompt layout."""
    inputs = layout_inputs(backbone, layout)
    if view == "intact":
        path, run, _ = run_intact(backbone, layout, inputs, keep_cache=True)
        block, cue = path.regions[Segment.LATENT], path.regions[Segment.ANSWER_INTACT]
        cols = layout.select(INTACT_PATH)[1]
    else:
        path, run, cols = _corrupted_path(backbone, layout, inputs, view)
        read = Segment.LATENT if view == "copied" else Segment.LATENT_BLANK
        block, cue = path.regions[read], path.regions[Segment.ANSWER_CORRUPTED]
    if replacement is not None and len(block):
        kv = block_kv(run.cache, block)
        run = run_sequence(
            backbone,
            inputs.columns(cols),
            inject=(block, replacement(backbone, layout, kv)),
            keep_cache=True,
        )
    logits = run.logits(range(cue.stop - 1, cue.stop))[:, -1]
    mask = (path.segments != Segment.PAD).long()
    return Prompt(run.cache, mask, run.positions[..., -1:] + 1, logits)


def feed(
    backbone: Backbone, prompt: Prompt, tokens: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, Any]:
    """Feed ``tokens`` ``[B, L]`` (``valid`` marks real ones) after the cached prompt: their
    logits ``[B, L, V]`` and the extended cache."""
    past = prompt.mask.shape[1]
    mask = torch.cat([prompt.mask, valid.long()], dim=1)
    embeds, _ = backbone.embed_inputs(tokens)  # the entry point FSDP registers
    offsets = torch.arange(tokens.shape[1], device=tokens.device)
    out = backbone(
        embeds,
        additive(causal_allowed(mask, past_length=past), embeds.dtype),
        prompt.next_positions + offsets,
        past_key_values=prompt.cache,
        use_cache=True,
    )
    return out.logits, out.past_key_values


@torch.inference_mode()
def generate_answers(
    backbone: Backbone,
    layout: Layout,
    max_new_tokens: int,
    stop_ids: Iterable[int],
    replacement: Callable[..., Any] | None = None,
    view: View = "intact",
    written_block: WrittenBlock | None = None,
) -> Generation:
    """Greedy answers for a prompt layout, through :func:`run_prompt` (same arguments);
    ``written_block``: a replacement on the block the model writes (a prompt that ends at the
    question)."""
    prompt = run_prompt(backbone, layout, replacement, view)
    past = prompt.mask.shape[1]
    logits = prompt.logits
    first_logits = logits.float()
    stop = torch.tensor(sorted(set(stop_ids)), device=logits.device)
    pad_id = backbone.tokenizer.pad_token_id
    generated: list[torch.Tensor] = []
    replaced = None
    finished = torch.zeros(len(layout), dtype=torch.bool, device=logits.device)
    for index in range(max_new_tokens):
        token = logits.argmax(-1)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        generated.append(token)
        finished |= torch.isin(token, stop)
        if index == max_new_tokens - 1 or bool(finished.all()):
            break
        one = torch.ones_like(token[:, None])
        step_logits, cache = feed(backbone, prompt, token[:, None], one)
        logits = step_logits[:, -1]
        prompt = Prompt(cache, torch.cat([prompt.mask, one], 1), prompt.next_positions + 1, logits)
        if written_block is not None and index + 1 == len(written_block.prefix):
            replaced = written_block.replace(prompt, torch.stack(generated, dim=1), past)
    if written_block is not None and replaced is None:  # stopped before the block's end
        replaced = torch.zeros_like(finished)
    return Generation(torch.stack(generated, dim=1), first_logits, replaced)


def split_written(
    row: Sequence[int], written: Sequence[int], cue: Sequence[int], block_end: int | None
) -> tuple[list[int], bool]:
    """The answer part of a generation that began with the latent template, and whether the row
    began with exactly ``written`` (the forced prompt's template, block and cue: then the answer
    is all that follows). Otherwise the answer follows the first answer ``cue`` after the block
    (after the last ``block_end`` marker, or anywhere without one), else everything after the
    block: the answer parser reads whatever the model wrote there."""
    row = list(row)
    if row[: len(written)] == list(written):
        return row[len(written) :], True
    start = 0
    if block_end is not None and block_end in row:
        start = len(row) - row[::-1].index(block_end)
    for i in range(start, len(row) - len(cue) + 1):
        if cue and row[i : i + len(cue)] == list(cue):
            return row[i + len(cue) :], False
    return row[start:], False


def _corrupted_path(
    backbone: Backbone, layout: Layout, inputs: Any, view: View
) -> tuple[Layout, Any, torch.Tensor]:
    """The corrupted path ``A B D F`` with the intact run's D injected (``copied``), or
    ``A B D' F`` (``no_copy``), run with a kept cache; returns (path layout, run, columns)."""
    if view == "no_copy":
        if not layout.has(Segment.LATENT_BLANK):
            raise ValueError("no_copy needs a prompt layout with a blank latent block")
        path, cols = layout.select(BLANK_PATH)
        run = run_sequence(
            backbone, inputs.columns(cols), slots=path.slot_ranges(), keep_cache=True
        )
        return path, run, cols
    if not layout.has(Segment.CORRUPTED):
        raise ValueError("copied needs a prompt layout with the corrupted image")
    intact, intact_run, _ = run_intact(backbone, layout, inputs, keep_cache=True)
    path, cols = layout.select(CORRUPTED_PATH)
    block = path.regions[Segment.LATENT]
    kv = block_kv(intact_run.cache, intact.regions[Segment.LATENT])
    inject = (block, kv) if len(block) else None
    run = run_sequence(backbone, inputs.columns(cols), inject=inject, keep_cache=True)
    return path, run, cols
