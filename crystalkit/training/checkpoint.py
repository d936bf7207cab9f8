"""Atomic, resumable checkpoints.

Layout under ``RUN_DIR/checkpoints/``::

    step_000200/model.safetensors   weights (safetensors)
    step_000200/trainer_state.pt    optimizer + scheduler state (loaded with weights_only=True)
    step_000200/meta.json           step; written last, so its presence marks a complete checkpoint
    latest                          name of the newest complete checkpoint (replaced atomically)

A checkpoint is assembled in a hidden temporary folder and renamed into place, so a kill at any
moment leaves either the previous checkpoint or the new one, never a broken ``latest``.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from crystalkit.errors import CheckpointError
from crystalkit.io import atomic_write_bytes, atomic_write_json, atomic_write_text, fsync_dir

WEIGHTS = "model.safetensors"
STATE = "trainer_state.pt"
META = "meta.json"
LATEST = "latest"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int


def save_checkpoint(
    run_dir: Path, step: int, model: torch.nn.Module, trainer_state: dict[str, Any], keep: int
) -> Checkpoint:
    """Write a complete checkpoint for ``step``, point ``latest`` at it, prune old ones."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))
    try:
        save_model(model, str(tmp / WEIGHTS))
        buffer = io.BytesIO()
        torch.save(trainer_state, buffer)
        atomic_write_bytes(tmp / STATE, buffer.getvalue())
        atomic_write_json(tmp / META, {"step": step})
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / LATEST, final.name + "\n")
    _prune(root, keep)
    return Checkpoint(final, step)


def _complete(path: Path) -> int | None:
    try:
        meta = json.loads((path / META).read_text())
        return (
            int(meta["step"]) if (path / WEIGHTS).is_file() and (path / STATE).is_file() else None
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _complete_checkpoints(root: Path) -> list[Checkpoint]:
    found = []
    for path in root.glob("step_*") if root.is_dir() else []:
        step = _complete(path)
        if step is not None:
            found.append(Checkpoint(path, step))
    return sorted(found, key=lambda c: c.step)


def _prune(root: Path, keep: int) -> None:
    for old in _complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old.path, ignore_errors=True)
    for stale in root.glob(".step_*"):  # leftovers of saves that were killed
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The checkpoint ``latest`` names, or the newest complete one if that pointer is unusable."""
    root = run_dir / "checkpoints"
    try:
        named = root / (root / LATEST).read_text().strip()
        step = _complete(named)
        if step is not None:
            return Checkpoint(named, step)
    except OSError:
        pass
    complete = _complete_checkpoints(root)
    return complete[-1] if complete else None


def load_weights(model: torch.nn.Module, checkpoint: Checkpoint) -> None:
    try:
        missing, unexpected = load_model(model, str(checkpoint.path / WEIGHTS), strict=False)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{checkpoint.path / WEIGHTS}: cannot load weights: {exc}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{checkpoint.path / WEIGHTS}: does not match the recipe's model "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )


def load_trainer_state(checkpoint: Checkpoint) -> dict[str, Any]:
    try:
        return torch.load(checkpoint.path / STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors have no common base class
        raise CheckpointError(
            f"{checkpoint.path / STATE}: cannot load trainer state: {exc}"
        ) from None
