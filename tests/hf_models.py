"""Test-size Hugging Face VLMs built from ``recipes/tiny/`` (shared by the tests that use them)."""

from __future__ import annotations

import torch
from conftest import ROOT, THREADS

from crystalkit.build import build_dataset, build_model
from crystalkit.config.loader import load_recipe
from crystalkit.crystal.packing import packed_allowed
from crystalkit.crystal.paths import layout_inputs
from crystalkit.models.masks import additive

FAMILIES = [
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "llava_clip",
    "llava_siglip",
    "idefics3",
    "smolvlm",
]
SMALL = [
    "dataset.image_size=64",
    "dataset.train_size=64",
    "dataset.val_size=8",
    "dataset.test_size=8",
    "train.steps=4",
    "train.batch_size=4",
    f"train.num_threads={THREADS}",
]


def build(family: str, *overrides: str):
    """``(recipe, backbone, method, three training samples)`` of ``recipes/tiny/FAMILY.yaml``."""
    torch.manual_seed(0)
    recipe = load_recipe(ROOT / "recipes" / "tiny" / f"{family}.yaml", [*SMALL, *overrides])
    dataset = build_dataset(recipe)
    model = build_model(recipe, dataset)
    samples = [dataset.split("train")[i] for i in range(3)]
    return recipe, model.backbone, model.method, samples


def own_forward(backbone, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """The model's own top-level forward on one unpadded sample: the reference computation."""
    if hasattr(backbone, "_grid_thw"):  # Qwen-VL: flattened patches + grid + token types
        return backbone.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_grid_thw=backbone._grid_thw[None],
            mm_token_type_ids=(input_ids == backbone.image_token_id).int(),
        ).logits
    return backbone.model(input_ids=input_ids, pixel_values=pixel_values[None]).logits


def chunked_forward(backbone, layout, tail: int) -> tuple[torch.Tensor, object]:
    """``layout`` through ``backbone`` in two cached chunks (all but the last ``tail`` columns,
    then those), with crystalkit's explicit mask and positions: ``(logits, cache)``."""
    inputs = layout_inputs(backbone, layout)
    mask = additive(packed_allowed(layout.segments), inputs.embeds.dtype)
    width = inputs.embeds.shape[1]
    cache = backbone.new_cache()
    logits = []
    for cols in (slice(0, width - tail), slice(width - tail, width)):
        out = backbone(
            inputs.embeds[:, cols],
            mask[:, :, cols, : cols.stop],
            inputs.positions[..., cols],
            past_key_values=cache,
            use_cache=True,
        )
        cache = out.past_key_values
        logits.append(out.logits)
    return torch.cat(logits, 1), cache
