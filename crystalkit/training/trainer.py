"""The training loop: a plain function that the CLI and the grid runners call.

A run is a sequence of stages (:mod:`crystalkit.config.stages`; one for a recipe without
``stages:``), each with its own method, schedules and a fresh optimizer, optionally started from
another run's weights (:mod:`crystalkit.training.warm_start`).

Determinism on CPU: model init from ``seed``; each step re-seeds torch from ``(seed, step)`` and
draws its batch from :class:`StepSampler`, so a resumed run replays the exact batches and random
ops an uninterrupted run would have, and ends with the same weights, whatever stage it stopped in.
"""

from __future__ import annotations

import shutil
import time
import warnings
from collections.abc import Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext, suppress
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch.utils.data import Dataset

from crystalkit.config.loader import dump_recipe
from crystalkit.config.schema import ComponentSpec, Recipe
from crystalkit.config.stages import SINGLE_STAGE, Stage, plan_stages, stage_at
from crystalkit.crystal.method import Method
from crystalkit.device import check_device
from crystalkit.errors import CheckpointError, PerformanceWarning, UsageError
from crystalkit.evaluation import EvalResult, evaluate
from crystalkit.evaluation.controls import run_controls
from crystalkit.evaluation.inspect import sample_figure
from crystalkit.io import atomic_write_json, atomic_write_text, read_yaml
from crystalkit.latents.blocks import reset_token_rows
from crystalkit.models.backbone import Backbone
from crystalkit.runs.build import build_dataset, build_model
from crystalkit.runs.checkpoint import (
    latest_checkpoint,
    load_trainer_state,
    load_weights,
    save_checkpoint,
)
from crystalkit.runs.files import (
    CHECKPOINTS_DIR,
    EVALUATION_PATTERNS,
    METRICS_FILE,
    RECIPE_FILE,
    RESULTS_FILE,
    SNAPSHOT_DIR,
)
from crystalkit.runs.snapshot import read_record, write_snapshot
from crystalkit.runs.sources import write_sources
from crystalkit.seeding import StepSampler, derived_seed
from crystalkit.training.distributed import (
    Replicas,
    ShardLoss,
    World,
    data_parallel,
    process_group,
    unit_counts,
)
from crystalkit.training.loggers import Loggers, LogRun
from crystalkit.training.optim import build_optimizer
from crystalkit.training.threads import Window, check_oversubscription, resolve_num_threads
from crystalkit.training.warm_start import load_source

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final: EvalResult | None


def default_run_dir(recipe: Recipe) -> Path:
    return Path(recipe.output_dir) / recipe.name


def check_resumable(recipe: Recipe, run_dir: Path | None = None) -> None:
    """``crystalkit train --resume`` continues a run: refuse (one line) where there is none, rather
    than quietly train from scratch after a mistyped name or ``--run-dir``. :func:`train` itself
    resumes what is there and starts what is not, as the ablation runner needs."""
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(recipe)
    if not (run_dir / RECIPE_FILE).is_file():
        raise UsageError(
            f"{run_dir}: no run to resume (no {RECIPE_FILE} there); check the recipe's name and "
            "output_dir or --run-dir, or drop --resume to start a new run"
        )


def _check_run_dir(run_dir: Path, recipe: Recipe, resume: bool, overwrite: bool) -> bool:
    """Refuse to train over an existing run unless told how; ``True`` for the leftovers of a run
    that stopped before its first checkpoint, which a new run reuses as if it were empty."""
    existing = next(p for p in (run_dir, *run_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(
            f"{run_dir}: {existing} is a file, not a folder (expected a run directory)"
        )
    saved = run_dir / RECIPE_FILE
    if not saved.exists():
        return False
    if overwrite:
        return False
    if latest_checkpoint(run_dir) is None and not (run_dir / RESULTS_FILE).exists():
        return True  # killed (SIGKILL, a lost node) before it could clean up: nothing to keep
    if not resume:
        raise UsageError(
            f"{run_dir}: a run already exists here; pass --resume to continue it, --overwrite to "
            "start over, or set name=... / --run-dir for a new run"
        )
    previous = read_yaml(saved, CheckpointError)
    if not isinstance(previous, dict):
        found = "an empty file" if previous is None else type(previous).__name__
        raise CheckpointError(
            f"{saved}: not a recipe (expected a mapping of keys, got {found}); pass --overwrite "
            "to start the run over"
        )
    with suppress(ValidationError):  # recipe keys added since that run take their defaults
        previous = Recipe.model_validate(previous).to_dict()
    current = recipe.to_dict()
    for tree in (previous, current):  # where metrics go is not what the run computes
        if isinstance(tree, dict) and isinstance(tree.get("train"), dict):
            tree["train"].pop("loggers", None)
    diff = _first_difference(previous, current)
    if diff is not None:
        key, old, new = diff
        raise UsageError(
            f"{saved}: cannot resume: {key} was {old!r} in the saved run but is {new!r} now "
            "(resume with the same recipe and overrides)"
        )
    return False


def _clear_outputs(run_dir: Path) -> None:
    """Remove a previous run's outputs so that nothing stale (a later checkpoint, old
    predictions) can be mistaken for this run's."""
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(run_dir / CHECKPOINTS_DIR, ignore_errors=True)
    shutil.rmtree(run_dir / SNAPSHOT_DIR, ignore_errors=True)
    for pattern in (METRICS_FILE, RESULTS_FILE, *EVALUATION_PATTERNS):
        for stale in run_dir.glob(pattern):
            stale.unlink()


class _FreshOutputs:
    """What a run that starts at step 0 writes into its run dir, removed again when the run fails
    (any exception, Ctrl-C included) before its first complete checkpoint, so that a retry does
    not find a run in the way. Only the process that writes (rank 0) claims the outputs."""

    #: written by a fresh start even where an earlier run left a file of the same name
    WRITTEN = (RECIPE_FILE, METRICS_FILE, CHECKPOINTS_DIR, SNAPSHOT_DIR)

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.claimed = False
        self.created = False
        self.before: set[str] = set()

    def claim(self) -> None:
        """Called before this run writes anything: remember what was there already."""
        self.created = not self.run_dir.exists()
        self.before = set() if self.created else {p.name for p in self.run_dir.iterdir()}
        self.claimed = True

    def keep(self) -> None:
        """Called once a complete checkpoint exists: from now on the run dir is a run."""
        self.claimed = False

    def discard(self) -> None:
        """Remove the run dir if this run created it, else what this run wrote into it. Silent:
        the error that stopped the run stays the one line the user reads."""
        if not self.claimed:
            return
        self.claimed = False
        if self.created:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        else:
            for path in list(self.run_dir.iterdir()) if self.run_dir.is_dir() else []:
                if path.name in self.before and path.name not in self.WRITTEN:
                    continue  # not this run's (an ablation cell's status.json and train.log)
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


def _first_difference(a: Any, b: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            found = _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if a == b else (prefix.rstrip("."), a, b)


def _progress(console: Console, disable: bool) -> Progress:
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
        disable=disable,
    )


def _check_checkpointing(recipe: Recipe) -> None:
    """transformers turns the KV cache off in checkpointed layers (a replay would append to it
    twice), and recurrent latents and the two-pass copy are built on that cache."""
    if not recipe.train.gradient_checkpointing:
        return
    if recipe.latents.family == "recurrent" or (
        recipe.method == "crystal" and recipe.crystal.strategy == "two_pass"
    ):
        raise UsageError(
            "train.gradient_checkpointing: not supported with latents.family=recurrent or "
            "crystal.strategy=two_pass (they need the KV cache, which transformers disables "
            "under checkpointing); use token latents with the packed strategy"
        )


def _autocast(device: torch.device, precision: str) -> AbstractContextManager[object]:
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=_AUTOCAST[precision])


def train(
    recipe: Recipe,
    *,
    run_dir: Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    stop_after: int | None = None,
    num_threads: int | None = None,
    loggers: Sequence[ComponentSpec] = (),
    log_group: str | None = None,
) -> TrainResult:
    """Train ``recipe`` to completion (or up to step ``stop_after``, for tests and schedulers).
    ``num_threads`` overrides ``train.num_threads`` (a grid runner sharing the machine sets it;
    it is how the run executes, not what it computes, so resuming does not compare it); with
    neither, the run uses :func:`~crystalkit.training.threads.resolve_num_threads` (the available cores). On CPU, a run whose
    threads starve on an oversubscribed machine warns once (:class:`PerformanceWarning`).

    Writes ``recipe.yaml`` (fully resolved), ``tokenizer.json`` and other backbone assets,
    ``metrics.jsonl``, ``checkpoints/`` and, once finished, ``results.json`` into the run dir.
    ``loggers`` are added to ``train.loggers`` (the command line's ``--logger``) and
    ``log_group`` groups the run with others (an ablation grid's cells) in loggers that group
    runs; like ``num_threads``, neither changes what the run computes.

    A run that starts at step 0 and fails (any exception, Ctrl-C included) before its first
    complete checkpoint removes what it wrote (the run dir, if it created it); a run dir that a
    killed run left with ``recipe.yaml`` but no checkpoint and no ``results.json`` is reused.

    Under ``torchrun`` / ``accelerate launch`` every process calls this and trains data-parallel
    (:mod:`crystalkit.training.distributed`): the same result as one process with the same
    global ``train.batch_size``. Rank 0 alone writes, prints and evaluates; the other ranks
    return ``final=None`` once rank 0 is done.
    """
    check_device(recipe.device)  # before any data is read or model built
    world = World.from_env()
    parallel = data_parallel(recipe, world)
    _check_checkpointing(recipe)
    with process_group(world, recipe.device):
        return _train(
            recipe,
            parallel,
            run_dir=run_dir,
            resume=resume,
            overwrite=overwrite,
            console=console,
            stop_after=stop_after,
            num_threads=num_threads,
            loggers=[*recipe.train.loggers, *loggers],
            log_group=log_group,
        )


def _train(
    recipe: Recipe,
    parallel: Replicas,
    *,
    run_dir: Path | None,
    resume: bool,
    overwrite: bool,
    console: Console | None,
    stop_after: int | None,
    num_threads: int | None,
    loggers: list[ComponentSpec],
    log_group: str | None,
) -> TrainResult:
    console = console or Console(stderr=True)
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(recipe)
    leftover = _check_run_dir(run_dir, recipe, resume, overwrite)
    if leftover and parallel.world.main:
        console.print(f"{run_dir}: a run stopped here before its first checkpoint; starting over")
    torch.set_num_threads(resolve_num_threads(num_threads or recipe.train.num_threads))
    outputs = _FreshOutputs(run_dir)
    try:
        with ExitStack() as closing:  # the loggers _run opens: closed before outputs.discard()
            return _run(
                recipe,
                parallel,
                run_dir=run_dir,
                resume=resume and not leftover,
                console=console,
                stop_after=stop_after,
                outputs=outputs,
                observers=(loggers, log_group, closing),
            )
    except BaseException:
        outputs.discard()
        raise


def _run(
    recipe: Recipe,
    parallel: Replicas,
    *,
    run_dir: Path,
    resume: bool,
    console: Console,
    stop_after: int | None,
    outputs: _FreshOutputs,
    observers: tuple[list[ComponentSpec], str | None, ExitStack],
) -> TrainResult:
    cfg, world = recipe.train, parallel.world
    device = world.device(recipe.device)

    checkpoint = latest_checkpoint(run_dir) if resume else None
    world.barrier()  # every rank has read the run dir before rank 0 changes it
    torch.manual_seed(recipe.seed)
    dataset = build_dataset(recipe)
    warm = recipe.warm_start.source is not None
    if checkpoint is None and world.main:
        source = load_source(recipe, dataset) if warm else None  # a bad source clears nothing
        if resume:
            console.print(f"{run_dir}: no complete checkpoint to resume from; starting at step 0")
        outputs.claim()
        _clear_outputs(run_dir)
        if source is not None:
            write_snapshot(source.backbone, source.record, run_dir)
            record = source.record
            console.print(
                f"warm start from {record['source']} (step {record['step']}"
                + (", LoRA merged" if record["lora_merged"] else "")
                + ")"
            )
    world.barrier()  # the warm-start snapshot is complete before any rank reads it
    # latent tokens of every stage, then LoRA: all before the optimizer sees the parameters
    model = build_model(
        recipe, dataset, assets=run_dir if checkpoint or warm else None, device=device
    )
    backbone = model.backbone
    if cfg.gradient_checkpointing:
        backbone.enable_gradient_checkpointing()
    backbone.to(device)
    if checkpoint is not None:
        load_weights(backbone, checkpoint)
    parallel.prepare(backbone, device)
    plan = plan_stages(recipe)
    _check_stages(recipe, plan, model.introduced)
    frozen_rows = backbone.token_matrices() if recipe.latents.train_new_rows_only else []
    start, state = 0, None
    if checkpoint is not None:
        state = load_trainer_state(checkpoint)
        start = checkpoint.step
        if world.main:
            console.print(f"resuming {run_dir} from step {start}")
    elif world.main:
        atomic_write_text(run_dir / RECIPE_FILE, dump_recipe(recipe))
        write_sources(run_dir, recipe)  # what to install if a plugin is missing later
        backbone.save_assets(run_dir)
    log: Loggers | None = None
    if world.main:  # only the main process logs; a resumed run continues its logs at `start`
        specs, group, closing = observers
        run_info = LogRun(run_dir, recipe.name, recipe.to_dict(), start, group)
        log = closing.enter_context(Loggers(specs, run_info))

    train_split = dataset.split("train")
    sampler = StepSampler(len(train_split), cfg.batch_size, recipe.seed)
    end = cfg.steps if stop_after is None else min(stop_after, cfg.steps)
    evaluating = world.main or parallel.collective_forward  # a sharded model evaluates together

    def run_eval(step: int, split_name: str, stage: Stage, method: Method) -> EvalResult:
        split = dataset.split(split_name)
        result = evaluate(backbone, split, method, recipe.eval)
        if log is not None:
            record = {"step": step, "stage": stage.name, "split": split_name}
            log.log(record | result.summary())
            drawable = method.final_k and backbone.image_grid is not None and len(split)
            if log.wants_images and drawable and not parallel.collective_forward:
                log.image(step, f"inspect/{split_name}", _inspect_figure(backbone, method, split))
        return result

    micro_batches = world.micro_batches(cfg.batch_size, cfg.grad_accum_steps)
    backbone.train()
    window = Window()
    watch_threads = device.type == "cpu" and world.main  # several threads on a busy machine
    train_start = time.perf_counter()
    stage: Stage | None = None
    # a log file (cluster job, nohup) gets plain lines; a live bar would leave one truncated line
    plain = world.main and not (console.is_terminal or console.is_jupyter)
    with _progress(console, disable=plain or not world.main) as progress:
        task = progress.add_task(
            escape(recipe.name),
            total=cfg.steps,
            completed=start,
            loss=float("nan"),
            rate=0,
            terms="",
        )
        for step in range(start, end):
            if stage is None or step >= stage.stop:
                stage = stage_at(plan, step)
                method = model.stage_methods[stage.index]
                shard_loss = ShardLoss(method)
                # a stage starts a fresh optimizer; mid-stage, a resumed run restores its state
                resumed = state if step == start and step > stage.start else None
                opt = _StageOptimizer(backbone, stage, parallel, frozen_rows, resumed)
                if step == stage.start:
                    init_from = stage.recipe.latents.init_from or backbone.tokenizer.eos_token
                    reset_token_rows(backbone, list(model.introduced[stage.index]), init_from)
                if len(plan) > 1:
                    progress.update(task, description=escape(f"{recipe.name} [{stage.name}]"))
                    if world.main and step == stage.start:
                        progress.console.print(_stage_line(stage, method, len(plan)))
            local = stage.local(step)
            torch.manual_seed(world.step_seed(recipe.seed, step))
            samples = [train_split[i] for i in sampler.indices(step)]
            # the global batch: corrupted as one process would
            layout = method.layout(samples, local, corrupt_seed=derived_seed(recipe.seed, step))
            weights = method.weights_at(local)
            global_counts = unit_counts(layout)
            opt.optimizer.zero_grad(set_to_none=True)
            shares = []  # this rank's shares of [loss, *terms], one per micro-batch
            for rows in micro_batches:
                micro = layout.rows(rows)
                with _autocast(device, cfg.precision):
                    total, terms = method.loss(backbone, micro.to(device), weights)
                loss, terms = shard_loss(total, terms, unit_counts(micro), global_counts, weights)
                parallel.backward(opt.scaler.scale(loss))
                shares.append(torch.stack([loss.detach(), *terms.values()]).float())
            parallel.sync(backbone)
            grad_norm = opt.step()
            window.samples += len(samples)
            done = step + 1
            if done % cfg.log_every == 0 or done == end:
                elapsed = time.perf_counter() - window.wall
                rate = window.samples / max(elapsed, 1e-9)
                if watch_threads:
                    slow = check_oversubscription(window, torch.get_num_threads(), rate)
                    if slow is not None:
                        warnings.warn(slow, PerformanceWarning, stacklevel=2)
                        watch_threads = False  # once per run
                loss_value, *term_values = world.sum(torch.stack(shares).sum(0)).tolist()
                values = dict(zip(terms, term_values, strict=True))
                record = {
                    "step": done,
                    "stage": stage.name,
                    "loss": loss_value,
                    **{f"loss/{k}": v for k, v in values.items()},
                    **{f"weight/{k}": v for k, v in weights.items()},
                    "k": method.k_at(local),
                    "lr": opt.scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    "samples_per_s": rate,
                }
                if log is not None:
                    log.log(record)
                shown = " ".join(f"{k} {v:.3f}" for k, v in values.items())
                progress.update(task, loss=record["loss"], rate=rate, terms=shown)
                if plain:
                    left = (time.perf_counter() - train_start) / (done - start) * (end - done)
                    name = recipe.name + (f" [{stage.name}]" if len(plan) > 1 else "")
                    console.print(
                        _plain_line(name, done, cfg.steps, record, shown, left),
                        markup=False,
                        highlight=False,
                        soft_wrap=True,
                    )
                window = Window()
            progress.update(task, completed=done)
            periodic = cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps
            if periodic and evaluating:
                result = run_eval(done, recipe.eval.split, stage, method)
                if world.main:
                    progress.console.print(
                        f"step {done}: {recipe.eval.split} accuracy {result.accuracy:.1%} "
                        f"(chance {result.chance:.1%})"
                    )
                window = Window()  # rate: training only
            if (cfg.save_every and done % cfg.save_every == 0) or done == end:
                weights_state, optimizer_state = parallel.checkpoint_state(backbone, opt.optimizer)
                if world.main:
                    save_checkpoint(
                        run_dir,
                        done,
                        weights_state,
                        opt.state(optimizer_state),
                        cfg.keep_checkpoints,
                        meta={"stage": stage.name},
                    )
                    outputs.keep()
                window = Window()

    train_time = time.perf_counter() - train_start
    world.barrier()  # rank 0's last checkpoint is complete before any rank returns
    if end < cfg.steps:
        return TrainResult(run_dir, end, None)
    last = plan[-1]
    final = run_eval(end, recipe.eval.final_split, last, model.method) if evaluating else None
    if world.main:
        final.save(run_dir, recipe.eval.final_split, end)
        controls = run_controls(
            backbone,
            dataset.split(recipe.eval.final_split),
            model.method,
            recipe.eval,
            recipe.eval.controls,
        )
        _write_results(
            run_dir, recipe, final, end, train_time if start == 0 else None, plan, controls
        )
    world.barrier()
    return TrainResult(run_dir, end, final if world.main else None)


class _StageOptimizer:
    """AdamW, its LR schedule and the fp16 loss scaler of one stage (each stage starts fresh),
    restored from a checkpoint's trainer state when a run resumes inside the stage."""

    def __init__(
        self,
        backbone: torch.nn.Module,
        stage: Stage,
        parallel: Replicas,
        frozen_rows: list[torch.nn.Parameter],
        state: dict[str, Any] | None,
    ):
        cfg = stage.recipe.train
        self.parallel, self.backbone, self.stage = parallel, backbone, stage
        self.grad_clip = cfg.grad_clip
        self.optimizer, self.scheduler = build_optimizer(backbone, cfg, no_decay=frozen_rows)
        self.scaler = torch.amp.GradScaler(
            next(backbone.parameters()).device.type, enabled=cfg.precision == "fp16"
        )
        if state is not None:
            saved = state.get("stage", SINGLE_STAGE)
            if saved != stage.name:
                raise CheckpointError(
                    f"checkpoint of stage {saved!r} cannot resume stage {stage.name!r} (the "
                    "recipe's stages changed since it was written)"
                )
            parallel.load_optimizer(backbone, self.optimizer, state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])

    def step(self) -> float:
        """Unscale, clip, step AdamW and the schedule; returns the gradient norm."""
        self.scaler.unscale_(self.optimizer)
        grad_norm = self.parallel.clip(self.backbone, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return grad_norm

    def state(self, optimizer_state: dict[str, Any]) -> dict[str, Any]:
        return {
            "stage": self.stage.name,
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }


def _plain_line(
    name: str, step: int, steps: int, record: dict[str, Any], terms: str, left: float
) -> str:
    """One progress line for a log file: step, loss and its terms, lr, samples/s, ETA."""
    parts = [f"{name} step {step}/{steps} loss {record['loss']:.4f}", terms]
    parts += [f"lr {record['lr']:.3g}", f"{record['samples_per_s']:.0f} samples/s"]
    return " ".join([*filter(None, parts), f"ETA {timedelta(seconds=round(left))}"])


def _inspect_figure(backbone: Backbone, method: Method, split: Dataset) -> bytes:
    """`crystalkit inspect`'s figure of the split's first sample: where the latents look."""
    training = backbone.training
    backbone.eval()
    try:
        return sample_figure(backbone, method, split[0], 0)
    finally:
        backbone.train(training)


def _stage_line(stage: Stage, method: Method, stages: int) -> str:
    what = stage.recipe.method + (f", K {method.final_k}" if method.final_k else "")
    return (
        f"stage {stage.index + 1}/{stages} {stage.name}: steps {stage.start}-{stage.stop} "
        f"({what}, lr {stage.recipe.train.lr:g})"
    )


def _check_stages(recipe: Recipe, plan: list[Stage], introduced: tuple) -> None:
    """Refuse what the stages would silently get wrong."""
    if recipe.train.fsdp and any(introduced):
        stage = next(s for s in plan if introduced[s.index])
        raise UsageError(
            f"stages.{stage.name}: introduces latent tokens mid-run, whose rows train.fsdp "
            "cannot initialise on sharded weights; give the first stage the largest latent "
            "block (e.g. latents.schedule.k in every stage) or train without fsdp"
        )


def _write_results(
    run_dir: Path,
    recipe: Recipe,
    final: EvalResult,
    steps: int,
    train_time: float | None,
    plan: list[Stage],
    controls: dict[str, float],
) -> None:
    results: dict[str, Any] = {
        "name": recipe.name,
        "steps": steps,
        "split": recipe.eval.final_split,
        **final.summary(),
        "train_seconds": train_time,
        "stages": [{"name": s.name, "start": s.start, "steps": s.steps} for s in plan],
    }
    if controls:
        results["controls"] = controls
    if recipe.warm_start.source is not None:
        record = read_record(run_dir / SNAPSHOT_DIR)
        results["warm_start"] = {k: record.get(k) for k in ("source", "step", "fingerprint")}
    atomic_write_json(run_dir / RESULTS_FILE, results)
