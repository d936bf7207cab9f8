"""What a person sees of a training run: a live progress bar on a terminal, one plain line per
log step in a log file (a cluster job, ``nohup``), where a live bar would leave one truncated
line; nothing from the ranks other than 0."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

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

from crystalkit.config.stages import Stage
from crystalkit.crystal.method import Method


class RunProgress:
    """The run's progress from step ``start`` to ``end`` (of ``steps``) in ``stages`` stages,
    shown where ``main``; ``started`` is the wall clock at ``start``, for the plain lines' ETA."""

    def __init__(
        self,
        console: Console,
        name: str,
        *,
        steps: int,
        start: int,
        end: int,
        stages: int,
        main: bool,
        started: float,
    ):
        self.console, self.name = console, name
        self.steps, self.start, self.end, self.stages = steps, start, end, stages
        self.main, self.started = main, started
        self.shown_name = name
        self.plain = main and not (console.is_terminal or console.is_jupyter)
        self.bar = _progress_bar(console, disable=self.plain or not main)

    def __enter__(self) -> RunProgress:
        self.bar.__enter__()
        self.task = self.bar.add_task(
            escape(self.name),
            total=self.steps,
            completed=self.start,
            loss=float("nan"),
            rate=0,
            terms="",
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def enter_stage(self, stage: Stage, method: Method, step: int) -> None:
        """Name the stage in the bar (a run of several stages); announce it where it starts."""
        if self.stages == 1:
            return
        self.shown_name = f"{self.name} [{stage.name}]"
        self.bar.update(self.task, description=escape(self.shown_name))
        if self.main and step == stage.start:
            self.print(_stage_line(stage, method, self.stages))

    def logged(self, done: int, record: dict[str, Any], terms: dict[str, float]) -> None:
        """Show the record logged at step ``done``: in the bar, or as a plain line."""
        shown = " ".join(f"{k} {v:.3f}" for k, v in terms.items())
        rate = record["samples_per_s"]
        self.bar.update(self.task, loss=record["loss"], rate=rate, terms=shown)
        if self.plain:
            per_step = (time.perf_counter() - self.started) / (done - self.start)
            left = per_step * (self.end - done)
            line = _plain_line(self.shown_name, done, self.steps, record, shown, left)
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def advance(self, done: int) -> None:
        self.bar.update(self.task, completed=done)

    def print(self, text: str) -> None:
        """A line above the bar (the bar's console: it keeps the bar at the bottom)."""
        self.bar.console.print(text)


def _progress_bar(console: Console, disable: bool) -> Progress:
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


def _plain_line(
    name: str, step: int, steps: int, record: dict[str, Any], terms: str, left: float
) -> str:
    """One progress line for a log file: step, loss and its terms, lr, samples/s, ETA."""
    parts = [f"{name} step {step}/{steps} loss {record['loss']:.4f}", terms]
    parts += [f"lr {record['lr']:.3g}", f"{record['samples_per_s']:.0f} samples/s"]
    return " ".join([*filter(None, parts), f"ETA {timedelta(seconds=round(left))}"])


def _stage_line(stage: Stage, method: Method, stages: int) -> str:
    what = stage.recipe.method + (f", K {method.final_k}" if method.final_k else "")
    return (
        f"stage {stage.index + 1}/{stages} {stage.name}: steps {stage.start}-{stage.stop} "
        f"({what}, lr {stage.recipe.train.lr:g})"
    )
