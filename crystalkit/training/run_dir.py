"""The run directory's bookkeeping around the training loop: where a run goes, whether an
existing one may be resumed or must be left alone, clearing a previous run's outputs, removing a
failed fresh start's, and the ``results.json`` a finished run writes."""

from __future__ import annotations

import os
import shutil
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from crystalkit.config.schema import Recipe
from crystalkit.config.stages import Stage
from crystalkit.errors import CheckpointError, UsageError
from crystalkit.evaluation import EvalResult
from crystalkit.io import atomic_write_json, read_yaml
from crystalkit.runs.checkpoint import latest_checkpoint
from crystalkit.runs.files import (
    CHECKPOINTS_DIR,
    EVALUATION_PATTERNS,
    METRICS_FILE,
    RECIPE_FILE,
    RESULTS_FILE,
    SNAPSHOT_DIR,
)
from crystalkit.runs.snapshot import read_record


def default_run_dir(recipe: Recipe) -> Path:
    return normalised(Path(recipe.output_dir) / recipe.name)


def normalised(path: Path) -> Path:
    """``path`` without ``.`` and ``..`` parts (``elsewhere/../exp2`` is ``exp2``), as messages
    print it; symlinks are left alone."""
    return Path(os.path.normpath(path))


def check_resumable(recipe: Recipe, run_dir: Path | None = None) -> None:
    """``crystalkit train --resume`` continues a run: refuse (one line) where there is none, rather
    than quietly train from scratch after a mistyped name or ``--run-dir``. :func:`train` itself
    resumes what is there and starts what is not, as the ablation runner needs."""
    run_dir = normalised(Path(run_dir)) if run_dir is not None else default_run_dir(recipe)
    if not (run_dir / RECIPE_FILE).is_file():
        raise UsageError(
            f"{run_dir}: no run to resume (no {RECIPE_FILE} there); check the recipe's name and "
            "output_dir or --run-dir, or drop --resume to start a new run"
        )


def check_run_dir(run_dir: Path, recipe: Recipe, resume: bool, overwrite: bool) -> bool:
    """Refuse to train over an existing run unless told how; ``True`` for the leftovers of a run
    that stopped before its first checkpoint, which a new run reuses as if it were empty."""
    existing = next(p for p in (run_dir, *run_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(
            f"{run_dir}: {existing} is a file, not a folder (expected a run directory)"
        )
    saved = run_dir / RECIPE_FILE
    if not saved.exists():
        return False
    if overwrite:
        return False
    if latest_checkpoint(run_dir) is None and not (run_dir / RESULTS_FILE).exists():
        return True  # killed (SIGKILL, a lost node) before it could clean up: nothing to keep
    if not resume:
        raise UsageError(
            f"{run_dir}: a run already exists here; pass --resume to continue it, --overwrite to "
            "start over, or set name=... / --run-dir for a new run"
        )
    previous = read_yaml(saved, CheckpointError)
    if not isinstance(previous, dict):
        found = "an empty file" if previous is None else type(previous).__name__
        raise CheckpointError(
            f"{saved}: not a recipe (expected a mapping of keys, got {found}); pass --overwrite "
            "to start the run over"
        )
    with suppress(ValidationError):  # recipe keys added since that run take their defaults
        previous = Recipe.model_validate(previous).to_dict()
    current = recipe.to_dict()
    for tree in (previous, current):  # where metrics go is not what the run computes
        if isinstance(tree, dict) and isinstance(tree.get("train"), dict):
            tree["train"].pop("loggers", None)
    diff = _first_difference(previous, current)
    if diff is not None:
        key, old, new = diff
        raise UsageError(
            f"{saved}: cannot resume: {key} was {old!r} in the saved run but is {new!r} now "
            "(resume with the same recipe and overrides)"
        )
    return False


def clear_outputs(run_dir: Path) -> None:
    """Remove a previous run's outputs so that nothing stale (a later checkpoint, old
    predictions) can be mistaken for this run's."""
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(run_dir / CHECKPOINTS_DIR, ignore_errors=True)
    shutil.rmtree(run_dir / SNAPSHOT_DIR, ignore_errors=True)
    for pattern in (METRICS_FILE, RESULTS_FILE, *EVALUATION_PATTERNS):
        for stale in run_dir.glob(pattern):
            stale.unlink()


class FreshOutputs:
    """What a run that starts at step 0 writes into its run dir, removed again when the run fails
    (any exception, Ctrl-C included) before its first complete checkpoint, so that a retry does
    not find a run in the way. Only the process that writes (rank 0) claims the outputs."""

    #: written by a fresh start even where an earlier run left a file of the same name
    WRITTEN = (RECIPE_FILE, METRICS_FILE, CHECKPOINTS_DIR, SNAPSHOT_DIR)

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.claimed = False
        self.created = False
        self.before: set[str] = set()

    def claim(self) -> None:
        """Called before this run writes anything: remember what was there already."""
        self.created = not self.run_dir.exists()
        self.before = set() if self.created else {p.name for p in self.run_dir.iterdir()}
        self.claimed = True

    def keep(self) -> None:
        """Called once a complete checkpoint exists: from now on the run dir is a run."""
        self.claimed = False

    def discard(self) -> None:
        """Remove the run dir if this run created it, else what this run wrote into it. Silent:
        the error that stopped the run stays the one line the user reads."""
        if not self.claimed:
            return
        self.claimed = False
        if self.created:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        else:
            for path in list(self.run_dir.iterdir()) if self.run_dir.is_dir() else []:
                if path.name in self.before and path.name not in self.WRITTEN:
                    continue  # not this run's (an ablation cell's status.json and train.log)
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


def _first_difference(a: Any, b: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            found = _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if a == b else (prefix.rstrip("."), a, b)


def write_results(
    run_dir: Path,
    recipe: Recipe,
    final: EvalResult,
    steps: int,
    train_time: float | None,
    plan: list[Stage],
    controls: dict[str, float],
) -> None:
    """``results.json``: the final evaluation's summary, the stages, the training time (``None``
    for a resumed run, which did not see all of it) and the torch threads it ran with."""
    results: dict[str, Any] = {
        "name": recipe.name,
        "steps": steps,
        "split": recipe.eval.final_split,
        **final.summary(),
        "train_seconds": train_time,
        "num_threads": torch.get_num_threads(),
        "stages": [{"name": s.name, "start": s.start, "steps": s.steps} for s in plan],
    }
    if controls:
        results["controls"] = controls
    if recipe.warm_start.source is not None:
        record = read_record(run_dir / SNAPSHOT_DIR)
        results["warm_start"] = {k: record.get(k) for k in ("source", "step", "fingerprint")}
    atomic_write_json(run_dir / RESULTS_FILE, results)
