"""``crystalkit export``: a run's latest checkpoint as a standalone model, or a LoRA run's adapter.

``--merge`` folds a LoRA adapter (and the latent token rows) into the base weights (a full run has
nothing to fold) and writes a run directory of the standalone model: ``recipe.yaml`` (LoRA
disabled), the backbone's assets and a full checkpoint, so ``crystalkit eval`` or
:func:`~crystalkit.runs.load.load_run` reads it like any run; for Hugging Face backbones also
``pretrained/``, a ``from_pretrained`` folder with the family's processor and chat template, which
plain transformers and the engines built on it serve. Without ``--merge`` the folder holds peft's
own files (``adapter_config.json``,
``adapter_model.safetensors``) next to the recipe and assets, which :func:`~crystalkit.runs.load.load_adapter` (or
``PeftModel.from_pretrained`` on :func:`~crystalkit.models.lora.peft_host`) applies to the base.

Either way the folder is assembled in a hidden temporary folder and renamed into place.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors.torch import save_file

from crystalkit.config.loader import dump_recipe
from crystalkit.config.schema import WarmStartConfig
from crystalkit.errors import UsageError
from crystalkit.io import atomic_write_json, atomic_write_text, fsync_dir
from crystalkit.models.lora import base_buffers
from crystalkit.runs.checkpoint import base_fingerprint, save_checkpoint
from crystalkit.runs.files import (
    EXPORT_BUFFERS,
    EXPORT_DIR,
    EXPORT_FILE,
    PRETRAINED_DIR,
    RECIPE_FILE,
    SNAPSHOT_DIR,
    SOURCES_FILE,
)
from crystalkit.runs.load import load_run_model, without_lora


def export_run(run_dir: Path, out: Path | None = None, merge: bool = False) -> Path:
    """Export ``run_dir``'s latest checkpoint into ``out`` (default ``RUN_DIR/export``, replaced
    if it holds an earlier export); returns the folder."""
    target = out if out is not None else run_dir / EXPORT_DIR
    if target.exists() and not (target / EXPORT_FILE).is_file():
        raise UsageError(f"--out: {target} exists and is not a crystalkit export; choose another")
    recipe, _, model, step = load_run_model(run_dir)
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
                save_file(buffers, str(folder / EXPORT_BUFFERS))
            summary["base"] = base_fingerprint(model.backbone)
        model.backbone.save_assets(folder)
        if (run_dir / SOURCES_FILE).is_file():  # what to install if a plugin is missing later
            shutil.copy2(run_dir / SOURCES_FILE, folder / SOURCES_FILE)
        atomic_write_json(folder / EXPORT_FILE, summary)
    return target


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
