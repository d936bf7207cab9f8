"""Latent replacement: does the answer actually use the latent block?

Each replacement re-runs evaluation with the latent block's per-layer keys and values replaced
(the block's content in both latent families: it is what the answer reads), then decodes as usual:

* ``zero`` — all zeros;
* ``mean`` — the mean block over the evaluated samples (no sample-specific information);
* ``shuffle`` — another sample's block (rolled by one across the batch): other image, other question;
* ``swap`` — the block computed from another sample's image with this sample's own question.

A large accuracy drop says the answer depends on what the latents computed; no drop says the
gain, if any, comes from the template (a critique several follow-up studies raise).

With generated latents the same replacement acts on the block the model writes itself
(:func:`written_replacement`): the replacement is computed from the forced prompt, whose block the
model writes token for token when it writes the template exactly; a row that does not write it has
no block to replace and answers as without the replacement (``replaced: false`` in its
prediction).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from crystalkit.crystal.layout import Layout
from crystalkit.crystal.method import Method
from crystalkit.crystal.packing import Segment
from crystalkit.crystal.paths import layout_inputs, run_intact
from crystalkit.crystal.runner import KV, block_kv
from crystalkit.data.sample import Sample
from crystalkit.errors import UsageError
from crystalkit.evaluation.generation import WrittenBlock
from crystalkit.models.backbone import Backbone

REPLACEMENTS = ("zero", "mean", "shuffle", "swap")

#: ``(backbone, prompt layout, the block's own KV) -> replacement KV``
LatentReplacement = Callable[[Backbone, Layout, KV], KV]


@torch.inference_mode()
def latent_kv(backbone: Backbone, layout: Layout) -> KV:
    """The latent block's per-layer keys/values ``[B, H_kv, K, d]`` for a prompt layout."""
    intact, run, _ = run_intact(backbone, layout, layout_inputs(backbone, layout), keep_cache=True)
    return block_kv(run.cache, intact.regions[Segment.LATENT])


def _zero(backbone: Backbone, layout: Layout, kv: KV) -> KV:
    return [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in kv]


def _shuffle(backbone: Backbone, layout: Layout, kv: KV) -> KV:
    return [(k.roll(1, dims=0), v.roll(1, dims=0)) for k, v in kv]


def _swap(backbone: Backbone, layout: Layout, kv: KV) -> KV:
    if layout.image_grid is not None:
        raise UsageError(
            "the swap replacement moves images between samples; under backbone.resolution: "
            "processor their grids differ (use resolution: fixed)"
        )
    other = replace(layout, pixel_values=layout.pixel_values.roll(1, dims=0))
    return latent_kv(backbone, other)


def written_replacement(
    backbone: Backbone,
    method: Method,
    samples: Sequence[Sample],
    replacement: LatentReplacement,
    corrupt_seed: int | None,
    device: torch.device,
) -> WrittenBlock:
    """``replacement`` for the block the model writes in generated mode: its replacement keys and
    values, computed on the forced prompt of the same samples (images corrupted with
    ``corrupt_seed`` as the generated prompt's are)."""
    forced = method.prompt_layout(samples, corrupt_seed=corrupt_seed).to(device)
    prefix, start = method.written_prefix()
    return WrittenBlock(prefix, start, replacement(backbone, forced, latent_kv(backbone, forced)))


def mean_replacement(mean: KV) -> LatentReplacement:
    """The ``mean`` replacement for a mean block (:func:`dataset_mean_kv`)."""

    def replace_with_mean(backbone: Backbone, layout: Layout, kv: KV) -> KV:
        return [
            (mk.expand_as(k), mv.expand_as(v)) for (mk, mv), (k, v) in zip(mean, kv, strict=True)
        ]

    return replace_with_mean


def dataset_mean_kv(backbone: Backbone, layouts: Sequence[Layout]) -> KV:
    """The mean latent block over all samples of ``layouts``."""
    sums: KV | None = None
    count = 0
    for layout in layouts:
        kv = latent_kv(backbone, layout)
        batch = [(k.sum(0, keepdim=True), v.sum(0, keepdim=True)) for k, v in kv]
        sums = (
            batch
            if sums is None
            else [(a + k, b + v) for (a, b), (k, v) in zip(sums, batch, strict=True)]
        )
        count += len(layout)
    assert sums is not None, "no samples"
    return [(k / count, v / count) for k, v in sums]


BUILTIN: dict[str, LatentReplacement] = {"zero": _zero, "shuffle": _shuffle, "swap": _swap}
