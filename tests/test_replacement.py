"""Latent replacement: replacing the latent block's keys/values goes through the same generation path."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from cli_process import assert_one_error_line, invoke

from crystalkit.crystal.method import Method
from crystalkit.evaluation.generation import generate_answers
from crystalkit.evaluation.replacement import BUILTIN, dataset_mean_kv, mean_replacement
from crystalkit.runs.build import build_backbone, build_dataset


@pytest.mark.parametrize("family", ["token", "recurrent"])
def test_replacements_replace_exactly_the_latent_block(tiny_recipe, family):
    torch.manual_seed(0)
    recipe = tiny_recipe("latents.schedule.k=3", f"latents.family={family}")
    dataset = build_dataset(recipe)
    backbone = build_backbone(recipe, dataset)
    method = Method(recipe, backbone)
    backbone.eval()
    samples = [dataset.split("val")[i] for i in range(4)]
    layout = method.prompt_layout(samples)

    def first(replacement=None, lay=layout):
        return generate_answers(backbone, lay, 1, [-1], replacement).first_logits

    plain = first()
    torch.testing.assert_close(first(lambda b, lay, kv: kv), plain, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(first(BUILTIN["zero"]), plain, atol=1e-4)
    shuffled = first(BUILTIN["shuffle"])
    assert not torch.allclose(shuffled, plain, atol=1e-4)
    # swapping images among identical images changes nothing; among different ones it does
    same = replace(layout, pixel_values=layout.pixel_values[:1].expand_as(layout.pixel_values))
    torch.testing.assert_close(
        first(BUILTIN["swap"], same), first(None, same), atol=1e-5, rtol=1e-4
    )
    assert not torch.allclose(first(BUILTIN["swap"]), plain, atol=1e-4)
    # the mean over one sample is that sample's own block
    one = method.prompt_layout(samples[:1])
    own = mean_replacement(dataset_mean_kv(backbone, [one]))
    torch.testing.assert_close(first(own, one), first(None, one), atol=1e-5, rtol=1e-4)


def test_replace_command_reports_accuracy_drops(tiny_recipe):
    from crystalkit.training.trainer import train

    run_dir = train(tiny_recipe("name=replaced", "train.steps=2", "latents.schedule.k=2")).run_dir
    result = invoke("eval", run_dir, "--replace", "zero,mean,shuffle,swap", "--max-samples", "16")
    assert result.exit_code == 0, result.output
    summary = json.loads((run_dir / "replacements_test.json").read_text())
    assert set(summary["accuracy"]) == {"none", "zero", "mean", "shuffle", "swap"}
    for name, drop in summary["drop"].items():
        assert drop == pytest.approx(summary["accuracy"]["none"] - summary["accuracy"][name])
    repeated = invoke(
        "eval", run_dir, "--replace", "zero", "--replace", "swap", "--max-samples", "16"
    )
    assert repeated.exit_code == 0, repeated.output
    again = json.loads((run_dir / "replacements_test.json").read_text())
    assert set(again["accuracy"]) == {"none", "zero", "swap"}  # repeated options add up
    line = assert_one_error_line(invoke("eval", run_dir, "--replace", "zeros"))
    assert "unknown latent replacement(s) zeros" in line
    no_latents = train(tiny_recipe("name=plain", "train.steps=2")).run_dir
    assert "nothing to replace" in assert_one_error_line(
        invoke("eval", no_latents, "--replace", "zero")
    )


def test_box_overlap_and_grounding_score_against_hand_values():
    from crystalkit.evaluation.inspect import box_overlap, grounding_score

    # 8x8 image, 2x2 grid of 4x4 patches; box covers the top-left patch and half of the top-right
    overlap = box_overlap((0, 0, 6, 4), (8, 8), (2, 2))
    assert overlap.tolist() == [[1.0, 0.5], [0.0, 0.0]]
    uniform = torch.full((3, 2, 2), 0.25)
    assert grounding_score(uniform, overlap) == pytest.approx(1.0)
    on_box = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    assert grounding_score(on_box, overlap) == pytest.approx(1.0 / (1.5 / 4))
    off_box = torch.tensor([[[0.0, 0.0], [0.5, 0.5]]])
    assert grounding_score(off_box, overlap) == 0.0


def test_inspect_draws_a_figure_and_scores_grounding(tiny_recipe, tmp_path):
    from crystalkit.training.trainer import train

    run_dir = train(tiny_recipe("name=inspected", "train.steps=2", "latents.schedule.k=2")).run_dir
    target = tmp_path / "maps.png"
    result = invoke("inspect", run_dir, "--sample", "3", "--out", target, "--max-samples", "16")
    assert result.exit_code == 0, result.output
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((run_dir / "inspect_test.json").read_text())
    assert summary["num_samples"] == 16 and summary["grounding"] >= 0
    assert "--sample" in assert_one_error_line(invoke("inspect", run_dir, "--sample", "999"))


def test_latent_maps_are_distributions_over_the_image_grid(tiny_recipe):
    from crystalkit.evaluation.inspect import attention_maps

    torch.manual_seed(0)
    recipe = tiny_recipe("latents.schedule.k=3", "latents.family=recurrent")
    dataset = build_dataset(recipe)
    backbone = build_backbone(recipe, dataset)
    method = Method(recipe, backbone)
    samples = [dataset.split("val")[i] for i in range(2)]
    maps = attention_maps(backbone.eval(), method, samples)
    for m in maps:
        assert m.latent_to_image.shape == (3, *backbone.image_grid)
        torch.testing.assert_close(m.latent_to_image.sum((1, 2)), torch.ones(3))
        torch.testing.assert_close(m.answer_to_latent.sum(-1), torch.ones(len(m.answer_tokens)))


def test_controls_land_in_results_and_match_the_eval_command(tiny_recipe):
    from crystalkit.training.trainer import train

    controls = "eval.controls=[corrupted, copied, no_copy, zero, mean, shuffle, swap]"
    recipe = tiny_recipe(
        "name=controlled", "train.steps=2", "method=crystal", "latents.schedule.k=2", controls
    )
    run_dir = train(recipe).run_dir
    results = json.loads((run_dir / "results.json").read_text())
    assert list(results["controls"]) == [
        "corrupted",
        "copied",
        "no_copy",
        "zero",
        "mean",
        "shuffle",
        "swap",
    ]
    samples = str(recipe.eval.max_samples or recipe.dataset.params["test_size"])
    for latents in ("own", "copied", "no_copy"):
        shown = invoke(
            "eval", run_dir, "--corrupted", "--latents", latents, "--max-samples", samples
        )
        assert shown.exit_code == 0, shown.output
        name = "corrupted" if latents == "own" else latents
        suffix = "" if latents == "own" else f"_{latents}"
        saved = json.loads((run_dir / f"eval_test_corrupted{suffix}.json").read_text())
        assert saved["accuracy"] == results["controls"][name]
    line = assert_one_error_line(invoke("eval", run_dir, "--latents", "copied"))
    assert "add --corrupted" in line


def test_controls_without_a_latent_block_keep_only_the_corrupted_view(tiny_recipe):
    from crystalkit.training.trainer import train

    recipe = tiny_recipe("name=plain", "train.steps=1", "eval.controls=[corrupted, copied, zero]")
    results = json.loads((train(recipe).run_dir / "results.json").read_text())
    assert list(results["controls"]) == ["corrupted"]
