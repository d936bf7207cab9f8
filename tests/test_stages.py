"""Stages: lengths that always add up, stage sections merged and stored resolved, one-line
errors, per-stage schedules and optimizers, fresh latent rows, and bit-exact resumes mid-stage
and across a stage boundary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from cli_process import assert_one_error_line, invoke
from conftest import ROOT
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from crystalkit.config.loader import dump_recipe, load_recipe
from crystalkit.config.schema import stage_steps
from crystalkit.config.stages import plan_stages, stage_at
from crystalkit.runs import checkpoint as ckpt
from crystalkit.runs import files
from crystalkit.training.trainer import train

SCRATCH = ROOT / "recipes" / "crystal_scratch.yaml"
#: finetune for half the steps, then CrystaL with its own learning rate and KL gated off halfway
STAGED = [
    "method=crystal",
    "latents.schedule.k=3",
    "objectives={kl: {fraction: 1.0}, attention: {}}",
    "stages=[{name: finetune, fraction: 0.5, method: finetune, latents: {schedule: {k: 0}}}, "
    "{name: crystal, train: {lr: 5.0e-4, warmup_ratio: 0.0}, "
    "objectives: {attention: null, kl: {weight: {name: gate, until: 0.5}}}}]",
]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


@given(
    st.lists(st.integers(1, 50), min_size=1, max_size=6),
    st.integers(1, 5000),
)
def test_stage_lengths_always_add_up_to_the_run(weights, steps):
    fractions = [w / sum(weights) for w in weights]
    lengths = stage_steps(fractions, steps)
    assert sum(lengths) == steps and all(n >= 0 for n in lengths)
    bounds = [sum(lengths[: i + 1]) for i in range(len(lengths))]
    total = 0.0
    for fraction, bound in zip(fractions[:-1], bounds[:-1], strict=True):
        total += fraction
        assert abs(bound - total * steps) <= 0.5 + 1e-6


def test_stage_sections_merge_over_the_recipe_and_are_stored_resolved(tiny_recipe, tmp_path):
    recipe = tiny_recipe(*STAGED, "train.steps=10")
    finetune, crystal = recipe.stages
    assert (finetune.fraction, crystal.fraction) == (0.5, 0.5)  # the open fraction takes the rest
    assert finetune.method == "finetune" and finetune.latents.schedule.params == {"k": 0}
    assert crystal.method == "crystal" and crystal.latents.schedule.params == {"k": 3}
    assert crystal.train.lr == 5.0e-4 and finetune.train.lr == recipe.train.lr
    assert crystal.objectives["attention"] is None  # dropped in this stage
    assert crystal.objectives["kl"].params == {
        "fraction": 1.0,
        "min_count": 1,
        "stop_gradient": True,
    }
    assert crystal.objectives["kl"].weight.name == "gate"
    # the resolved recipe loads back to itself (what a run directory stores and resumes from)
    saved = tmp_path / "recipe.yaml"
    saved.write_text(dump_recipe(recipe))
    assert load_recipe(saved) == recipe

    first, second = plan_stages(recipe)
    assert (first.start, first.steps, second.start, second.steps) == (0, 5, 5, 5)
    assert set(second.recipe.objectives) == {"kl"} and second.recipe.train.steps == 5
    assert first.recipe.method == "finetune" and first.recipe.stages == []
    assert stage_at([first, second], 4) is first and stage_at([first, second], 5) is second
    assert stage_at([first, second], 10) is second


def test_a_recipe_without_stages_is_one_stage(tiny_recipe):
    recipe = tiny_recipe()
    (stage,) = plan_stages(recipe)
    assert (stage.name, stage.start, stage.steps, stage.recipe) == ("train", 0, 8, recipe)


def test_overrides_address_stages_by_name(tiny_recipe):
    recipe = tiny_recipe(*STAGED, "stages.crystal.train.lr=1e-4", "stages.finetune.fraction=0.25")
    assert recipe.stages[1].train.lr == 1e-4
    assert (recipe.stages[0].fraction, recipe.stages[1].fraction) == (0.25, 0.75)
    # a top-level change reaches every stage that does not set the key itself
    recipe = tiny_recipe(*STAGED, "corruption.name=mask")
    assert all(stage.corruption.name == "mask" for stage in recipe.stages)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("stages.crystal.train.steps=3", "stages.crystal.train.steps: not a per-stage key"),
        ("stages.crystal.seed=3", "stages.crystal.seed: not a stage key"),
        ("stages.crystal.latents.init_from=x", "stages.crystal.latents.init_from: not a per-stage"),
        ("stages.crystal.fraction=0.9", "stages: the fractions must add up to 1, got 1.4"),
        ("stages.crystal.name=finetune", "stage names must be unique, 'finetune' repeats"),
        ("stages.crystal.corruption.name=blurr", "stages.crystal.corruption.name: unknown"),
        ("stages.crystal.objectives.kl.weight=-1", "stages.crystal.objectives.kl.weight: must be"),
        ("stages.finetune.fraction=0.0005", "stages.finetune.fraction: 0.0005 of train.steps"),
        ("stages.nope.fraction=0.5", "use an index or one of the names finetune, crystal"),
        ("stages.0.name=two words", "stages.0.name: must be a word"),
    ],
)
def test_bad_stages_are_one_line_errors(override, expected):
    line = assert_one_error_line(invoke("recipe", "show", SCRATCH, *STAGED, override))
    assert expected in line, line


def test_recipe_show_prints_every_stage_resolved():
    shown = invoke("recipe", "show", SCRATCH, *STAGED)
    assert shown.exit_code == 0
    stages = yaml.safe_load(shown.stdout)["stages"]
    assert [s["name"] for s in stages] == ["finetune", "crystal"]
    for stage in stages:
        assert {"method", "latents", "corruption", "crystal", "objectives", "train"} <= set(stage)
        assert stage["train"]["lr"] > 0 and stage["corruption"]["name"] == "blur"


def test_each_stage_runs_its_own_method_schedules_and_optimizer(tiny_recipe):
    run_dir = train(tiny_recipe(*STAGED, "train.steps=8", "train.log_every=1")).run_dir
    records = [r for r in _records(run_dir) if "loss" in r]
    assert [r["stage"] for r in records] == ["finetune"] * 4 + ["crystal"] * 4
    assert [r["k"] for r in records] == [0] * 4 + [3] * 4
    assert (
        "loss/ce" in records[0] and "loss/kl" in records[4] and "loss/attention" not in records[4]
    )
    assert [r["weight/kl"] for r in records[4:]] == [1.0, 1.0, 0.0, 0.0]  # gated at its half
    # a fresh cosine schedule per stage: the crystal stage starts at its own peak (no warmup)
    assert records[3]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert records[4]["lr"] == pytest.approx(
        5.0e-4 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi / 4)).item())
    )
    meta = json.loads((ckpt.latest_checkpoint(run_dir).path / files.CHECKPOINT_META).read_text())
    assert meta == {"step": 8, "stage": "crystal"}
    results = json.loads((run_dir / "results.json").read_text())
    assert results["stages"] == [
        {"name": "finetune", "start": 0, "steps": 4},
        {"name": "crystal", "start": 4, "steps": 4},
    ]


def test_a_stage_starts_its_new_latent_rows_from_the_current_init_token(tiny_recipe):
    """Rows unused so far (they only drift through the tied output head) start the stage that
    first uses them as copies of the trained eos row, as a fresh run on these weights would."""
    recipe = tiny_recipe(
        *STAGED, "train.steps=8", "train.save_every=4", "stages.crystal.train.lr=1e-12"
    )
    train(recipe, stop_after=4)
    from crystalkit.runs.load import load_run

    _, _, backbone, method, _ = load_run(recipe_dir := Path(recipe.output_dir) / recipe.name)
    matrix = backbone.token_matrices()[0].detach()
    eos = backbone.tokenizer.eos_token_id
    rows = method.block.new_token_ids
    assert not torch.allclose(matrix[rows], matrix[eos].expand(len(rows), -1))  # the premise
    train(recipe, resume=True, stop_after=5)
    _, _, backbone, _, _ = load_run(recipe_dir)
    after = backbone.token_matrices()[0].detach()
    torch.testing.assert_close(after[rows], after[eos].expand(len(rows), -1), rtol=0, atol=1e-9)


@pytest.mark.parametrize("interrupt", [3, 4, 6], ids=["mid-first", "boundary", "mid-second"])
def test_a_staged_run_resumes_exactly(tiny_recipe, interrupt):
    full = train(tiny_recipe(*STAGED, "name=full", "train.steps=8")).run_dir
    interrupted = tiny_recipe(*STAGED, "name=cut", "train.steps=8", f"train.save_every={interrupt}")
    train(interrupted, stop_after=interrupt)
    resumed = train(interrupted, resume=True).run_dir
    a = load_file(str(ckpt.latest_checkpoint(full).path / files.CHECKPOINT_WEIGHTS))
    b = load_file(str(ckpt.latest_checkpoint(resumed).path / files.CHECKPOINT_WEIGHTS))
    assert all(torch.equal(a[k], b[k]) for k in a)

    def logged(run_dir: Path) -> list[dict]:  # every log_every (2) steps; the cut adds a record
        return [
            {k: v for k, v in r.items() if k != "samples_per_s"}
            for r in _records(run_dir)
            if r["step"] % 2 == 0
        ]

    assert logged(full) == logged(resumed)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resetting_token_rows_writes_where_the_model_reads_them(tiny_recipe, lora):
    """Full weights: the matrices themselves; LoRA: peft's trainable-token table, which is what
    the forward reads for those rows."""
    from crystalkit.latents.blocks import reset_token_rows
    from crystalkit.runs.build import build_dataset, build_model

    extra = ["lora.enabled=true", "lora.r=4"] if lora else []
    recipe = tiny_recipe(*STAGED, *extra)
    model = build_model(recipe, build_dataset(recipe))
    backbone, (_, crystal) = model.backbone, model.stage_methods
    rows = list(model.introduced[1])
    assert rows and set(rows) <= set(crystal.block.new_token_ids)
    eos = backbone.tokenizer.eos_token
    ids = torch.tensor([[*rows, backbone.tokenizer.eos_token_id]])
    with torch.no_grad():
        for param in backbone.parameters():  # drift everything that trains
            if param.requires_grad:
                param.add_(torch.randn_like(param))
        drifted = backbone.embed(ids)[0]
    assert not torch.allclose(drifted[:-1], drifted[-1].expand(len(rows), -1))
    reset_token_rows(backbone, rows, eos)
    with torch.no_grad():
        reset = backbone.embed(ids)[0]
    torch.testing.assert_close(reset[:-1], reset[-1].expand(len(rows), -1), rtol=0, atol=0)
