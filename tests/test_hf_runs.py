"""A Qwen2.5-VL run through the CLI end to end: LoRA training (vision tower included), evaluation,
generation, and the merged export reloading with the LoRA model's outputs."""

from __future__ import annotations

import json

import pytest
import torch
from cli_process import invoke
from conftest import ROOT
from hf_models import SMALL

from crystalkit.crystal.paths import intact_only
from crystalkit.runs.load import load_run

RECIPE = ROOT / "recipes" / "tiny" / "qwen2_5_vl.yaml"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_runs")
    result = invoke(
        "train",
        RECIPE,
        *SMALL,
        f"output_dir={root}",
        "train.steps=2",
        "eval.max_samples=4",
        "eval.batch_size=4",
        "lora.enabled=true",
        "lora.r=4",
        "latents.train_new_rows_only=true",
    )
    assert result.exit_code == 0, result.output
    return root / "qwen2_5_vl"


def _logits(run):
    recipe, dataset, backbone, method, _ = load_run(run)
    samples = [dataset.split("test")[i] for i in range(3)]
    backbone.eval()
    with torch.no_grad():
        return intact_only(backbone, method.layout(samples, step=recipe.train.steps)).intact_logits


def test_lora_run_generates_what_evaluation_predicts(run_dir, tmp_path):
    """``crystalkit generate`` on raw image files gives the answers ``crystalkit eval`` decoded
    for the same test images (same processor path, same latent computation)."""
    from PIL import Image

    results = json.loads((run_dir / "results.json").read_text())
    assert results["num_samples"] == 4
    evaluated = invoke("eval", run_dir, "--split", "test", "--max-samples", "3")
    assert evaluated.exit_code == 0, evaluated.output
    predictions = [
        json.loads(line) for line in (run_dir / "predictions_test.jsonl").read_text().splitlines()
    ]
    _, dataset, _, _, _ = load_run(run_dir)
    rows = []
    for i in range(3):
        sample = dataset.split("test")[i]
        image = tmp_path / f"test_{i}.png"
        Image.fromarray(sample.image.permute(1, 2, 0).numpy()).save(image)
        rows.append({"image": str(image), "question": sample.question, "options": sample.options})
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps(row) + "\n" for row in rows))
    generated = invoke("generate", run_dir, "--input", queries, "--json")
    assert generated.exit_code == 0, generated.output
    answers = [json.loads(line) for line in generated.stdout.splitlines()]
    assert [a["answer"] for a in answers] == [p["raw"] for p in predictions]
    assert [a["choice"] for a in answers] == [p["prediction"] for p in predictions]


def test_merged_export_gives_the_lora_models_outputs(run_dir, tmp_path):
    exported = invoke("export", run_dir, "--merge", "--out", tmp_path / "merged")
    assert exported.exit_code == 0, exported.output
    lora, merged = _logits(run_dir), _logits(tmp_path / "merged")
    torch.testing.assert_close(merged, lora, atol=1e-5, rtol=1e-4)
    recipe, _, backbone, _, _ = load_run(tmp_path / "merged")
    assert not recipe.lora.enabled
    assert not any("lora" in name for name, _ in backbone.named_parameters())


def test_merged_export_is_a_from_pretrained_folder(run_dir, tmp_path):
    """``pretrained/`` loads as ``backbone.name_or_path`` (as with any hub checkpoint) and gives
    the merged model's outputs; its config records the latent token ids."""
    from crystalkit.models.hf.base import HFConfig
    from crystalkit.models.hf.qwen_vl import Qwen25VLBackbone

    assert invoke("export", run_dir, "--merge", "--out", tmp_path / "merged").exit_code == 0
    recipe, dataset, backbone, method, _ = load_run(tmp_path / "merged")
    folder = tmp_path / "merged" / "pretrained"
    config = HFConfig(name_or_path=str(folder), image_size=recipe.backbone.params["image_size"])
    loaded = Qwen25VLBackbone.create(config, corpus=[]).eval()
    assert loaded.model.config.crystalkit_tokens["<latent_start>"] == method.block.new_token_ids[0]
    samples = [dataset.split("test")[i] for i in range(3)]
    layout = method.layout(samples, step=recipe.train.steps)
    with torch.no_grad():
        torch.testing.assert_close(
            intact_only(loaded, layout).intact_logits,
            intact_only(backbone.eval(), layout).intact_logits,
            atol=1e-5,
            rtol=1e-4,
        )
