"""The shipped warm start, ``checkpoints/instruct``: it is what ``recipes/instruct.yaml`` trains,
it loads, and the main job starts from exactly its weights."""

from __future__ import annotations

import json

import torch
from conftest import ROOT
from safetensors.torch import load_file

from crystalkit.config.loader import load_recipe
from crystalkit.crystal.perception import HEADS
from crystalkit.runs import checkpoint as ckpt
from crystalkit.runs import files
from crystalkit.runs.load import load_run
from crystalkit.runs.snapshot import SNAPSHOT_DIR, SNAPSHOT_WEIGHTS
from crystalkit.training.trainer import train

CHECKPOINT = ROOT / "checkpoints" / "instruct"
#: how the shipped checkpoint was trained (docs/testbed.md#the-instruct-checkpoint)
COMMAND = ["train.num_threads=2"]


def test_the_checkpoint_is_what_the_instruct_recipe_trains():
    shipped = load_recipe(CHECKPOINT / files.RECIPE_FILE).model_dump(mode="json")
    expected = load_recipe(ROOT / "recipes" / "instruct.yaml", COMMAND).model_dump(mode="json")
    for key in ("output_dir",):  # where it ran, not what it is
        shipped.pop(key), expected.pop(key)
    assert shipped == expected
    summary = json.loads((CHECKPOINT / files.EXPORT_FILE).read_text())
    assert summary["merged"] is True and summary["step"] == expected["train"]["steps"]


def test_the_checkpoint_loads_as_a_run():
    recipe, _, backbone, method, step = load_run(CHECKPOINT)
    weights = load_file(str(ckpt.latest_checkpoint(CHECKPOINT).path / files.CHECKPOINT_WEIGHTS))
    state = backbone.state_dict()
    assert step == recipe.train.steps and set(weights) <= set(state)  # tied rows saved once
    assert all(torch.equal(state[k], weights[k]) for k in weights)
    assert method.packer.question_first and hasattr(backbone, HEADS)


def test_the_main_job_starts_from_the_checkpoint(tmp_path, monkeypatch):
    """``crystal_default``'s warm start, relative to the repository root, is the shipped
    checkpoint: its snapshot holds the checkpoint's weights without the perception heads."""
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(
        ROOT / "recipes" / "crystal_default.yaml",
        [
            f"output_dir={tmp_path}",
            "train.steps=1",
            "train.batch_size=2",
            "eval.max_samples=4",
            "train.num_threads=1",
        ],
    )
    run_dir = train(recipe, stop_after=1).run_dir
    started = load_file(str(run_dir / SNAPSHOT_DIR / SNAPSHOT_WEIGHTS))
    weights = load_file(str(ckpt.latest_checkpoint(CHECKPOINT).path / files.CHECKPOINT_WEIGHTS))
    assert set(started) == {k for k in weights if not k.startswith(HEADS)}
    assert all(torch.equal(started[k], weights[k]) for k in started)
