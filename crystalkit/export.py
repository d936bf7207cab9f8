"""``crystalkit export``: a run's latest checkpoint as a standalone model, or a LoRA run's adapter.

``--merge`` folds a LoRA adapter (and the latent token rows) into the base weights (a full run has
nothing to fold) and writes a run directory of the standalone model: ``recipe.yaml`` (LoRA
disabled), the backbone's assets and a full checkpoint, so ``crystalkit eval`` or
:func:`~crystalkit.evaluation.runs.load_run` reads it like any run; for Hugging Face backbones also
``pretrained/``, a ``from_pretrained`` folder with the family's processor and chat template, which
plain transformers and the engines built on it serve. Without ``--merge`` the folder holds peft's
own files (``adapter_config.json``,
``adapter_model.safetensors``) next to the recipe and assets, which :func:`load_adapter` (or
``PeftModel.from_pretrained`` on :func:`~crystalkit.models.lora.peft_host`) applies to the base.

Either way the folder is assembled in a hidden temporary folder and renamed into place.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from crystalkit.build import Model, build_dataset, build_model
from crystalkit.config.loader import TRAINING_ONLY, dump_recipe, load_recipe
from crystalkit.config.schema import Recipe, WarmStartConfig
from crystalkit.config.sources import SOURCES_FILE
from crystalkit.errors import CheckpointError, UsageError
from crystalkit.evaluation.runs import load_model
from crystalkit.io import atomic_write_json, atomic_write_text, fsync_dir
from crystalkit.models.backbone import Backbone
from crystalkit.models.lora import peft_host
from crystalkit.training.checkpoint import base_fingerprint, save_checkpoint
from crystalkit.training.trainer import RECIPE_FILE
from crystalkit.training.warm_start import SNAPSHOT_DIR

EXPORT_FILE = "export.json"
BUFFERS = "buffers.safetensors"
#: the merged model in its library's format (Hugging Face backbones), next to the run files
PRETRAINED_DIR = "pretrained"


def without_lora(recipe: Recipe) -> Recipe:
    return recipe.model_copy(update={"lora": recipe.lora.model_copy(update={"enabled": False})})


def export_run(run_dir: Path, out: Path | None = None, merge: bool = False) -> Path:
    """Export ``run_dir``'s latest checkpoint into ``out`` (default ``RUN_DIR/export``, replaced
    if it holds an earlier export); returns the folder."""
    target = out if out is not None else run_dir / "export"
    if target.exists() and not (target / EXPORT_FILE).is_file():
        raise UsageError(f"--out: {target} exists and is not a crystalkit export; choose another")
    recipe, _, model, step = load_model(run_dir)
    if model.peft is None and not merge:
        raise UsageError(
            f"{run_dir}: not a LoRA run (lora.enabled is false), so there is no adapter to "
            "export; --merge exports the full model"
        )
    summary = {"run": str(run_dir), "step": step, "merged": merge}
    with _staged(target) as folder:
        if merge:
            if model.peft is not None:
                model.peft.merge_and_unload()
            model.backbone.requires_grad_(True)  # a plain model again: saved whole
            standalone = without_lora(recipe).model_copy(
                update={"warm_start": WarmStartConfig()}  # the merged weights are all it needs
            )
            atomic_write_text(folder / RECIPE_FILE, dump_recipe(standalone))
            save_checkpoint(folder, step, model.backbone, None, keep=1)
            if model.backbone.save_pretrained(folder / PRETRAINED_DIR):
                summary["pretrained"] = PRETRAINED_DIR
        else:
            model.peft.save_pretrained(str(folder), save_embedding_layers=False)
            atomic_write_text(folder / RECIPE_FILE, dump_recipe(recipe))
            if recipe.warm_start.source is not None:  # the adapter's base
                shutil.copytree(run_dir / SNAPSHOT_DIR, folder / SNAPSHOT_DIR)
            buffers = base_buffers(model.backbone)
            if buffers:
                save_file(buffers, str(folder / BUFFERS))
            summary["base"] = base_fingerprint(model.backbone)
        model.backbone.save_assets(folder)
        if (run_dir / SOURCES_FILE).is_file():  # what to install if a plugin is missing later
            shutil.copy2(run_dir / SOURCES_FILE, folder / SOURCES_FILE)
        atomic_write_json(folder / EXPORT_FILE, summary)
    return target


def base_buffers(backbone: Backbone) -> dict[str, torch.Tensor]:
    """The base model's persistent buffers, outside peft's layers: batch-norm statistics move
    during training although their layers are frozen, and peft's adapter files do not hold
    them."""
    tuned = tuple(f"{n}." for n, m in backbone.named_modules() if isinstance(m, BaseTunerLayer))
    persistent = backbone.state_dict(keep_vars=True).keys()
    return {
        n: b.detach().contiguous()
        for n, b in backbone.named_buffers()
        if n in persistent and not n.startswith(tuned)
    }


def load_adapter(directory: Path) -> Model:
    """The model of an adapter export: the base rebuilt from its recipe as training began
    (:func:`~crystalkit.build.build_model` without LoRA), peft's ``PeftModel.from_pretrained``,
    then the base's buffers. Adapters stay trainable, as in the run."""
    try:
        summary = json.loads((directory / EXPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = None
    if not isinstance(summary, dict) or summary.get("merged") is not False:
        raise CheckpointError(f"{directory}: not an adapter export of crystalkit export")
    recipe = load_recipe(directory / RECIPE_FILE, skip=TRAINING_ONLY)
    warm = directory if recipe.warm_start.source is not None else None  # its snapshot is here
    built = build_model(without_lora(recipe), build_dataset(recipe), assets=warm, training=False)
    backbone, method = built.backbone, built.method
    try:
        peft = PeftModel.from_pretrained(peft_host(backbone), str(directory), is_trainable=True)
        buffers = load_file(str(directory / BUFFERS)) if (directory / BUFFERS).is_file() else {}
    except (ValueError, OSError, SafetensorError) as exc:
        raise CheckpointError(f"{directory}: cannot load the adapter: {exc}") from None
    if base_fingerprint(backbone) != summary.get("base"):
        raise CheckpointError(
            f"{directory}: the adapter was trained on another base model than its recipe builds"
        )
    expected = base_buffers(backbone)
    if buffers.keys() != expected.keys():
        raise CheckpointError(f"{directory / BUFFERS}: does not match the recipe's model")
    with torch.no_grad():
        for name, value in buffers.items():
            backbone.get_buffer(name).copy_(value)
    backbone.to(recipe.device)
    return Model(backbone, method, peft)


@contextmanager
def _staged(target: Path) -> Iterator[Path]:
    """A temporary folder next to ``target`` that replaces it once the block succeeds."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    except (OSError, ValueError) as exc:  # a read-only place, a file on the path, a NUL
        raise UsageError(
            f"{target}: cannot create the export folder ({getattr(exc, 'strerror', None) or exc})"
        ) from None
    try:
        yield folder
        if target.exists():
            shutil.rmtree(target)
        folder.rename(target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
