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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crystalkit.config.schema import Recipe
from crystalkit.crystal.perception import HEADS
from crystalkit.data.prompt import template_text
from crystalkit.errors import UsageError
from crystalkit.models.backbone import Backbone
from crystalkit.runs.checkpoint import state_fingerprint
from crystalkit.runs.load import load_adapter, load_run_model, read_export
from crystalkit.runs.snapshot import FREE_KEYS


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


def _load_source(path: Path) -> tuple[Recipe, Backbone, int, bool]:
    """The source's recipe, its backbone with the latest weights (LoRA merged), the step and
    whether a LoRA adapter was merged."""
    if not path.exists():
        raise UsageError(
            f"warm_start.source: {path} does not exist (expected a run directory or a "
            "crystalkit export folder)"
        )
    export = read_export(path)
    try:
        if export is not None and export.get("merged") is False:
            model = load_adapter(path)
            recipe, step = model.method.recipe, int(export.get("step", 0))
        else:
            recipe, _, model, step = load_run_model(path)
    except UsageError as exc:
        raise UsageError(f"warm_start.source: {exc}") from None
    merged = model.peft is not None
    if merged:
        model.peft.merge_and_unload()
    backbone = model.backbone.cpu()
    if hasattr(backbone, HEADS):  # training scaffolding of the source's perceive stage
        delattr(backbone, HEADS)
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
    for key in sorted((set(a) | set(b)) - FREE_KEYS - {"name"}):
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
