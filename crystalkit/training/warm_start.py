"""Warm start: a run that begins from another run's weights (``warm_start.source``).

The source is a run directory (finished or not: its latest checkpoint) or a ``crystalkit export``
folder (merged, or an adapter export). A LoRA source is merged into its base first. When the new
run starts, the source's weights and assets (tokenizer, processor) are copied into
``RUN_DIR/warm_start/`` with a record of where they came from (``source.json``: path, step and a
fingerprint of the weights). Everything later — building the model, ``--resume``, ``eval``,
``export`` — reads that snapshot, never the source, so a run stays usable after its source is
deleted or retrained.

The new run keeps the source's vocabulary (so its token ids mean what they meant) and the source's
latent tokens; tokens the new recipe needs beyond those are added and initialised as usual. The
recipe's ``backbone`` section must describe the source's architecture: the weights must load
exactly, or the run stops with one line naming the first difference.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from crystalkit.config.schema import Recipe
from crystalkit.data.prompt import template_text
from crystalkit.errors import CheckpointError, UsageError
from crystalkit.io import atomic_write_json, fsync_dir
from crystalkit.models.backbone import Backbone
from crystalkit.training.checkpoint import state_fingerprint

SNAPSHOT_DIR = "warm_start"
SOURCE_FILE = "source.json"
WEIGHTS_FILE = "model.safetensors"
#: backbone keys that do not change the weights (a warm start may set them differently)
_FREE_KEYS = frozenset({"init", "dtype", "attn_implementation", "vision_attn_implementation"})


def snapshot_dir(recipe: Recipe, run_dir: Path | None) -> Path | None:
    """Where a warm-started run keeps its source's snapshot (``None`` without a warm start)."""
    if recipe.warm_start.source is None:
        return None
    if run_dir is None or not (run_dir / SNAPSHOT_DIR / SOURCE_FILE).is_file():
        where = "the run directory" if run_dir is None else str(run_dir / SNAPSHOT_DIR)
        raise CheckpointError(
            f"{where}: no warm-start snapshot of {recipe.warm_start.source} (it is written when "
            "the run starts; start the run with crystalkit train)"
        )
    return run_dir / SNAPSHOT_DIR


def load_snapshot(backbone: Backbone, directory: Path) -> None:
    """Load the snapshot's weights into ``backbone`` (built from the snapshot's assets)."""
    try:
        load_model(backbone, str(directory / WEIGHTS_FILE), strict=True)
    except (SafetensorError, OSError, RuntimeError) as exc:
        record = read_record(directory)
        raise CheckpointError(
            f"warm_start.source: {record.get('source')} does not fit this recipe's model"
            f"{_first_backbone_difference(record.get('backbone', {}), backbone)}: "
            f"{_first_line(exc)}"
        ) from None


def read_record(directory: Path) -> dict[str, Any]:
    try:
        record = json.loads((directory / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return record if isinstance(record, dict) else {}


@dataclass
class Source:
    """A loaded warm-start source that fits the recipe: its backbone (LoRA merged) and record."""

    backbone: Backbone
    record: dict[str, Any]


def load_source(recipe: Recipe, dataset: Any) -> Source:
    """Load ``warm_start.source`` and check that it fits ``recipe`` (one-line errors); nothing is
    written, so a bad source costs nothing."""
    source_recipe, backbone, step, merged = _load_source(Path(recipe.warm_start.source))
    source = Path(recipe.warm_start.source).resolve()
    _check_architecture(source, source_recipe, recipe)
    _check_vocabulary(source, backbone, dataset, recipe)
    record = {
        "source": str(source),
        "step": step,
        "lora_merged": merged,
        "fingerprint": state_fingerprint(backbone.state_dict()),
        "backbone": source_recipe.backbone.model_dump(mode="json"),
    }
    return Source(backbone, record)


def write_snapshot(source: Source, run_dir: Path) -> None:
    """Copy the source's merged weights and assets into ``RUN_DIR/warm_start/`` (replacing an
    earlier snapshot), atomically."""
    target = run_dir / SNAPSHOT_DIR
    run_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{SNAPSHOT_DIR}."))
    try:
        save_model(source.backbone, str(staging / WEIGHTS_FILE))
        source.backbone.save_assets(staging)
        atomic_write_json(staging / SOURCE_FILE, source.record)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _load_source(path: Path) -> tuple[Recipe, Backbone, int, bool]:
    """The source's recipe, its backbone with the latest weights (LoRA merged), the step and
    whether a LoRA adapter was merged."""
    from crystalkit.evaluation.runs import load_model
    from crystalkit.export import EXPORT_FILE, load_adapter

    if not path.exists():
        raise UsageError(
            f"warm_start.source: {path} does not exist (expected a run directory or a "
            "crystalkit export folder)"
        )
    try:
        export = json.loads((path / EXPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        export = None
    try:
        if isinstance(export, dict) and export.get("merged") is False:
            model = load_adapter(path)
            recipe, step = model.method.recipe, int(export.get("step", 0))
        else:
            recipe, _, model, step = load_model(path)
    except UsageError as exc:
        raise UsageError(f"warm_start.source: {exc}") from None
    merged = model.peft is not None
    if merged:
        model.peft.merge_and_unload()
    backbone = model.backbone.cpu()
    backbone.requires_grad_(True)
    return recipe, backbone, step, merged


def _check_architecture(source: Path, source_recipe: Recipe, recipe: Recipe) -> None:
    theirs, ours = source_recipe.backbone, recipe.backbone
    if theirs.name != ours.name:
        raise UsageError(
            f"warm_start.source: {source} is a {theirs.name!r} model, this recipe builds "
            f"backbone.name={ours.name!r} (a warm start keeps the architecture)"
        )
    a, b = theirs.model_dump(mode="json"), ours.model_dump(mode="json")
    for key in sorted((set(a) | set(b)) - _FREE_KEYS - {"name"}):
        if a.get(key) != b.get(key):
            raise UsageError(
                f"warm_start.source: {source} has backbone.{key}={a.get(key)!r}, this recipe "
                f"{b.get(key)!r} (a warm start keeps the architecture; set it to the source's)"
            )


def _check_vocabulary(source: Path, backbone: Backbone, dataset: Any, recipe: Recipe) -> None:
    """Every word this recipe's data and prompt template use must be a token of the source's
    vocabulary (a word-level tokenizer maps any other word to its unknown token)."""
    tokenizer = backbone.tokenizer
    unknown = tokenizer.unk_token_id
    if unknown is None:
        return  # byte-level tokenizers spell every word
    latent = recipe.latents.template
    for text in [*dataset.corpus(), template_text(latent.open, latent.close)]:
        for word in text.split():
            if unknown in tokenizer.encode(word, add_special_tokens=False):
                raise UsageError(
                    f"warm_start.source: {source}'s vocabulary has no token for {word!r}, which "
                    "this recipe's dataset uses (warm-start from a run on the same kind of data)"
                )


def _first_backbone_difference(saved: dict[str, Any], backbone: Backbone) -> str:
    ours = backbone.config.model_dump(mode="json") if hasattr(backbone.config, "model_dump") else {}
    for key in sorted(set(saved) & set(ours) - _FREE_KEYS):
        if saved[key] != ours[key]:
            return f" (backbone.{key} is {saved[key]!r} there, {ours[key]!r} here)"
    return ""


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
