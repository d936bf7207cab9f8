"""Every file name of a run directory and of an export, in one place.

A run directory (``crystalkit train``) holds::

    recipe.yaml                 the fully resolved recipe                         RECIPE_FILE
    components.json             where each component came from                    SOURCES_FILE
    tokenizer.json, ...         the backbone's assets (Backbone.save_assets)
    metrics.jsonl               training metrics, one JSON object per line        METRICS_FILE
    wandb_id.txt                the W&B run id a resumed run continues            WANDB_ID_FILE
    checkpoints/                CHECKPOINTS_DIR (layout: crystalkit.runs.checkpoint)
      step_000200/              checkpoint_name(200)
        model.safetensors       CHECKPOINT_WEIGHTS (or trainable.safetensors: CHECKPOINT_TRAINABLE)
        trainer_state.pt        CHECKPOINT_STATE
        meta.json               CHECKPOINT_META, written last: marks a complete checkpoint
      latest                    LATEST_FILE: the newest complete checkpoint's folder name
    warm_start/                 SNAPSHOT_DIR: the warm-start source, as the run began
      model.safetensors         SNAPSHOT_WEIGHTS
      source.json               SNAPSHOT_RECORD: where it came from (path, step, fingerprint)
    results.json                the finished run's summary                        RESULTS_FILE
    eval_NAME.json              an evaluation's summary                           eval_file(NAME)
    predictions_NAME.jsonl      ... and its per-sample predictions         predictions_file(NAME)
    bench_NAME.json             a benchmark's summary                            bench_file(NAME)
    bench_NAME_predictions.jsonl                                 bench_predictions_file(NAME)
    replacements_NAME.json      accuracy under latent replacements        replacements_file(NAME)
    inspect_SPLIT.json, inspect_SPLIT_I.png   grounding and attention figures  inspect_file(...)
    analysis_NAME.json, .png    ``crystalkit analyze``'s report                 analysis_file(...)

An export (``crystalkit export``, default folder ``RUN_DIR/export``: EXPORT_DIR) holds
``export.json`` (EXPORT_FILE) with ``recipe.yaml``, the assets and ``components.json``, and
either a checkpoint and ``pretrained/`` (PRETRAINED_DIR, merged) or peft's adapter files with
``buffers.safetensors`` (EXPORT_BUFFERS) and, for a warm-started run, its ``warm_start/``.
"""

from __future__ import annotations

RECIPE_FILE = "recipe.yaml"
SOURCES_FILE = "components.json"
METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_id.txt"
RESULTS_FILE = "results.json"

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_WEIGHTS = "model.safetensors"
CHECKPOINT_TRAINABLE = "trainable.safetensors"
CHECKPOINT_STATE = "trainer_state.pt"
CHECKPOINT_META = "meta.json"
LATEST_FILE = "latest"

SNAPSHOT_DIR = "warm_start"
SNAPSHOT_WEIGHTS = "model.safetensors"
SNAPSHOT_RECORD = "source.json"

EXPORT_DIR = "export"
EXPORT_FILE = "export.json"
EXPORT_BUFFERS = "buffers.safetensors"
PRETRAINED_DIR = "pretrained"

#: what a finished run's evaluation wrote: a new run at step 0 removes them (nothing stale stays)
EVALUATION_PATTERNS = ("eval_*.json", "predictions_*.jsonl")


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def eval_file(name: str) -> str:
    return f"eval_{name}.json"


def predictions_file(name: str) -> str:
    return f"predictions_{name}.jsonl"


def bench_file(name: str) -> str:
    return f"bench_{name}.json"


def bench_predictions_file(name: str) -> str:
    return f"bench_{name}_predictions.jsonl"


def replacements_file(name: str) -> str:
    return f"replacements_{name}.json"


def inspect_file(split: str) -> str:
    return f"inspect_{split}.json"


def inspect_figure(split: str, sample: int) -> str:
    return f"inspect_{split}_{sample}.png"


def analysis_file(name: str, suffix: str = ".json") -> str:
    return f"analysis_{name}{suffix}"
