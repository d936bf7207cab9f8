"""A warm-started run's snapshot of its source: ``RUN_DIR/warm_start/``.

When a run with ``warm_start.source`` starts, its source's merged weights and assets are copied
here with a record of where they came from (path, step, a fingerprint of the weights); see
:mod:`crystalkit.training.warm_start`. Building the run's model, ``--resume``, ``eval`` and
``export`` read this snapshot, never the source, so a run stays usable after its source is deleted
or retrained.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from crystalkit.config.schema import Recipe
from crystalkit.errors import CheckpointError, first_line
from crystalkit.io import atomic_write_json, fsync_dir
from crystalkit.models.backbone import Backbone
from crystalkit.runs.files import SNAPSHOT_DIR, SNAPSHOT_RECORD, SNAPSHOT_WEIGHTS

#: backbone keys that do not change the weights (a warm start may set them differently)
FREE_KEYS = frozenset({"init", "dtype", "attn_implementation", "vision_attn_implementation"})


def snapshot_dir(recipe: Recipe, run_dir: Path | None) -> Path | None:
    """Where a warm-started run keeps its source's snapshot (``None`` without a warm start)."""
    if recipe.warm_start.source is None:
        return None
    if run_dir is None or not (run_dir / SNAPSHOT_DIR / SNAPSHOT_RECORD).is_file():
        where = "the run directory" if run_dir is None else str(run_dir / SNAPSHOT_DIR)
        raise CheckpointError(
            f"{where}: no warm-start snapshot of {recipe.warm_start.source} (it is written when "
            "the run starts; start the run with crystalkit train)"
        )
    return run_dir / SNAPSHOT_DIR


def load_snapshot(backbone: Backbone, directory: Path) -> None:
    """Load the snapshot's weights into ``backbone`` (built from the snapshot's assets)."""
    try:
        load_model(backbone, str(directory / SNAPSHOT_WEIGHTS), strict=True)
    except (SafetensorError, OSError, RuntimeError) as exc:
        record = read_record(directory)
        raise CheckpointError(
            f"warm_start.source: {record.get('source')} does not fit this recipe's model"
            f"{_first_backbone_difference(record.get('backbone', {}), backbone)}: "
            f"{first_line(exc) or type(exc).__name__}"
        ) from None


def read_record(directory: Path) -> dict[str, Any]:
    """The snapshot's record (``{}`` when missing or unreadable)."""
    try:
        record = json.loads((directory / SNAPSHOT_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return record if isinstance(record, dict) else {}


def write_snapshot(backbone: Backbone, record: dict[str, Any], run_dir: Path) -> None:
    """Copy ``backbone``'s weights and assets with ``record`` into ``RUN_DIR/warm_start/``
    (replacing an earlier snapshot), atomically."""
    target = run_dir / SNAPSHOT_DIR
    run_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{SNAPSHOT_DIR}."))
    try:
        save_model(backbone, str(staging / SNAPSHOT_WEIGHTS))
        backbone.save_assets(staging)
        atomic_write_json(staging / SNAPSHOT_RECORD, record)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _first_backbone_difference(saved: dict[str, Any], backbone: Backbone) -> str:
    ours = backbone.config.model_dump(mode="json") if hasattr(backbone.config, "model_dump") else {}
    for key in sorted(set(saved) & set(ours) - FREE_KEYS):
        if saved[key] != ours[key]:
            return f" (backbone.{key} is {saved[key]!r} there, {ours[key]!r} here)"
    return ""
