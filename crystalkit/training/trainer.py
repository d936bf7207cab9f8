"""The training loop: a plain function that the CLI and the grid runners call.

A run is a sequence of stages (:mod:`crystalkit.config.stages`; one for a recipe without
``stages:``), each with its own method, schedules and a fresh optimizer, optionally started from
another run's weights (:mod:`crystalkit.training.warm_start`).

Determinism on CPU: model init from ``seed``; each step re-seeds torch from ``(seed, step)`` and
draws its batch from :class:`StepSampler`, so a resumed run replays the exact batches and random
ops an uninterrupted run would have, and ends with the same weights, whatever stage it stopped in.

The loop reads as a recipe (:class:`_TrainingRun`): set up, then per step train, log, evaluate
and checkpoint when due, then finish.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch.utils.data import Dataset

from crystalkit.config.loader import dump_recipe
from crystalkit.config.schema import ComponentSpec, Recipe
from crystalkit.config.stages import SINGLE_STAGE, Stage, plan_stages, stage_at
from crystalkit.crystal.method import Method
from crystalkit.device import check_device
from crystalkit.errors import CheckpointError, PerformanceWarning, PluginError, UsageError
from crystalkit.evaluation import EvalResult, evaluate
from crystalkit.evaluation.controls import run_controls
from crystalkit.evaluation.inspect import sample_figure
from crystalkit.io import atomic_write_text
from crystalkit.latents.blocks import reset_token_rows
from crystalkit.models.backbone import Backbone
from crystalkit.runs.build import build_dataset, build_model
from crystalkit.runs.checkpoint import (
    Checkpoint,
    latest_checkpoint,
    load_trainer_state,
    load_weights,
    save_checkpoint,
)
from crystalkit.runs.files import RECIPE_FILE
from crystalkit.runs.snapshot import write_snapshot
from crystalkit.runs.sources import read_sources, warn_code_changes, write_sources
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
from crystalkit.training.progress import RunProgress
from crystalkit.training.run_dir import (
    FreshOutputs,
    check_resumable,
    check_run_dir,
    clear_outputs,
    default_run_dir,
    normalised,
    write_results,
)
from crystalkit.training.threads import Window, check_oversubscription, resolve_num_threads
from crystalkit.training.warm_start import load_source

__all__ = ["TrainResult", "check_resumable", "default_run_dir", "train"]

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final: EvalResult | None


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
    ``num_threads``: the torch threads when the recipe sets no ``train.num_threads`` (an explicit
    count always wins; a grid runner sharing the machine passes its share of the cores); with
    neither, :func:`~crystalkit.training.threads.resolve_num_threads` decides. It is how the run
    executes, not what it computes, so resuming does not compare it. On CPU, a run whose threads
    starve on an oversubscribed machine warns once (:class:`PerformanceWarning`).

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
    run_dir = normalised(Path(run_dir)) if run_dir is not None else default_run_dir(recipe)
    leftover = check_run_dir(run_dir, recipe, resume, overwrite)
    if leftover and parallel.world.main:
        console.print(f"{run_dir}: a run stopped here before its first checkpoint; starting over")
    torch.set_num_threads(resolve_num_threads(recipe.train.num_threads or num_threads))
    outputs = FreshOutputs(run_dir)
    try:
        with ExitStack() as closing:  # the run's loggers: closed before outputs.discard()
            run = _TrainingRun(
                recipe,
                parallel,
                run_dir=run_dir,
                resume=resume and not leftover,
                console=console,
                stop_after=stop_after,
                outputs=outputs,
            )
            return run.run(loggers, log_group, closing)
    except BaseException:
        outputs.discard()
        raise


@dataclass
class _StepValues:
    """What a training step hands to :meth:`_TrainingRun.log`. ``shares`` are this rank's
    ``[loss, *terms]``, summed over its micro-batches; only a log step sums them over the ranks
    (every rank takes part in that)."""

    shares: torch.Tensor
    terms: tuple[str, ...]
    weights: dict[str, float]
    k: int
    lr: float
    grad_norm: float


class _TrainingRun:
    """One call of :func:`train`, as a recipe: :meth:`setup`; then for each step
    :meth:`train_step` and, when due, :meth:`log`, :meth:`evaluate` and :meth:`checkpoint`
    (:meth:`enter_stage` where a stage starts); then :meth:`finish`."""

    def __init__(
        self,
        recipe: Recipe,
        parallel: Replicas,
        *,
        run_dir: Path,
        resume: bool,
        console: Console,
        stop_after: int | None,
        outputs: FreshOutputs,
    ):
        self.recipe, self.cfg = recipe, recipe.train
        self.parallel, self.world = parallel, parallel.world
        self.device = self.world.device(recipe.device)
        self.run_dir, self.resume, self.console, self.outputs = run_dir, resume, console, outputs
        self.end = self.cfg.steps if stop_after is None else min(stop_after, self.cfg.steps)
        # a sharded model evaluates together
        self.evaluating = self.world.main or parallel.collective_forward
        # several threads on a busy machine: warned about once per run
        self.watch_threads = self.device.type == "cpu" and self.world.main
        self.loggers: Loggers | None = None

    def run(
        self, loggers: list[ComponentSpec], log_group: str | None, closing: ExitStack
    ) -> TrainResult:
        """Train from the checkpoint (or step 0) to the end; ``closing`` closes the loggers."""
        self.setup(loggers, log_group, closing)
        cfg = self.cfg
        self.backbone.train()
        self.window = Window()  # samples/s of the training steps since it opened
        started = time.perf_counter()
        self.progress = RunProgress(
            self.console,
            self.recipe.name,
            steps=cfg.steps,
            start=self.start,
            end=self.end,
            stages=len(self.plan),
            main=self.world.main,
            started=started,
        )
        with self.progress:
            for step in range(self.start, self.end):
                if step == self.start or step >= self.stage.stop:
                    self.enter_stage(step)
                with self._naming(step):
                    values = self.train_step(step)
                done = step + 1
                if done % cfg.log_every == 0 or done == self.end:
                    self.log(done, values)
                self.progress.advance(done)
                periodic = cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps
                if periodic and self.evaluating:
                    self.evaluate(done)
                if (cfg.save_every and done % cfg.save_every == 0) or done == self.end:
                    self.checkpoint(done)
        return self.finish(train_time=time.perf_counter() - started)

    @contextmanager
    def _naming(self, step: int) -> Iterator[None]:
        """A plugin's error or a usage error raised inside names the step and stage, so a
        component that fails only on some batch is found where it failed."""
        try:
            yield
        except (PluginError, UsageError) as exc:
            where = f"step {step + 1}/{self.cfg.steps}"
            stage = f", stage {self.stage.name}" if len(self.plan) > 1 else ""
            error = PluginError if isinstance(exc, PluginError) else UsageError
            raise error(f"{where}{stage}: {exc}") from exc

    def setup(
        self, loggers: list[ComponentSpec], log_group: str | None, closing: ExitStack
    ) -> None:
        """Data, a fresh start's run dir (with the warm-start snapshot), the model (resumed from
        the latest checkpoint where there is one), the stages and rank 0's loggers."""
        checkpoint = latest_checkpoint(self.run_dir) if self.resume else None
        self.world.barrier()  # every rank has read the run dir before rank 0 changes it
        torch.manual_seed(self.recipe.seed)
        self.dataset = build_dataset(self.recipe)
        evaluated = self.recipe.eval
        periodic = [evaluated.split, *evaluated.extra_splits] if self.cfg.eval_every else []
        for split in (*periodic, evaluated.final_split):
            self.dataset.split(split)  # a misspelt split stops here, not after hours of training
        if checkpoint is None and self.world.main:
            self._start_outputs()
        self.world.barrier()  # the warm-start snapshot is complete before any rank reads it
        self._setup_model(checkpoint)
        self.plan = plan_stages(self.recipe)
        _check_stages(self.recipe, self.plan, self.model.introduced)
        latents = self.recipe.latents
        self.frozen_rows = self.backbone.token_matrices() if latents.train_new_rows_only else []
        self._setup_start(checkpoint)
        if self.world.main:  # only the main process logs; a resumed run continues its logs
            info = LogRun(
                self.run_dir, self.recipe.name, self.recipe.to_dict(), self.start, log_group
            )
            self.loggers = closing.enter_context(Loggers(loggers, info))
        self.train_split = self.dataset.split("train")
        self.sampler = StepSampler(len(self.train_split), self.cfg.batch_size, self.recipe.seed)
        self.micro_batches = self.world.micro_batches(
            self.cfg.batch_size, self.cfg.grad_accum_steps
        )

    def _start_outputs(self) -> None:
        """Rank 0 of a run that starts at step 0: clear what a previous run left and write the
        warm-start snapshot (a bad source is refused before anything is cleared)."""
        warm = self.recipe.warm_start.source is not None
        source = load_source(self.recipe, self.dataset) if warm else None
        if self.resume:
            self.console.print(
                f"{self.run_dir}: no complete checkpoint to resume from; starting at step 0"
            )
        self.outputs.claim()
        clear_outputs(self.run_dir)
        if source is not None:
            write_snapshot(source.backbone, source.record, self.run_dir)
            record = source.record
            self.console.print(
                f"warm start from {record['source']} (step {record['step']}"
                + (", LoRA merged" if record["lora_merged"] else "")
                + ")"
            )

    def _setup_model(self, checkpoint: Checkpoint | None) -> None:
        """The model with the latent tokens of every stage, then LoRA (all before the optimizer
        sees the parameters), on its device, in its data-parallel form."""
        warm = self.recipe.warm_start.source is not None
        assets = self.run_dir if checkpoint or warm else None
        self.model = build_model(self.recipe, self.dataset, assets=assets, device=self.device)
        self.backbone = self.model.backbone
        if self.cfg.gradient_checkpointing:
            self.backbone.enable_gradient_checkpointing()
        self.backbone.to(self.device)
        if checkpoint is not None:
            load_weights(self.backbone, checkpoint)
        self.parallel.prepare(self.backbone, self.device)

    def _setup_start(self, checkpoint: Checkpoint | None) -> None:
        """The first step and the trainer state to resume from; a fresh run (rank 0) writes its
        resolved recipe, its plugins' sources and the backbone's assets."""
        self.start, self.state = 0, None
        if checkpoint is not None:
            self.state = load_trainer_state(checkpoint)
            self.start = checkpoint.step
            if self.world.main:
                self.console.print(f"resuming {self.run_dir} from step {self.start}")
                warn_code_changes(self.run_dir, read_sources(self.run_dir))
        elif self.world.main:
            atomic_write_text(self.run_dir / RECIPE_FILE, dump_recipe(self.recipe))
            write_sources(self.run_dir, self.recipe)  # what to install if a plugin is missing later
            self.backbone.save_assets(self.run_dir)

    def enter_stage(self, step: int) -> None:
        """Switch to the stage of ``step``: its method and a fresh optimizer (mid-stage, a
        resumed run restores its state); where the stage starts, its new latent rows reset."""
        stage = stage_at(self.plan, step)
        self.stage, self.method = stage, self.model.stage_methods[stage.index]
        self.shard_loss = ShardLoss(self.method)
        resumed = self.state if step == self.start and step > stage.start else None
        self.opt = _StageOptimizer(self.backbone, stage, self.parallel, self.frozen_rows, resumed)
        if step == stage.start:
            init_from = stage.recipe.latents.init_from or self.backbone.tokenizer.eos_token
            reset_token_rows(self.backbone, list(self.model.introduced[stage.index]), init_from)
        self.progress.enter_stage(stage, self.method, step)

    def train_step(self, step: int) -> _StepValues:
        """One optimizer step: the global batch laid out (and corrupted) as one process would,
        this rank's micro-batches forward and backward, gradients synced, the optimizer step."""
        method, local, seed = self.method, self.stage.local(step), self.recipe.seed
        torch.manual_seed(self.world.step_seed(seed, step))
        samples = [self.train_split[i] for i in self.sampler.indices(step)]
        layout = method.layout(samples, local, corrupt_seed=derived_seed(seed, step))
        weights = method.weights_at(local)
        global_counts = unit_counts(layout)
        self.opt.optimizer.zero_grad(set_to_none=True)
        shares = []  # this rank's shares of [loss, *terms], one per micro-batch
        for rows in self.micro_batches:
            micro = layout.rows(rows)
            with _autocast(self.device, self.cfg.precision):
                total, terms = method.loss(self.backbone, micro.to(self.device), weights)
            loss, terms = self.shard_loss(total, terms, unit_counts(micro), global_counts, weights)
            self.parallel.backward(self.opt.scaler.scale(loss))
            shares.append(torch.stack([loss.detach(), *terms.values()]).float())
        self.parallel.sync(self.backbone)
        grad_norm = self.opt.step()
        self.window.samples += len(samples)
        lr = self.opt.scheduler.get_last_lr()[0]
        summed = torch.stack(shares).sum(0)
        return _StepValues(summed, tuple(terms), weights, method.k_at(local), lr, grad_norm)

    def log(self, done: int, values: _StepValues) -> None:
        """The metrics record of step ``done`` to the loggers and the progress display."""
        rate = self._samples_per_s()
        loss, *term_values = self.world.sum(values.shares).tolist()
        terms = dict(zip(values.terms, term_values, strict=True))
        record = {
            "step": done,
            "stage": self.stage.name,
            "loss": loss,
            **{f"loss/{k}": v for k, v in terms.items()},
            **{f"weight/{k}": v for k, v in values.weights.items()},
            "k": values.k,
            "lr": values.lr,
            "grad_norm": values.grad_norm,
            "samples_per_s": rate,
        }
        if self.loggers is not None:
            self.loggers.log(record)
        self.progress.logged(done, record, terms)
        self.window = Window()

    def _samples_per_s(self) -> float:
        """The training rate since the window opened; on CPU, a starved run warns (once)."""
        rate = self.window.samples / max(time.perf_counter() - self.window.wall, 1e-9)
        if self.watch_threads:
            slow = check_oversubscription(self.window, torch.get_num_threads(), rate)
            if slow is not None:
                warnings.warn(slow, PerformanceWarning, stacklevel=2)
                self.watch_threads = False
        return rate

    def evaluate(self, done: int) -> None:
        """The periodic evaluation on ``eval.split`` and ``eval.extra_splits``; its time is left
        out of samples/s."""
        for split in dict.fromkeys([self.recipe.eval.split, *self.recipe.eval.extra_splits]):
            result = self._evaluate(done, split, self.stage, self.method)
            if self.world.main:
                self.progress.print(
                    f"step {done}: {split} accuracy {result.accuracy:.1%} "
                    f"(chance {result.chance:.1%})"
                )
        self.window = Window()  # rate: training only

    def _evaluate(self, step: int, split_name: str, stage: Stage, method: Method) -> EvalResult:
        """Evaluate ``method`` on a split; rank 0 logs the result and, for loggers that take
        images, the inspect figure of the split's first sample."""
        split = self.dataset.split(split_name)
        result = evaluate(self.backbone, split, method, self.recipe.eval)
        if self.loggers is not None:
            record = {"step": step, "stage": stage.name, "split": split_name}
            self.loggers.log(record | result.summary())
            drawable = method.final_k and self.backbone.image_grid is not None and len(split)
            if self.loggers.wants_images and drawable and not self.parallel.collective_forward:
                figure = _inspect_figure(self.backbone, method, split)
                self.loggers.image(step, f"inspect/{split_name}", figure)
        return result

    def checkpoint(self, done: int) -> None:
        """Save the weights and optimizer state (rank 0 writes what every rank gathered); from
        the first checkpoint on, a failure keeps the run dir."""
        parallel, opt = self.parallel, self.opt
        weights_state, optimizer_state = parallel.checkpoint_state(self.backbone, opt.optimizer)
        if self.world.main:
            save_checkpoint(
                self.run_dir,
                done,
                weights_state,
                opt.state(optimizer_state),
                self.cfg.keep_checkpoints,
                meta={"stage": self.stage.name},
            )
            self.outputs.keep()
        self.window = Window()

    def finish(self, train_time: float) -> TrainResult:
        """Unless stopped early: the final evaluation, the controls and ``results.json``."""
        world, recipe, run_dir, end = self.world, self.recipe, self.run_dir, self.end
        world.barrier()  # rank 0's last checkpoint is complete before any rank returns
        if end < self.cfg.steps:
            return TrainResult(run_dir, end, None)
        split, method = recipe.eval.final_split, self.model.method
        final = self._evaluate(end, split, self.plan[-1], method) if self.evaluating else None
        if world.main:
            final.save(run_dir, split, end)
            controls = run_controls(
                self.backbone, self.dataset.split(split), method, recipe.eval, recipe.eval.controls
            )
            seconds = train_time if self.start == 0 else None
            write_results(run_dir, recipe, final, end, seconds, self.plan, controls)
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


def _inspect_figure(backbone: Backbone, method: Method, split: Dataset) -> bytes:
    """`crystalkit inspect`'s figure of the split's first sample: where the latents look."""
    training = backbone.training
    backbone.eval()
    try:
        return sample_figure(backbone, method, split[0], 0)
    finally:
        backbone.train(training)


def _check_stages(recipe: Recipe, plan: list[Stage], introduced: tuple) -> None:
    """Refuse what the stages would silently get wrong."""
    if recipe.train.fsdp and any(introduced):
        stage = next(s for s in plan if introduced[s.index])
        raise UsageError(
            f"stages.{stage.name}: introduces latent tokens mid-run, whose rows train.fsdp "
            "cannot initialise on sharded weights; give the first stage the largest latent "
            "block (e.g. latents.schedule.k in every stage) or train without fsdp"
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
