"""Re-evaluate a finished (or interrupted) run from its directory alone."""

from __future__ import annotations

from pathlib import Path

from crystalkit.build import build_backbone, build_dataset
from crystalkit.config.loader import load_recipe
from crystalkit.config.schema import Recipe
from crystalkit.crystal.method import Method
from crystalkit.errors import CheckpointError
from crystalkit.evaluation.accuracy import EvalResult, evaluate
from crystalkit.models.backbone import Backbone
from crystalkit.training.checkpoint import latest_checkpoint, load_weights
from crystalkit.training.trainer import RECIPE_FILE


def load_run(run_dir: Path) -> tuple[Recipe, object, Backbone, Method, int]:
    """The run's resolved recipe, dataset, backbone with its latest weights, method, and step."""
    if not run_dir.is_dir():
        raise CheckpointError(
            f"{run_dir}: not a directory (expected a run made by crystalkit train)"
        )
    if not (run_dir / RECIPE_FILE).is_file():
        raise CheckpointError(f"{run_dir}: no {RECIPE_FILE}; not a crystalkit run directory")
    recipe = load_recipe(run_dir / RECIPE_FILE)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise CheckpointError(f"{run_dir}: no complete checkpoint under {run_dir / 'checkpoints'}")
    dataset = build_dataset(recipe)
    backbone = build_backbone(recipe, dataset, assets=run_dir)
    method = Method(recipe, backbone)
    backbone.to(recipe.device)
    load_weights(backbone, checkpoint)
    return recipe, dataset, backbone, method, checkpoint.step


def evaluate_run_dir(
    run_dir: Path, split: str, max_samples: int | None = None, corrupted: bool = False
) -> EvalResult:
    """Evaluate ``split``; writes ``eval_SPLIT.json`` and ``predictions_SPLIT.jsonl`` (with
    ``corrupted``: ``eval_SPLIT_corrupted.json`` ..., images corrupted by the recipe's
    corruption)."""
    recipe, dataset, backbone, method, step = load_run(run_dir)
    cfg = (
        recipe.eval
        if max_samples is None
        else recipe.eval.model_copy(update={"max_samples": max_samples})
    )
    result = evaluate(backbone, dataset.split(split), method, cfg, corrupted=corrupted)
    result.save(run_dir, f"{split}_corrupted" if corrupted else split, step)
    return result
