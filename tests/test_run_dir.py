"""A run that stops before its first checkpoint leaves nothing that blocks a retry."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from crystalkit.config.loader import dump_recipe
from crystalkit.errors import UsageError
from crystalkit.runs import checkpoint as ckpt
from crystalkit.training import trainer
from crystalkit.training.trainer import train


def _console() -> Console:
    return Console(file=io.StringIO(), width=300)


def _fail_at_step(monkeypatch, step: int, exc: type[BaseException] = RuntimeError) -> None:
    """Make optimizer step ``step`` (0-based) raise, as a plugin raising in a step would."""
    calls = {"n": 0}
    real = trainer._StageOptimizer.step

    def step_or_raise(self):
        calls["n"] += 1
        if calls["n"] > step:
            raise exc("a plugin failed")
        return real(self)

    monkeypatch.setattr(trainer._StageOptimizer, "step", step_or_raise)


def test_failure_before_the_first_checkpoint_removes_the_run_dir(tiny_recipe, monkeypatch):
    recipe = tiny_recipe("name=boom", "train.steps=2")
    run_dir = Path(recipe.output_dir) / "boom"
    console = _console()
    with monkeypatch.context() as patch:
        _fail_at_step(patch, 0)
        with pytest.raises(RuntimeError, match="a plugin failed"):
            train(recipe, console=console)
    assert not run_dir.exists()
    assert "removed" not in console.file.getvalue()  # silent: the error stays the one message
    assert train(recipe).steps == 2  # the retry needs no --overwrite
    assert ckpt.latest_checkpoint(run_dir).step == 2


def test_failure_in_an_existing_folder_removes_only_what_the_run_wrote(tiny_recipe, monkeypatch):
    cell = Path(tiny_recipe().output_dir) / "cell"  # as the ablation runner: its files, resume
    cell.mkdir(parents=True)
    (cell / "status.json").write_text('{"state": "running"}')
    (cell / "train.log").write_text("--- attempt 1 ---\n")
    recipe = tiny_recipe("name=cell", "train.steps=2")
    with monkeypatch.context() as patch:
        _fail_at_step(patch, 0, KeyboardInterrupt)
        with pytest.raises(KeyboardInterrupt):
            train(recipe, run_dir=cell, resume=True, console=_console())
    assert sorted(p.name for p in cell.iterdir()) == ["status.json", "train.log"]
    assert train(recipe, run_dir=cell, resume=True, console=_console()).steps == 2


def test_failure_after_a_checkpoint_keeps_the_run(tiny_recipe, monkeypatch):
    recipe = tiny_recipe("name=later", "train.steps=4", "train.save_every=2")
    run_dir = Path(recipe.output_dir) / "later"
    with monkeypatch.context() as patch:
        _fail_at_step(patch, 3)
        with pytest.raises(RuntimeError):
            train(recipe, console=_console())
    assert ckpt.latest_checkpoint(run_dir).step == 2
    assert (run_dir / "recipe.yaml").is_file() and (run_dir / "metrics.jsonl").is_file()
    with pytest.raises(UsageError, match="--resume"):  # a run, with something to resume
        train(recipe, console=_console())
    assert train(recipe, resume=True, console=_console()).steps == 4


def test_failure_before_writing_leaves_a_previous_run_alone(tiny_recipe, monkeypatch):
    recipe = tiny_recipe("name=kept", "train.steps=2")
    run_dir = train(recipe).run_dir

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "build_dataset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, overwrite=True, console=_console())
    assert (run_dir / "results.json").is_file() and ckpt.latest_checkpoint(run_dir).step == 2


def test_leftover_of_a_killed_run_is_reused(tiny_recipe):
    recipe = tiny_recipe("name=killed", "train.steps=2")
    run_dir = Path(recipe.output_dir) / "killed"
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))  # SIGKILLed before step 2
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 99.0}\n')
    console = _console()
    assert train(recipe, console=console).steps == 2
    assert "a run stopped here before its first checkpoint; starting over" in (
        console.file.getvalue()
    )
    losses = [json.loads(line).get("loss") for line in (run_dir / "metrics.jsonl").open()]
    assert 99.0 not in losses
    # a finished run is still a run
    with pytest.raises(UsageError, match="a run already exists here"):
        train(recipe, console=_console())
