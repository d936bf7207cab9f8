"""Tokens, processors and loading of the Hugging Face adapters, all offline."""

from __future__ import annotations

import pytest
import torch
from cli_process import assert_one_error_line, invoke
from conftest import ROOT
from hf_models import SMALL, build

from crystalkit.config.loader import load_recipe
from crystalkit.crystal.paths import intact_only
from crystalkit.latents.blocks import END, START, slot_token
from crystalkit.models.hf.base import HFConfig
from crystalkit.models.hf.qwen_vl import Qwen25VLBackbone
from crystalkit.runs.build import build_backbone, build_dataset, build_model

TINY_QWEN = ROOT / "recipes" / "tiny" / "qwen2_5_vl.yaml"


def test_latent_tokens_are_special_initialised_from_a_token_and_recorded_on_the_config():
    _, backbone, method, _ = build("qwen2_5_vl")
    tokenizer = backbone.tokenizer
    ids = method.block.new_token_ids
    tokens = [START, END, *(slot_token(i) for i in range(8))]
    assert tokenizer.convert_tokens_to_ids(tokens) == ids
    # special: never split, never merged with neighbouring text
    assert tokenizer.encode(f"a{slot_token(3)}b", add_special_tokens=False).count(ids[5]) == 1
    assert backbone.model.config.crystalkit_tokens == dict(zip(tokens, ids, strict=True))
    source = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    for matrix in backbone.token_matrices():
        assert torch.equal(matrix[ids], matrix[source].expand(len(ids), -1))
    assert backbone.model.get_input_embeddings().weight.shape[0] == len(tokenizer)


def test_spare_embedding_rows_of_a_checkpoint_are_reused_not_cut():
    """Pretrained Qwen matrices have more rows than the tokenizer has tokens: adding tokens must
    use those rows, never resize the matrices down."""
    _, backbone, _, _ = build("qwen2_5_vl", "latents.schedule.k=0")
    backbone.model.resize_token_embeddings(len(backbone.tokenizer) + 40, mean_resizing=False)
    rows = backbone.model.get_input_embeddings().weight.shape[0]
    ids = backbone.add_tokens(["<x_a>", "<x_b>"], init_from=backbone.tokenizer.eos_token)
    assert backbone.model.get_input_embeddings().weight.shape[0] == rows
    assert max(ids) < rows


def test_train_new_rows_only_masks_every_other_row_of_both_matrices():
    _, backbone, method, samples = build("qwen2_5_vl", "latents.train_new_rows_only=true")
    loss, _ = method.loss(backbone, method.layout(samples, step=0))
    loss.backward()
    new = method.block.new_token_ids
    for matrix in backbone.token_matrices():
        other = torch.ones(matrix.shape[0], dtype=torch.bool)
        other[new] = False
        assert matrix.grad[other].abs().sum() == 0
        assert matrix.grad[new].abs().sum() > 0


def test_xavier_init_of_a_random_model():
    """``init: xavier`` (the tiny recipes) re-initialises every linear layer uniformly within
    the Xavier bound; ``default`` keeps transformers' N(0, 0.02)."""
    for init in ("xavier", "default"):
        _, backbone, _, _ = build("qwen2_5_vl", f"backbone.init={init}")
        resized = {id(m) for m in backbone.token_matrices()}  # grown by the latent tokens
        for name, module in backbone.model.named_modules():
            if not isinstance(module, torch.nn.Linear) or id(module.weight) in resized:
                continue
            fan_out, fan_in = module.weight.shape
            bound = (6 / (fan_in + fan_out)) ** 0.5
            if init == "xavier":
                assert module.weight.abs().max() <= bound, name
                assert module.weight.std() > 0.8 * bound / 3**0.5, name
            elif fan_in + fan_out < 600:  # N(0, 0.02) is far below the bound of small layers
                assert module.weight.std() < 0.5 * bound / 3**0.5, name


def test_preprocessing_accepts_uint8_and_float_and_resizes_to_the_recipe_size():
    _, backbone, _, samples = build("qwen2_5_vl")
    images = torch.stack([s.image for s in samples])
    as_uint8 = backbone.preprocess_images(images)
    as_float = backbone.preprocess_images(images.float() / 255)
    torch.testing.assert_close(as_uint8, as_float)
    patches = (backbone.config.image_size // 8) ** 2
    assert as_uint8.shape == (len(samples), patches, 3 * 2 * 8 * 8)
    larger = torch.nn.functional.interpolate(images.float() / 255, size=(96, 80))
    assert backbone.preprocess_images(larger).shape == as_uint8.shape


def test_pretrained_weights_are_read_straight_onto_the_training_device(tmp_path):
    """A training process reads a checkpoint onto its own device (a GPU: no host copy of the
    whole model per process); ``meta`` stands in for it here, as a device the weights could
    only reach by being placed there while loading."""
    recipe, backbone, _, _ = build("qwen2_5_vl")
    folder = tmp_path / "checkpoint"
    backbone.save_pretrained(folder)
    pretrained = [f"backbone.name_or_path={folder}", "~backbone.config", "backbone.init=default"]
    recipe = load_recipe(TINY_QWEN, [*SMALL, *pretrained])
    dataset = build_dataset(recipe)
    on_meta = build_model(recipe, dataset, device=torch.device("meta")).backbone
    assert {p.device.type for p in on_meta.model.parameters()} == {"meta"}
    assert {p.device.type for p in build_backbone(recipe, dataset).parameters()} == {"cpu"}


def test_from_pretrained_folder_and_saved_assets_reproduce_the_model(tmp_path):
    """``name_or_path`` loads a checkpoint folder (as downloaded from the hub) with
    ``from_pretrained``; a run's saved tokenizer and processor rebuild the same prompt ids."""
    _, backbone, method, samples = build("qwen2_5_vl")
    backbone.eval()
    folder = tmp_path / "checkpoint"
    backbone.model.save_pretrained(folder)
    backbone.tokenizer.save_pretrained(folder)
    backbone.image_processor.save_pretrained(folder)
    config = HFConfig(name_or_path=str(folder), image_size=backbone.config.image_size)
    loaded = Qwen25VLBackbone.create(config, corpus=[]).eval()
    layout = method.layout(samples, step=0)
    assert loaded.tokenizer.convert_tokens_to_ids(START) == method.block.new_token_ids[0]
    torch.testing.assert_close(
        loaded.preprocess_images(samples[0].image[None]), layout.pixel_values[:1]
    )
    with torch.no_grad():
        torch.testing.assert_close(
            intact_only(loaded, layout).intact_logits, intact_only(backbone, layout).intact_logits
        )

    backbone.save_assets(tmp_path / "run")
    again = Qwen25VLBackbone.create(
        backbone.config, corpus=["unrelated words"], assets=tmp_path / "run"
    )
    text = f"{backbone.prompt_prefix} what colour {slot_token(2)} answer : red"
    assert again.tokenizer.encode(text) == backbone.tokenizer.encode(text)
    assert len(again.tokenizer) == len(backbone.tokenizer)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["backbone.name_or_path=Qwen/Qwen2.5-VL-7B-Instruct"], "exactly one of name_or_path"),
        (["backbone.image_size=60"], "not a multiple of patch_size x spatial_merge_size = 16"),
        (
            ["~backbone.config", "backbone.name_or_path=/some/checkpoint"],
            "init applies to config: models",
        ),
        (
            ["backbone.config.text_config.rope_parameters.mrope_section=[2, 2, 2]"],
            "must sum to head_dim / 2 = 8",
        ),
        (["backbone.config.text_config.num_attention_heads=3"], "hidden_size must be divisible"),
        (
            ["~backbone.config", "~backbone.init", "backbone.name_or_path=/no/such/checkpoint"],
            "backbone.name_or_path: cannot load Qwen2_5_VLForConditionalGeneration",
        ),
        (
            [
                "~backbone.config",
                "~backbone.init",
                "backbone.name_or_path=Qwen/No-Such-Model-Offline",
            ],
            "backbone.name_or_path: cannot load",
        ),
    ],
)
def test_bad_backbone_parameters_fail_with_one_line(tmp_path, overrides, expected):
    result = invoke(
        "train",
        str(TINY_QWEN),
        *overrides,
        f"output_dir={tmp_path}",
        "train.steps=1",
        "dataset.train_size=8",
    )
    assert result.exit_code == 2
    assert expected in assert_one_error_line(result)


@pytest.mark.parametrize(
    ("file", "key", "value", "expected"),
    [
        (
            "processor_config.json",
            "image_processor.patch_size",
            4,
            "the image processor's patch_size is 4 but the model config's "
            "vision_config.patch_size is 8",
        ),
        (
            "processor_config.json",
            "image_processor.merge_size",
            1,
            "the image processor's merge_size is 1 but the model config's "
            "vision_config.spatial_merge_size is 2",
        ),
        ("config.json", "image_token_id", 3, "'<|image_pad|>' has id 4 but the model config's "),
    ],
)
def test_a_processor_or_tokenizer_of_another_checkpoint_is_one_line(
    tmp_path, file, key, value, expected
):
    """The placeholder id and the patch / merge sizes are checked when the backbone is built:
    a mismatch would otherwise be a shape error inside the first forward."""
    import json

    from crystalkit.errors import UsageError

    _, backbone, _, _ = build("qwen2_5_vl")
    folder = tmp_path / "checkpoint"
    backbone.save_pretrained(folder)
    data = json.loads((folder / file).read_text())
    *parents, last = key.split(".")
    node = data
    for part in parents:  # the image processor's settings sit inside processor_config.json
        node = node[part]
    node[last] = value
    (folder / file).write_text(json.dumps(data))
    config = HFConfig(name_or_path=str(folder), image_size=backbone.config.image_size)
    with pytest.raises(UsageError) as info:
        Qwen25VLBackbone.create(config, corpus=[])
    message = str(info.value)
    assert expected in message and str(folder) in message and "\n" not in message
