"""Where do the latents look?  Attention maps of one sample and a grounding score over a split.

For a trained run: each latent token's attention over the image tokens (at one decoder layer,
heads averaged, renormalised over the image keys), drawn as heatmaps on the image, next to the
corrupted image and the answer tokens' attention over the latents.

The **grounding score** of a sample is the share of the latents' attention mass that falls on the
queried object's box, divided by the box's share of the image area: 1 means no preference for the
object, higher means the latents look at it. Patches partly inside the box count by the fraction
of their area inside it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from crystalkit.crystal.layout import Layout
from crystalkit.crystal.method import Method
from crystalkit.crystal.packing import INTACT_PATH, Segment
from crystalkit.crystal.paths import layout_inputs, resolve_layers
from crystalkit.crystal.runner import run_sequence
from crystalkit.data.prompt import IGNORE_INDEX
from crystalkit.data.sample import Sample
from crystalkit.errors import UsageError
from crystalkit.io import atomic_write_json, write_user_file
from crystalkit.models.backbone import Backbone
from crystalkit.runs.files import inspect_figure, inspect_file
from crystalkit.runs.load import load_run
from crystalkit.seeding import derived_seed


@dataclass
class SampleAttention:
    """``latent_to_image`` ``[K, rows, cols]`` and ``answer_to_latent`` ``[A, K]`` (rows sum to 1)
    for one sample, plus the answer tokens' text."""

    latent_to_image: torch.Tensor
    answer_to_latent: torch.Tensor
    answer_tokens: list[str]


def _rows(run, request: int, layer: int) -> torch.Tensor:
    return run.attention[(request, layer)].float().mean(1)  # heads averaged: [B, Q, keys]


@torch.inference_mode()
def attention_maps(
    backbone: Backbone, method: Method, samples: list[Sample], layer: int = -1
) -> list[SampleAttention]:
    """Latent -> image and answer -> latent attention for each sample (teacher-forced on the gold
    answer, with the run's final latent block)."""
    grid = backbone.image_grid
    if grid is None:
        raise UsageError(
            "this backbone's image tokens do not form one grid over the whole image (under "
            "backbone.resolution: processor each image is resized, or cropped, its own way): "
            "no attention maps"
        )
    k = method.final_k
    if k == 0:
        raise UsageError("the run has no latent block (K = 0): nothing to inspect")
    backbone.enable_attention_capture()
    (resolved,) = resolve_layers(backbone, (layer,)).values()
    device = next(backbone.parameters()).device
    layout: Layout = method.packer(samples, method.block.ids(k), recurrent=method.block.recurrent)
    layout = layout.to(device)
    intact, cols = layout.select(INTACT_PATH)
    inputs = layout_inputs(backbone, layout).columns(cols)
    block = intact.regions[Segment.LATENT]
    latents = range(block.start + 1, block.stop - 1)  # the K slots, markers excluded
    answer = intact.answer_queries(Segment.ANSWER_INTACT)
    run = run_sequence(
        backbone,
        inputs,
        slots=intact.slot_ranges(),
        queries=[*(range(c, c + 1) for c in latents), answer],
        layers=[resolved],
    )
    is_image = intact.input_ids == backbone.image_token_id  # image columns differ per row
    per_latent = []
    for i in range(len(latents)):
        rows = _rows(run, i, resolved)[:, 0]  # [B, keys up to this latent]
        per_latent.append(rows[is_image[:, : rows.shape[-1]]].view(len(samples), -1))
    to_image = torch.stack(per_latent, dim=1)
    to_image = to_image / to_image.sum(-1, keepdim=True).clamp(min=1e-12)
    to_latent = _rows(run, len(latents), resolved)[:, :, latents.start : latents.stop]
    to_latent = to_latent / to_latent.sum(-1, keepdim=True).clamp(min=1e-12)
    targets = layout.answer_targets()
    tokenizer = backbone.tokenizer
    maps = []
    for row in range(len(samples)):
        keep = targets[row] != IGNORE_INDEX
        maps.append(
            SampleAttention(
                to_image[row].view(len(latents), *grid).cpu(),
                to_latent[row][keep].cpu(),
                tokenizer.convert_ids_to_tokens(targets[row][keep].tolist()),
            )
        )
    return maps


def box_overlap(
    box: tuple[int, int, int, int], image_hw: tuple[int, int], grid: tuple[int, int]
) -> torch.Tensor:
    """``[rows, cols]``: the fraction of each patch's area inside ``box`` (pixels, exclusive ends)."""
    (height, width), (rows, cols) = image_hw, grid
    x0, y0, x1, y1 = box
    ys = torch.arange(rows + 1, dtype=torch.float64) * height / rows
    xs = torch.arange(cols + 1, dtype=torch.float64) * width / cols
    inside_y = (
        torch.minimum(ys[1:], torch.tensor(float(y1)))
        - torch.maximum(ys[:-1], torch.tensor(float(y0)))
    ).clamp(min=0)
    inside_x = (
        torch.minimum(xs[1:], torch.tensor(float(x1)))
        - torch.maximum(xs[:-1], torch.tensor(float(x0)))
    ).clamp(min=0)
    return (inside_y[:, None] * inside_x[None, :]) / ((height / rows) * (width / cols))


def grounding_score(maps: torch.Tensor, overlap: torch.Tensor) -> float:
    """``maps`` ``[K, rows, cols]`` (each sums to 1): mean over latents of the attention mass on
    the box, over the box's share of the image (1 = no preference)."""
    area_share = float(overlap.mean())
    if area_share == 0:
        raise ValueError("the box covers no part of the image")
    mass = (maps.double() * overlap).flatten(1).sum(-1).mean()
    return float(mass) / area_share


def split_grounding(
    backbone: Backbone, method: Method, samples: list[Sample], batch_size: int, layer: int = -1
) -> dict[str, Any]:
    """Mean grounding score over the samples that carry a box."""
    scores: list[float] = []
    boxed = [s for s in samples if s.box is not None]
    for start in range(0, len(boxed), batch_size):
        batch = boxed[start : start + batch_size]
        for sample, maps in zip(batch, attention_maps(backbone, method, batch, layer), strict=True):
            overlap = box_overlap(sample.box, tuple(sample.image.shape[-2:]), backbone.image_grid)
            scores.append(grounding_score(maps.latent_to_image, overlap))
    if not scores:
        raise UsageError("no sample of this split has an object box: no grounding score")
    return {"grounding": sum(scores) / len(scores), "num_samples": len(scores), "layer": layer}


def sample_figure(
    backbone: Backbone, method: Method, sample: Sample, index: int, layer: int = -1
) -> bytes:
    """:func:`figure` for ``sample`` (the ``index``-th of its split, which seeds its corrupted
    view as evaluation does): what ``crystalkit inspect`` draws and the loggers show."""
    (maps,) = attention_maps(backbone, method, [sample], layer)
    corrupted = method.corrupt([sample], derived_seed(method.recipe.seed, -1 - index))[0]
    return figure(sample, corrupted, maps)


@dataclass(frozen=True)
class Inspection:
    """What ``crystalkit inspect`` wrote: the figure, and the grounding summary (``None`` when
    not asked for)."""

    figure: Path
    grounding: dict[str, Any] | None


def inspect_run_dir(
    run_dir: Path,
    sample: int = 0,
    split: str = "test",
    out: Path | None = None,
    layer: int = -1,
    grounding: bool = True,
    max_samples: int | None = None,
) -> Inspection:
    """Draw the ``sample``-th sample of ``split`` (:func:`sample_figure`) to ``out`` (default
    ``RUN_DIR/inspect_SPLIT_I.png``); with ``grounding``, score the grounding over the split's
    first ``max_samples`` (default ``eval.max_samples``) into ``RUN_DIR/inspect_SPLIT.json``."""
    recipe, dataset, backbone, method, step = load_run(run_dir)
    backbone.eval()
    data = dataset.split(split)
    if not 0 <= sample < len(data):
        raise UsageError(f"--sample: {split} has samples 0..{len(data) - 1}, got {sample}")
    target = out or run_dir / inspect_figure(split, sample)
    write_user_file(target, sample_figure(backbone, method, data[sample], sample, layer), "--out")
    if not grounding:
        return Inspection(target, None)
    total = min(max_samples or recipe.eval.max_samples or len(data), len(data))
    summary = split_grounding(
        backbone, method, [data[i] for i in range(total)], recipe.eval.batch_size, layer
    )
    atomic_write_json(run_dir / inspect_file(split), {"step": step, "split": split, **summary})
    return Inspection(target, summary)


def figure(sample: Sample, corrupted: torch.Tensor, maps: SampleAttention) -> bytes:
    """PNG: intact and corrupted image, each latent's attention over the image, and the answer
    tokens' attention over the latents."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = maps.latent_to_image.shape[0]
    columns = max(k, 3)
    fig, axes = plt.subplots(2, columns, figsize=(2.0 * columns, 4.6), layout="constrained")
    image = sample.image.permute(1, 2, 0).numpy()
    height, width = image.shape[:2]
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(image)
    axes[0, 0].set_title("intact", fontsize=8)
    axes[0, 1].imshow(corrupted.permute(1, 2, 0).clamp(0, 1).numpy())
    axes[0, 1].set_title("corrupted", fontsize=8)
    answer = axes[0, 2]
    answer.axis("on")
    answer.imshow(maps.answer_to_latent.numpy(), cmap="viridis", vmin=0, aspect="auto")
    answer.set_xticks(range(k), [str(i) for i in range(k)], fontsize=6)
    answer.set_yticks(range(len(maps.answer_tokens)), maps.answer_tokens, fontsize=6)
    answer.set_title("answer → latents", fontsize=8)
    for i in range(k):
        ax = axes[1, i]
        ax.imshow(image)
        ax.imshow(
            maps.latent_to_image[i].numpy(),
            cmap="magma",
            alpha=0.55,
            extent=(0, width, height, 0),
            interpolation="nearest",
        )
        if sample.box is not None:
            x0, y0, x1, y1 = sample.box
            ax.add_patch(
                plt.Rectangle(
                    (x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, color="cyan", linewidth=1
                )
            )
        ax.set_title(f"latent {i}", fontsize=8)
    fig.suptitle(f"{sample.question}  →  {sample.answer_text}", fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
