"""Warm start: a run begins with its source's exact weights and latent tokens (LoRA merged), keeps
working after the source is gone, and refuses a source that does not fit in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_process import assert_one_error_line, invoke
from conftest import ROOT, TINY
from hf_models import SMALL
from PIL import Image

from crystalkit.crystal.paths import Needs
from crystalkit.evaluation.saved import evaluate_run_dir
from crystalkit.runs import checkpoint as ckpt
from crystalkit.runs.build import build_dataset, build_model
from crystalkit.runs.files import SNAPSHOT_DIR
from crystalkit.runs.load import load_run_model
from crystalkit.runs.snapshot import read_record, write_snapshot
from crystalkit.training.trainer import train
from crystalkit.training.warm_start import load_source

CRYSTAL = ["method=crystal", "latents.schedule.k=3", "objectives={kl: {fraction: 1.0}}"]
SHORT = ["train.steps=3", "train.lr=1e-2", "eval.max_samples=8"]


def _source(tiny_recipe, *overrides: str) -> Path:
    return train(tiny_recipe(*SHORT, "name=source", *overrides)).run_dir


def _warm(tiny_recipe, source: Path, *overrides: str):
    """A warm-started recipe, its run dir with the snapshot written, and its built model."""
    recipe = tiny_recipe(*SHORT, "name=warm", f"warm_start.source={source}", *overrides)
    dataset = build_dataset(recipe)
    run_dir = Path(recipe.output_dir) / recipe.name
    source = load_source(recipe, dataset)
    write_snapshot(source.backbone, source.record, run_dir)
    return recipe, run_dir, build_model(recipe, dataset, assets=run_dir)


def _answer_logits(backbone, method, samples) -> torch.Tensor:
    backbone.eval()
    with torch.no_grad():
        return method.strategy(backbone, method.layout(samples, step=0), Needs()).intact_logits


def test_a_warm_start_has_the_sources_weights_and_latent_tokens(tiny_recipe):
    source = _source(tiny_recipe, *CRYSTAL)
    _, _, trained, _ = load_run_model(source)
    # the new recipe needs two more latent tokens than the source has
    _, run_dir, warm = _warm(tiny_recipe, source, *CRYSTAL, "latents.schedule.k=5")
    theirs, ours = trained.backbone.state_dict(), warm.backbone.state_dict()
    vocab = len(trained.backbone.tokenizer)
    for name, value in theirs.items():
        if value.shape == ours[name].shape:
            assert torch.equal(value, ours[name]), name
        else:  # the token matrices grew by the two new tokens; the source's rows are kept
            assert torch.equal(value, ours[name][:vocab]), name
    old, new = trained.method.block.new_token_ids, warm.method.block.new_token_ids
    assert new[: len(old)] == old  # <latent_start>, <latent_end>, <latent_0..2> keep their ids
    matrix, eos = warm.backbone.token_matrices()[0], warm.backbone.tokenizer.eos_token_id
    for row in new[len(old) :]:  # <latent_3>, <latent_4>: copies of the trained eos row
        assert torch.equal(matrix[row], matrix[eos])
    record = read_record(run_dir / SNAPSHOT_DIR)
    assert record["source"] == str(source.resolve()) and record["step"] == 3
    assert record["fingerprint"] == ckpt.state_fingerprint(trained.backbone.state_dict())


def test_a_lora_source_is_merged_first(tiny_recipe):
    source = _source(tiny_recipe, "lora.enabled=true", "lora.r=4", "latents.schedule.k=2")
    _, dataset, lora, _ = load_run_model(source)
    samples = [dataset.split("test")[i] for i in range(4)]
    expected = _answer_logits(lora.backbone, lora.method, samples)
    _, run_dir, warm = _warm(tiny_recipe, source, "latents.schedule.k=2")
    assert warm.peft is None and read_record(run_dir / SNAPSHOT_DIR)["lora_merged"] is True
    torch.testing.assert_close(
        _answer_logits(warm.backbone, warm.method, samples), expected, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("merge", [False, True], ids=["adapter-export", "merged-export"])
def test_a_warm_start_from_an_export_folder_is_the_exported_model(tiny_recipe, tmp_path, merge):
    from crystalkit.export import export_run

    source = _source(tiny_recipe, "lora.enabled=true", "lora.r=4", "latents.schedule.k=2")
    _, dataset, lora, _ = load_run_model(source)
    samples = [dataset.split("test")[i] for i in range(4)]
    expected = _answer_logits(lora.backbone, lora.method, samples)
    exported = export_run(source, tmp_path / "export", merge=merge)
    _, _, warm = _warm(tiny_recipe, exported, "latents.schedule.k=2")
    torch.testing.assert_close(
        _answer_logits(warm.backbone, warm.method, samples), expected, rtol=1e-5, atol=1e-5
    )


def test_a_warm_started_run_resumes_and_evaluates_after_its_source_is_deleted(tiny_recipe):
    source = _source(tiny_recipe)
    recipe = tiny_recipe(
        *SHORT, *CRYSTAL, "name=warm", f"warm_start.source={source}", "train.save_every=1"
    )
    train(recipe, stop_after=2)
    shutil.rmtree(source)
    result = train(recipe, resume=True)
    assert result.steps == 3 and result.final is not None
    results = json.loads((result.run_dir / "results.json").read_text())
    assert results["warm_start"]["source"] == str(source.resolve())
    assert evaluate_run_dir(result.run_dir, "test", 8).num_samples == 8
    # and an uninterrupted run from the same source is the same run
    assert not source.exists()


def test_a_warm_started_lora_run_resumes_from_its_snapshot(tiny_recipe):
    """A LoRA run's checkpoints hold only adapters: its frozen base is the source, rebuilt from
    the run's own snapshot (the fingerprint check would refuse any other base)."""
    source = _source(tiny_recipe)
    lora = ["lora.enabled=true", "lora.r=4", "train.save_every=1", "latents.schedule.k=2"]
    recipe = tiny_recipe(*SHORT, *lora, "name=warm", f"warm_start.source={source}")
    train(recipe, stop_after=1)
    shutil.rmtree(source)
    assert train(recipe, resume=True).final is not None


def _llava_source(tmp_path: Path) -> Path:
    """A finetune run on a LLaVA-style data file whose words the synthetic data never uses."""
    (tmp_path / "img").mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "img" / "a.png")
    records = [
        {
            "id": str(i),
            "image": "img/a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nwhich hue dominates ?"},
                {"from": "gpt", "value": "crimson"},
            ],
        }
        for i in range(8)
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    result = invoke(
        "train",
        ROOT / "recipes" / "direct_finetune.yaml",
        *TINY,
        f"output_dir={tmp_path / 'runs'}",
        "name=llava",
        f"dataset={{name: llava_json, train: {tmp_path / 'data.json'}, holdout: 2, image_size: 32}}",
        "train.steps=1",
    )
    assert result.exit_code == 0, result.output
    return tmp_path / "runs" / "llava"


def test_sources_that_do_not_fit_are_one_line_errors(tiny_recipe, tmp_path):
    source = _source(tiny_recipe)
    base = [
        "train",
        ROOT / "recipes" / "direct_finetune.yaml",
        *TINY,
        f"output_dir={tmp_path / 'new'}",
        "train.steps=1",
    ]
    cases = [
        (f"warm_start.source={tmp_path / 'nowhere'}", "does not exist (expected a run directory"),
        (f"warm_start.source={tmp_path}", "no recipe.yaml; not a crystalkit run directory"),
        (f"warm_start.source={source}", "has backbone.hidden_size=32, this recipe 48"),
        (
            f"warm_start.source={_llava_source(tmp_path)}",
            "vocabulary has no token for '1', which this recipe's dataset uses",
        ),
    ]
    existing = invoke(*base)  # a finished run that the failed attempts must not touch
    assert existing.exit_code == 0, existing.output
    results = tmp_path / "new" / "direct_finetune" / "results.json"
    kept = results.read_text()
    for override, expected in cases:
        extra = ["backbone.hidden_size=48"] if "hidden_size" in expected else []
        line = assert_one_error_line(invoke(*base, override, *extra, "--overwrite"))
        assert line.startswith("error: warm_start.source: ") and expected in line, line
        assert results.read_text() == kept  # bad input loses nothing


@pytest.mark.slow
def test_warm_start_and_stages_on_the_test_size_qwen2_5_vl(tmp_path):
    """The paper's regime on its architecture: a finetuned Qwen2.5-VL, then a staged run from it
    (finetune, then CrystaL), which loads without its source."""
    recipe = ROOT / "recipes" / "tiny" / "qwen2_5_vl.yaml"
    common = [*SMALL, f"output_dir={tmp_path}", "eval.max_samples=4", "eval.batch_size=4"]
    source = invoke("train", recipe, *common, "name=ft", "method=finetune", "latents.schedule.k=0")
    assert source.exit_code == 0, source.output
    staged = [
        *common,
        "name=regime",
        f"warm_start.source={tmp_path / 'ft'}",
        "train.save_every=1",
        "train.log_every=2",
        "stages=[{name: finetune, fraction: 0.5, method: finetune, latents: {schedule: {k: 0}}},"
        " {name: crystal}]",
    ]
    first = invoke("train", recipe, *staged, "train.steps=4")
    assert first.exit_code == 0, first.output
    records = [json.loads(x) for x in (tmp_path / "regime" / "metrics.jsonl").open()]
    assert [r["stage"] for r in records if "loss" in r] == ["finetune", "crystal"]
    assert "loss/kl" in records[-2] and "loss/attention" in records[-2]
    shutil.rmtree(tmp_path / "ft")
    _, _, model, step = load_run_model(tmp_path / "regime")
    assert step == 4 and model.method.final_k == 8
