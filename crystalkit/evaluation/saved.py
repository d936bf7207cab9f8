"""Evaluate a saved run (finished or interrupted) from its directory alone: on its own splits,
on a benchmark file, or under latent replacements; each writes its files into the run dir."""

from __future__ import annotations

from pathlib import Path

from crystalkit.config.schema import EvalConfig, Recipe
from crystalkit.errors import CheckpointError, UsageError
from crystalkit.evaluation.accuracy import EvalResult, evaluate
from crystalkit.evaluation.controls import control_result
from crystalkit.evaluation.harness import answer_texts, load_samples, resolve_bench, write_bench
from crystalkit.evaluation.replacement import REPLACEMENTS
from crystalkit.io import atomic_write_json, read_yaml
from crystalkit.registries import BACKBONES
from crystalkit.runs.files import RECIPE_FILE, replacements_file
from crystalkit.runs.load import load_run, run_image_size

LATENT_BLOCKS = ("forced", "generated")


def check_latent_block(latent_block: str | None) -> None:
    """A one-line error unless ``latent_block`` is ``None`` (the recipe's) or a mode."""
    if latent_block is not None and latent_block not in LATENT_BLOCKS:
        raise UsageError(f"--latent-block: expected forced or generated, got {latent_block!r}")


def check_max_samples(max_samples: int | None) -> None:
    """``--max-samples`` counts samples: 0 or less would evaluate nothing and report 0 %."""
    if max_samples is not None and max_samples < 1:
        raise UsageError(f"--max-samples: expected a number >= 1, got {max_samples}")


def _eval_config(recipe: Recipe, max_samples: int | None, latent_block: str | None) -> EvalConfig:
    """The recipe's ``eval`` settings with the command line's ``max_samples`` and
    ``latent_block`` (``None``: the recipe's)."""
    check_max_samples(max_samples)
    update: dict[str, object] = {}
    if max_samples is not None:
        update["max_samples"] = max_samples
    if latent_block is not None:
        update["latent_block"] = latent_block
    return recipe.eval.model_copy(update=update) if update else recipe.eval


def _mode_suffix(recipe: Recipe, latent_block: str | None) -> str:
    """``_forced`` / ``_generated`` when the command line asks for another mode than the
    recipe's ``eval.latent_block`` (the unsuffixed files are the recipe's own evaluation)."""
    if latent_block is None or latent_block == recipe.eval.latent_block:
        return ""
    return f"_{latent_block}"


def evaluate_run_dir(
    run_dir: Path,
    split: str,
    max_samples: int | None = None,
    corrupted: bool = False,
    latents: str = "own",
    latent_block: str | None = None,
) -> EvalResult:
    """Evaluate ``split``; writes ``eval_SPLIT.json`` and ``predictions_SPLIT.jsonl`` (with
    ``corrupted``: ``eval_SPLIT_corrupted.json`` ..., images corrupted by the recipe's
    corruption; ``latents`` ``copied`` / ``no_copy`` then answers from the intact images' latent
    block, or from one that saw no image: ``eval_SPLIT_corrupted_copied.json`` ...).
    ``latent_block`` (``forced`` / ``generated``; default: the recipe's ``eval.latent_block``)
    says whether the prompt holds the latent block or the model writes it; another mode than
    the recipe's adds ``_forced`` / ``_generated`` to the file names."""
    if latents not in ("own", "copied", "no_copy"):
        raise UsageError(f"--latents: expected own, copied or no_copy, got {latents!r}")
    if latents != "own" and not corrupted:
        raise UsageError(
            "--latents copied/no_copy answers from the corrupted images: add --corrupted"
        )
    check_latent_block(latent_block)
    recipe, dataset, backbone, method, step = load_run(run_dir)
    if latents != "own" and method.final_k == 0:
        raise UsageError(f"{run_dir}: the run has no latent block (K = 0): --latents {latents}")
    cfg = _eval_config(recipe, max_samples, latent_block)
    if latents != "own" and cfg.latent_block == "generated":
        raise UsageError(
            f"--latents {latents} reads a forced latent block: pass --latent-block forced"
        )
    data = dataset.split(split)
    if latents == "own":
        result = evaluate(backbone, data, method, cfg, corrupted=corrupted)
    else:
        result = evaluate(backbone, data, method, cfg, view=latents)
    name = split + ("_corrupted" if corrupted else "") + ("" if latents == "own" else f"_{latents}")
    result.save(run_dir, name + _mode_suffix(recipe, latent_block), step)
    return result


RESOLUTIONS = ("fixed", "processor")


def bench_resolution(run_dir: Path, resolution: str | None) -> str | None:
    """The backbone resolution ``eval --bench`` uses: ``resolution`` when given; else
    ``processor`` for a run whose backbone loads a pretrained checkpoint (``name_or_path``) of a
    family that supports it (the benchmark's images at the processor's own size, as the
    checkpoint was trained for); ``None`` (the recipe's) otherwise."""
    if resolution is not None:
        if resolution not in RESOLUTIONS:
            raise UsageError(f"--resolution: expected fixed or processor, got {resolution!r}")
        return resolution
    tree = read_yaml(run_dir / RECIPE_FILE, CheckpointError) if run_dir.is_dir() else None
    backbone = tree.get("backbone") if isinstance(tree, dict) else None
    if not isinstance(backbone, dict) or not backbone.get("name_or_path"):
        return None
    name = backbone.get("name")
    if not isinstance(name, str) or name not in BACKBONES:
        return None
    return "processor" if getattr(BACKBONES.get(name), "processor_resolution", False) else None


def evaluate_bench(
    run_dir: Path,
    bench: str,
    max_samples: int | None = None,
    latent_block: str | None = None,
    resolution: str | None = None,
) -> dict:
    """Score the run on a benchmark (see :mod:`crystalkit.evaluation.harness`); writes
    ``bench_NAME.json`` and ``bench_NAME_predictions.jsonl``; returns the summary.
    ``latent_block`` as in :func:`evaluate_run_dir` (another mode than the recipe's:
    ``bench_NAME_generated.json`` ...). ``resolution``: the backbone's (``fixed`` or
    ``processor``; default :func:`bench_resolution`); ``processor`` is recorded in the summary."""
    check_latent_block(latent_block)
    check_max_samples(max_samples)
    spec, root = resolve_bench(bench)
    chosen = bench_resolution(run_dir, resolution)
    overrides = [] if chosen is None else [f"backbone.resolution={chosen}"]
    recipe, dataset, backbone, method, step = load_run(run_dir, overrides)
    samples, bad = load_samples(spec, root, dataset, run_image_size(dataset, backbone))
    cfg = _eval_config(recipe, None, latent_block).model_copy(update={"max_samples": max_samples})
    result = evaluate(backbone, samples, method, cfg)
    answer_texts(samples, result.predictions)
    suffix = _mode_suffix(recipe, latent_block)
    if suffix:
        spec = spec.model_copy(update={"name": spec.name + suffix})
    extra: dict[str, object] = {}
    if result.wrote_block is not None:
        extra.update(latent_block="generated", wrote_block=result.wrote_block)
    if backbone.resizes_itself:
        extra["resolution"] = "processor"
    return write_bench(run_dir, spec, result.predictions, bad, step, extra or None)


def evaluate_replacements(
    run_dir: Path,
    split: str,
    names: list[str],
    max_samples: int | None = None,
    latent_block: str | None = None,
) -> dict:
    """Accuracy with the latent block intact and under each latent replacement (``names``, of
    :data:`~crystalkit.evaluation.replacement.REPLACEMENTS`); writes
    ``replacements_SPLIT.json`` (``replacements_SPLIT_generated.json`` ...
    for another mode than the recipe's). With generated latents the replacements act on the block
    the model writes (:func:`~crystalkit.evaluation.replacement.written_replacement`) and the
    summary adds ``wrote_block`` and, per replacement, the fraction of samples whose block was
    replaced (``replaced``)."""
    check_latent_block(latent_block)
    unknown = [name for name in names if name not in REPLACEMENTS]
    if unknown:
        raise UsageError(
            f"--replace: unknown latent replacement(s) {', '.join(unknown)}; valid: "
            f"{', '.join(REPLACEMENTS)}"
        )
    recipe, dataset, backbone, method, step = load_run(run_dir)
    if method.final_k == 0:
        raise UsageError(f"{run_dir}: the run has no latent block (K = 0): nothing to replace")
    cfg = _eval_config(recipe, max_samples, latent_block)
    if cfg.latent_block == "generated" and method.block.recurrent:
        raise UsageError(
            "generated latents need token latents: recurrent latents are hidden states, not "
            "tokens the model can write (replace with --latent-block forced)"
        )
    data = dataset.split(split)
    base = evaluate(backbone, data, method, cfg)
    results = {"none": base.accuracy}
    replaced: dict[str, float] = {}
    for name in names:
        result = control_result(backbone, data, method, cfg, name)
        results[name] = result.accuracy
        if result.wrote_block is not None:
            count = max(len(result.predictions), 1)
            replaced[name] = sum(p["replaced"] for p in result.predictions) / count
    summary = {
        "step": step,
        "split": split,
        "num_samples": base.num_samples,
        "chance": base.chance,
        "accuracy": results,
        "drop": {name: results["none"] - acc for name, acc in results.items() if name != "none"},
    }
    if base.wrote_block is not None:
        summary |= {
            "latent_block": "generated",
            "wrote_block": base.wrote_block,
            "replaced": replaced,
        }
    suffix = _mode_suffix(recipe, latent_block)
    atomic_write_json(run_dir / replacements_file(split + suffix), summary)
    return summary
