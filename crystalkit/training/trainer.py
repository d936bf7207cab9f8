"""The training loop: a plain function that the CLI (and, later, grid runners) call.

Determinism on CPU: model init from ``seed``; each step re-seeds torch from ``(seed, step)`` and
draws its batch from :class:`StepSampler`, so a resumed run replays the exact batches and random
ops an uninterrupted run would have, and ends with the same weights.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from crystalkit.build import build_backbone, build_dataset
from crystalkit.config.loader import dump_recipe
from crystalkit.config.schema import Recipe
from crystalkit.crystal.method import Method
from crystalkit.errors import UsageError
from crystalkit.evaluation import EvalResult, evaluate
from crystalkit.io import atomic_write_json, atomic_write_text
from crystalkit.training.checkpoint import (
    latest_checkpoint,
    load_trainer_state,
    load_weights,
    save_checkpoint,
)
from crystalkit.training.metrics import MetricsLog
from crystalkit.training.optim import build_optimizer
from crystalkit.training.sampler import StepSampler, derived_seed

RECIPE_FILE = "recipe.yaml"
RESULTS_FILE = "results.json"


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final: EvalResult | None


def default_run_dir(recipe: Recipe) -> Path:
    return Path(recipe.output_dir) / recipe.name


def _check_run_dir(run_dir: Path, recipe: Recipe, resume: bool, overwrite: bool) -> None:
    saved = run_dir / RECIPE_FILE
    if not saved.exists():
        return
    if overwrite:
        return
    if not resume:
        raise UsageError(
            f"{run_dir}: a run already exists here; pass --resume to continue it, --overwrite to "
            "start over, or set name=... / --run-dir for a new run"
        )
    previous = yaml.safe_load(saved.read_text(encoding="utf-8"))
    current = recipe.to_dict()
    diff = _first_difference(previous, current)
    if diff is not None:
        key, old, new = diff
        raise UsageError(
            f"{saved}: cannot resume: {key} was {old!r} in the saved run but is {new!r} now "
            "(resume with the same recipe and overrides)"
        )


def _clear_outputs(run_dir: Path) -> None:
    """Remove a previous run's outputs so that nothing stale (a later checkpoint, old
    predictions) can be mistaken for this run's."""
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    for pattern in ("metrics.jsonl", RESULTS_FILE, "eval_*.json", "predictions_*.jsonl"):
        for stale in run_dir.glob(pattern):
            stale.unlink()


def _first_difference(a: Any, b: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            found = _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if a == b else (prefix.rstrip("."), a, b)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[terms]}"),
        TextColumn("{task.fields[rate]:.0f} samples/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def train(
    recipe: Recipe,
    *,
    run_dir: Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    stop_after: int | None = None,
    num_threads: int | None = None,
) -> TrainResult:
    """Train ``recipe`` to completion (or up to step ``stop_after``, for tests and schedulers).
    ``num_threads`` overrides ``train.num_threads`` (a grid runner sharing the machine sets it;
    it is how the run executes, not what it computes, so resuming does not compare it).

    Writes ``recipe.yaml`` (fully resolved), ``tokenizer.json`` and other backbone assets,
    ``metrics.jsonl``, ``checkpoints/`` and, once finished, ``results.json`` into the run dir.
    """
    console = console or Console(stderr=True)
    cfg = recipe.train
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(recipe)
    _check_run_dir(run_dir, recipe, resume, overwrite)
    if num_threads or cfg.num_threads:
        torch.set_num_threads(num_threads or cfg.num_threads)
    device = torch.device(recipe.device)

    checkpoint = latest_checkpoint(run_dir) if resume else None
    torch.manual_seed(recipe.seed)
    dataset = build_dataset(recipe)
    backbone = build_backbone(recipe, dataset, assets=run_dir if checkpoint else None)
    method = Method(recipe, backbone)  # adds the latent tokens: before the optimizer sees rows
    backbone.to(device)
    frozen_rows = backbone.token_matrices() if recipe.latents.train_new_rows_only else []
    optimizer, scheduler = build_optimizer(backbone, cfg, no_decay=frozen_rows)
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    start = 0
    if checkpoint is not None:
        load_weights(backbone, checkpoint)
        state = load_trainer_state(checkpoint)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = checkpoint.step
        metrics.truncate_after(start)
        console.print(f"resuming {run_dir} from step {start}")
    else:
        if resume:
            console.print(f"{run_dir}: no complete checkpoint to resume from; starting at step 0")
        _clear_outputs(run_dir)
        atomic_write_text(run_dir / RECIPE_FILE, dump_recipe(recipe))
        backbone.save_assets(run_dir)

    train_split = dataset.split("train")
    sampler = StepSampler(len(train_split), cfg.batch_size, recipe.seed)
    end = cfg.steps if stop_after is None else min(stop_after, cfg.steps)

    def save(step: int) -> None:
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        save_checkpoint(run_dir, step, backbone, state, cfg.keep_checkpoints)

    def run_eval(step: int, split_name: str) -> EvalResult:
        result = evaluate(backbone, dataset.split(split_name), method, recipe.eval)
        metrics.append({"step": step, "split": split_name, **result.summary()})
        return result

    backbone.train()
    window_start, window_samples = time.perf_counter(), 0
    train_start = time.perf_counter()
    with _progress(console) as progress:
        task = progress.add_task(
            recipe.name, total=cfg.steps, completed=start, loss=float("nan"), rate=0, terms=""
        )
        for step in range(start, end):
            torch.manual_seed(derived_seed(recipe.seed, step))
            samples = [train_split[i] for i in sampler.indices(step)]
            layout = method.layout(samples, step).to(device)
            loss, terms = method.loss(backbone, layout)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                backbone.parameters(), cfg.grad_clip if cfg.grad_clip is not None else float("inf")
            )
            optimizer.step()
            scheduler.step()
            window_samples += len(samples)
            done = step + 1
            if done % cfg.log_every == 0 or done == end:
                elapsed = time.perf_counter() - window_start
                rate = window_samples / max(elapsed, 1e-9)
                record = {
                    "step": done,
                    "loss": loss.item(),
                    **{f"loss/{k}": v.item() for k, v in terms.items()},
                    "k": method.k_at(step),
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm),
                    "samples_per_s": rate,
                }
                metrics.append(record)
                shown = " ".join(f"{k} {v.item():.3f}" for k, v in terms.items())
                progress.update(task, loss=record["loss"], rate=rate, terms=shown)
                window_start, window_samples = time.perf_counter(), 0
            progress.update(task, completed=done)
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                result = run_eval(done, recipe.eval.split)
                progress.console.print(
                    f"step {done}: {recipe.eval.split} accuracy {result.accuracy:.1%} "
                    f"(chance {result.chance:.1%})"
                )
                window_start, window_samples = time.perf_counter(), 0  # rate: training only
            if (cfg.save_every and done % cfg.save_every == 0) or done == end:
                save(done)
                window_start, window_samples = time.perf_counter(), 0

    if end < cfg.steps:
        return TrainResult(run_dir, end, None)
    train_time = time.perf_counter() - train_start
    final = run_eval(end, recipe.eval.final_split)
    final.save(run_dir, recipe.eval.final_split, end)
    _write_results(run_dir, recipe, final, end, train_time if start == 0 else None)
    return TrainResult(run_dir, end, final)


def _write_results(
    run_dir: Path, recipe: Recipe, final: EvalResult, steps: int, train_time: float | None
) -> None:
    atomic_write_json(
        run_dir / RESULTS_FILE,
        {
            "name": recipe.name,
            "steps": steps,
            "split": recipe.eval.final_split,
            **final.summary(),
            "train_seconds": train_time,
        },
    )
