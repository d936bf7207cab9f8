"""``backbone.resolution``: the Qwen-VL image processor's own resizing (a grid per image), the
``fixed`` square that stays as it was, ``crystal.corrupt_at``, and native-size benchmark images."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from cli_process import invoke
from conftest import ROOT
from hf_models import SMALL, build, intact_answer_rows, own_forward
from PIL import Image
from transformers import Qwen2VLImageProcessor

from crystalkit.crystal.packing import Segment
from crystalkit.crystal.paths import layout_inputs
from crystalkit.errors import RecipeError, UsageError
from crystalkit.evaluation.benchfiles import read_jsonl
from crystalkit.evaluation.saved import bench_resolution
from crystalkit.models.backbone import resize_unit
from crystalkit.seeding import derived_seed

PIXELS = ["backbone.min_pixels=256", "backbone.max_pixels=4096"]
PROCESSOR = ["backbone.resolution=processor", *PIXELS]
#: non-square, of different sizes and aspect ratios (height, width)
SIZES = [(40, 90), (70, 30)]


def _native(samples):
    """The first two samples with non-square random images of :data:`SIZES`."""
    generator = torch.Generator().manual_seed(0)
    images = [
        torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in SIZES
    ]
    return [dataclasses.replace(s, image=i) for s, i in zip(samples, images, strict=False)]


def _reference_processor(backbone) -> Qwen2VLImageProcessor:
    vision = backbone.model.config.vision_config
    return Qwen2VLImageProcessor(
        patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size,
        merge_size=vision.spatial_merge_size,
        min_pixels=256,
        max_pixels=4096,
    )


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_processor_resolution_grids_and_the_models_own_forward(family):
    """Two non-square images of different sizes: each gets the grid Qwen2VLImageProcessor
    computes, and the packed intact path's logits are the model's own top-level forward on that
    sample with the processor's pixel values and image_grid_thw (deepstack included)."""
    _, backbone, method, samples = build(family, *PROCESSOR)
    backbone.eval()
    samples = _native(samples)
    layout = method.layout(samples, step=0)
    processor = _reference_processor(backbone)
    references = [processor(images=[s.image], return_tensors="pt") for s in samples]
    grids = torch.cat([r["image_grid_thw"] for r in references])
    assert grids[0].tolist() != grids[1].tolist()  # the premise: two different grids
    assert torch.equal(layout.image_grid, grids)
    merge = backbone.model.config.vision_config.spatial_merge_size
    with torch.no_grad():
        rows = intact_answer_rows(backbone, layout)
        for reference, (ids, got, cols) in zip(references, rows, strict=True):
            tokens = int(reference["image_grid_thw"][0].prod()) // merge**2
            assert int((ids == backbone.image_token_id).sum()) == tokens
            own = backbone.model(
                input_ids=ids,
                pixel_values=reference["pixel_values"],
                image_grid_thw=reference["image_grid_thw"],
                mm_token_type_ids=(ids == backbone.image_token_id).int(),
            ).logits
            torch.testing.assert_close(got, own[0, cols], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("corrupt_at", ["sample", "model_input"])
def test_both_paths_share_the_grid(corrupt_at):
    """The corrupted image is resized like the intact one: same grid, same placeholder count and
    the same (tied) M-RoPE positions on both image segments; a CrystaL step runs."""
    _, backbone, method, samples = build(
        "qwen2_5_vl", *PROCESSOR, f"crystal.corrupt_at={corrupt_at}"
    )
    samples = _native(samples)
    corrupted = method.corrupt(samples, seed=0)
    if corrupt_at == "model_input":  # corrupted at the processor's size, not the native one
        assert [tuple(c.shape[-2:]) for c in corrupted] == [
            backbone.input_size(h, w) for h, w in SIZES
        ]
    layout = method.layout(samples, step=0)
    real = layout.image_grid.prod(-1)
    for pixels in (layout.pixel_values, layout.corrupted_pixels):
        assert pixels.shape[1] == int(real.max())
    for row, count in enumerate(real.tolist()):  # both paths' real patches, then zero padding
        assert layout.corrupted_pixels[row, count:].abs().sum() == 0
        assert layout.corrupted_pixels[row, :count].abs().sum() > 0
    image = layout.input_ids == backbone.image_token_id
    positions = layout_inputs(backbone, layout).positions
    for row in range(len(samples)):
        b = image[row] & (layout.segments[row] == Segment.CORRUPTED)
        c = image[row] & (layout.segments[row] == Segment.INTACT)
        assert int(b.sum()) == int(c.sum()) == int(real[row]) // 4
        assert torch.equal(positions[:, row, b], positions[:, row, c])
    loss, terms = method.loss(backbone, layout)
    assert torch.isfinite(loss)
    assert {"ce_intact", "ce_corrupted"} <= set(terms)


@pytest.mark.parametrize("resolution", [PROCESSOR, []], ids=["processor", "fixed"])
def test_packed_equals_two_pass_with_grids(resolution):
    """Both strategies cut the same per-image grids (``processor``), or resize the same native
    images to the square (``fixed``): the same losses."""
    losses = []
    for strategy in ("packed", "two_pass"):
        _, backbone, method, samples = build(
            "qwen2_5_vl", *resolution, f"crystal.strategy={strategy}"
        )
        with torch.no_grad():
            _, terms = method.loss(backbone, method.layout(_native(samples), step=0))
        losses.append({k: v.item() for k, v in terms.items()})
    for key, value in losses[0].items():
        assert losses[1][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_fixed_is_the_square_image_size():
    """``resolution: fixed`` (the default): no grids, every image ``image_size`` squared, and
    ``corrupt_at: model_input`` is ``sample`` when the dataset already holds that size."""
    recipe, backbone, method, samples = build("qwen2_5_vl")
    assert recipe.backbone.params.get("resolution", "fixed") == "fixed"
    assert not backbone.resizes_itself
    layout = method.layout(samples, step=0)
    assert layout.image_grid is None
    per_row = (layout.input_ids == backbone.image_token_id).sum(1)
    assert per_row.tolist() == [2 * backbone.num_image_tokens] * len(samples)
    assert samples[0].image.shape[-1] == backbone.config.image_size  # the premise
    _, _, other, _ = build("qwen2_5_vl", "crystal.corrupt_at=model_input")
    assert torch.equal(method.corrupt(samples, 3), other.corrupt(samples, 3))


def test_native_images_at_fixed_resolution_are_corrupted_then_resized():
    """Images kept at their native sizes (``llava_json`` with ``image_size: null``) under
    ``resolution: fixed``: ``corrupt_at: sample`` corrupts each at its own size and the backbone
    then resizes both paths to its square (the released blur-then-resize), checked against a
    one-image-at-a-time reference; ``model_input`` resizes first, which changes the corrupted
    pixels and leaves the intact ones alone."""
    recipe, backbone, method, samples = build("qwen2_5_vl")
    samples = _native(samples)
    size = backbone.config.image_size
    layout = method.layout(samples, step=0)
    squares = [resize_unit(s.image[None], size) for s in samples]
    assert torch.equal(layout.pixel_values, backbone.preprocess_images(torch.cat(squares)))
    generator = torch.Generator().manual_seed(derived_seed(recipe.seed, 0))
    corrupted = [method.corruption(s.image[None].float() / 255.0, generator) for s in samples]
    reference = torch.cat([resize_unit(c, size) for c in corrupted])
    torch.testing.assert_close(layout.corrupted_pixels, backbone.preprocess_images(reference))
    _, _, resize_first, _ = build("qwen2_5_vl", "crystal.corrupt_at=model_input")
    other = resize_first.layout(samples, step=0)
    assert torch.equal(other.pixel_values, layout.pixel_values)
    gap = (other.corrupted_pixels - layout.corrupted_pixels).abs().max()
    assert gap > 0.05  # the order matters: not a rounding difference


def test_processor_resolution_is_refused_where_unsupported():
    with pytest.raises(UsageError) as caught:
        build("idefics3", "backbone.resolution=processor")
    message = str(caught.value)
    assert "\n" not in message
    assert "backbone.resolution: processor is not supported by" in message
    with pytest.raises(RecipeError, match="min_pixels / max_pixels apply to resolution"):
        build("qwen2_5_vl", *PIXELS)
    with pytest.raises(UsageError, match="LLaVA's image processor has no pixel bounds"):
        build("llava_clip", *PROCESSOR)


@pytest.mark.parametrize("family", ["llava_clip", "llava_siglip"])
def test_llava_processor_resolution_is_the_checkpoints_image_processor(family):
    """LLaVA under ``processor``: two non-square native images go through the family's own image
    processor (CLIP: shortest edge, then centre crop; SigLIP: to the square), and the packed
    intact path's logits are the model's own forward on that processor's pixel values; both
    paths keep the fixed token count, and ``corrupt_at: model_input`` corrupts at the size the
    processor resizes to before cropping."""
    _, backbone, method, samples = build(family, "backbone.resolution=processor")
    backbone.eval()
    samples = _native(samples)
    size = backbone.config.image_size
    if family == "llava_clip":
        reference = transformers.CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
    else:
        reference = transformers.SiglipImageProcessor(size={"height": size, "width": size})
    expected = reference(images=[s.image for s in samples], return_tensors="pt")["pixel_values"]
    layout = method.layout(samples, step=0)
    torch.testing.assert_close(layout.pixel_values, expected)
    assert layout.corrupted_pixels.shape == expected.shape and layout.image_grid is None
    per_row = (layout.input_ids == backbone.image_token_id).sum(1)
    assert per_row.tolist() == [2 * backbone.num_image_tokens] * len(samples)
    with torch.no_grad():
        for row, (ids, got, cols) in enumerate(intact_answer_rows(backbone, layout)):
            own = own_forward(backbone, ids, expected[row])
            torch.testing.assert_close(got, own[0, cols], atol=1e-5, rtol=1e-4)
    _, _, model_input, _ = build(
        family, "backbone.resolution=processor", "crystal.corrupt_at=model_input"
    )
    corrupted = model_input.corrupt(samples, seed=0)
    shapes = [tuple(c.shape[-2:]) for c in corrupted]
    if family == "llava_clip":  # the shortest edge at image_size, the aspect kept
        assert [min(shape) for shape in shapes] == [size, size]
        assert [h > w for h, w in shapes] == [h > w for h, w in SIZES]
    else:
        assert shapes == [(size, size)] * 2
    assert model_input.layout(samples, step=0).corrupted_pixels.shape == expected.shape


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bench_images_keep_their_native_size(tmp_path: Path):
    (tmp_path / "a.png").write_bytes(_png(90, 40))
    line = {"id": "q", "image": "a.png", "question": "?", "options": ["x", "y"], "answer": "A"}
    path = tmp_path / "bench.jsonl"
    path.write_text(json.dumps(line) + "\n")
    assert read_jsonl(path, tmp_path, None)[0][0].image.shape == (3, 40, 90)
    assert read_jsonl(path, tmp_path, 32)[0][0].image.shape == (3, 32, 32)


@pytest.mark.parametrize(
    ("backbone", "flag", "expected"),
    [
        ({"name": "qwen2_5_vl", "name_or_path": "some/checkpoint"}, None, "processor"),
        ({"name": "qwen2_5_vl", "name_or_path": "some/checkpoint"}, "fixed", "fixed"),
        ({"name": "qwen2_5_vl", "config": {}}, None, None),
        ({"name": "llava", "name_or_path": "some/checkpoint"}, None, "processor"),
        ({"name": "idefics3", "name_or_path": "some/checkpoint"}, None, None),
    ],
)
def test_bench_resolution_default(tmp_path: Path, backbone, flag, expected):
    """``eval --bench``: processor for a pretrained Qwen-VL or LLaVA checkpoint unless forced;
    otherwise the recipe's."""
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"backbone": backbone}))
    assert bench_resolution(tmp_path, flag) == expected
    with pytest.raises(UsageError, match="--resolution"):
        bench_resolution(tmp_path, "native")


def test_eval_bench_at_processor_resolution(tmp_path: Path):
    """``eval --bench --resolution processor`` on a trained tiny Qwen2.5-VL run: native-size
    images of different aspect ratios go through evaluation (prompts, generation) and the
    summary records the resolution; ``--resolution`` without ``--bench`` is refused."""
    result = invoke(
        "train",
        ROOT / "recipes" / "tiny" / "qwen2_5_vl.yaml",
        *SMALL,
        f"output_dir={tmp_path}",
        "train.steps=1",
        "eval.max_samples=2",
        "eval.batch_size=2",
    )
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "qwen2_5_vl"
    lines = []
    for i, (height, width) in enumerate(SIZES):
        (tmp_path / f"{i}.png").write_bytes(_png(width, height))
        lines.append(
            {
                "id": str(i),
                "image": f"{i}.png",
                "question": "?",
                "options": ["x", "y"],
                "answer": "A",
            }
        )
    bench = tmp_path / "native.jsonl"
    bench.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    result = invoke("eval", run_dir, "--bench", bench, "--resolution", "processor")
    assert result.exit_code == 0, result.output
    summary = json.loads((run_dir / "bench_native.json").read_text())
    assert summary["num_samples"] == 2 and summary["resolution"] == "processor"
    refused = invoke("eval", run_dir, "--resolution", "processor")
    assert refused.exit_code != 0 and "--resolution applies to --bench" in refused.output
