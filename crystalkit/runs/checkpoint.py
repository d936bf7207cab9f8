"""Atomic, resumable checkpoints.

Layout under ``RUN_DIR/checkpoints/``::

    step_000200/model.safetensors      weights (safetensors)
    step_000200/trainable.safetensors  instead, when part of the model is frozen (LoRA)
    step_000200/trainer_state.pt       optimizer + scheduler state (loaded with weights_only=True)
    step_000200/meta.json              step; written last, so it marks a complete checkpoint
    latest                             name of the newest complete checkpoint (replaced atomically)

A model with frozen parameters (a LoRA run) saves only its trainable parameters and its
persistent buffers (batch-norm statistics move even when their layer is frozen): the frozen base
is rebuilt from the recipe (seeded init or pretrained weights) when the run is loaded. A
fingerprint of that base is stored with them, so a checkpoint never loads onto another base.
An exported checkpoint has no trainer state: it evaluates but does not resume.

A checkpoint is assembled in a hidden temporary folder and renamed into place, so a kill at any
moment leaves either the previous checkpoint or the new one, never a broken ``latest``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from crystalkit.errors import CheckpointError
from crystalkit.io import atomic_write_json, atomic_write_text, fsync_dir
from crystalkit.runs.files import (
    CHECKPOINT_META,
    CHECKPOINT_STATE,
    CHECKPOINT_TRAINABLE,
    CHECKPOINT_WEIGHTS,
    CHECKPOINTS_DIR,
    LATEST_FILE,
    checkpoint_name,
)


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    trainer_state: dict[str, Any] | None,
    keep: int,
    meta: dict[str, Any] | None = None,
) -> Checkpoint:
    """Write a complete checkpoint for ``step``, point ``latest`` at it, prune old ones.
    ``trainer_state`` ``None``: weights only (an export). ``meta``: more fields for
    ``meta.json`` (the stage the step belongs to)."""
    root = run_dir / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))
    try:
        _save_weights(model, tmp)
        if trainer_state is not None:
            # streamed to the file, not serialised in memory first: a full finetune's optimizer
            # state is twice its fp32 weights (the folder is renamed into place once complete)
            with (tmp / CHECKPOINT_STATE).open("wb") as handle:
                torch.save(trainer_state, handle)
                handle.flush()
                os.fsync(handle.fileno())
        atomic_write_json(tmp / CHECKPOINT_META, {"step": step, **(meta or {})})
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / LATEST_FILE, final.name + "\n")
    _prune(root, keep)
    return Checkpoint(final, step)


def _complete(path: Path) -> int | None:
    try:
        meta = json.loads((path / CHECKPOINT_META).read_text())
        weights = (path / CHECKPOINT_WEIGHTS).is_file() or (path / CHECKPOINT_TRAINABLE).is_file()
        return int(meta["step"]) if weights else None
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
    root = run_dir / CHECKPOINTS_DIR
    try:
        named = root / (root / LATEST_FILE).read_text().strip()
        step = _complete(named)
        if step is not None:
            return Checkpoint(named, step)
    except OSError:
        pass
    complete = _complete_checkpoints(root)
    return complete[-1] if complete else None


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint of a partly frozen model holds: trainable parameters and persistent
    buffers, by name."""
    persistent = model.state_dict(keep_vars=True).keys()
    state = {n: p for n, p in model.named_parameters() if p.requires_grad}
    state.update({n: b for n, b in model.named_buffers() if n in persistent})
    return state


def state_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """A hash of tensors' names, shapes, dtypes and a strided sample of their values: cheap
    even for a 7B model, and different for another seed, init or training run."""
    digest = hashlib.sha256()
    for name, tensor in tensors.items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)].float().cpu()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def base_fingerprint(model: torch.nn.Module) -> str:
    """The fingerprint of a partly frozen model's frozen parameters (its base)."""
    return state_fingerprint({n: p for n, p in model.named_parameters() if not p.requires_grad})


def _partial(model: torch.nn.Module) -> bool:
    return any(not p.requires_grad for p in model.parameters())


def _save_weights(model: torch.nn.Module, directory: Path) -> None:
    if not _partial(model):
        save_model(model, str(directory / CHECKPOINT_WEIGHTS))
        return
    tensors = {n: t.detach().contiguous() for n, t in trainable_state(model).items()}
    save_file(
        tensors, str(directory / CHECKPOINT_TRAINABLE), metadata={"base": base_fingerprint(model)}
    )


def _first_problem(exc: BaseException) -> str:
    """torch lists every mismatched tensor on its own line: the first, and how many more."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(exc).__name__
    more = f" (+{len(lines) - 2} more)" if len(lines) > 2 else ""
    return f"{lines[0].rstrip(':')}: {lines[1]}{more}"


def load_weights(model: torch.nn.Module, checkpoint: Checkpoint) -> None:
    """Load ``checkpoint`` into ``model``; :class:`CheckpointError` (one line) when it cannot be
    read or belongs to another model."""
    trainable = checkpoint.path / CHECKPOINT_TRAINABLE
    if _partial(model) != trainable.is_file():
        raise CheckpointError(
            f"{checkpoint.path}: "
            + (
                "holds full weights, but the recipe's model trains only part of them "
                "(lora.enabled is true)"
                if _partial(model)
                else "holds only a LoRA run's trainable weights, but the recipe's model trains "
                "all of them (lora.enabled is false)"
            )
        )
    if trainable.is_file():
        _load_trainable(model, trainable)
        return
    try:
        missing, unexpected = load_model(
            model, str(checkpoint.path / CHECKPOINT_WEIGHTS), strict=False
        )
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(
            f"{checkpoint.path / CHECKPOINT_WEIGHTS}: cannot load weights: {_first_problem(exc)}"
        ) from None
    if missing or unexpected:
        raise CheckpointError(
            f"{checkpoint.path / CHECKPOINT_WEIGHTS}: does not match the recipe's model "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )


def load_trainer_state(checkpoint: Checkpoint) -> dict[str, Any]:
    if not (checkpoint.path / CHECKPOINT_STATE).is_file():
        raise CheckpointError(
            f"{checkpoint.path}: no {CHECKPOINT_STATE} (an exported checkpoint?): it evaluates but "
            "cannot resume"
        )
    try:
        # memory-mapped: the optimizer state of a full finetune is twice the fp32 weights, and
        # every rank of a node reads the same file; the pages are shared, not copied per rank
        return torch.load(
            checkpoint.path / CHECKPOINT_STATE, map_location="cpu", weights_only=True, mmap=True
        )
    except Exception as exc:  # pickle/zip errors have no common base class
        raise CheckpointError(
            f"{checkpoint.path / CHECKPOINT_STATE}: cannot load trainer state: {exc}"
        ) from None


def _load_trainable(model: torch.nn.Module, path: Path) -> None:
    try:
        with safe_open(str(path), framework="pt") as handle:
            base = (handle.metadata() or {}).get("base")
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: cannot load weights: {exc}") from None
    if base != base_fingerprint(model):
        raise CheckpointError(
            f"{path}: was trained on another frozen base model than the recipe builds "
            "(another seed, torch version, backbone or pretrained checkpoint)"
        )
    expected = trainable_state(model)
    missing, unexpected = expected.keys() - tensors.keys(), tensors.keys() - expected.keys()
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: does not match the recipe's model "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    for name, target in expected.items():
        saved = tensors[name]
        if saved.shape != target.shape or saved.dtype != target.dtype:
            raise CheckpointError(
                f"{path}: {name} is {saved.dtype} {tuple(saved.shape)}, the recipe's model has "
                f"{target.dtype} {tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(saved)
