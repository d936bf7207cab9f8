"""Run a grid's cells: skip finished ones, retry failed or interrupted ones, never let one cell
stop the others.

Each cell trains in its own process through the plain :func:`~crystalkit.training.trainer.train`
function — locally (``--jobs N`` processes at a time) or as a Slurm job array through submitit.
The cell's folder holds the run itself (recipe, metrics, checkpoints, ``results.json``), its log
``train.log`` and ``status.json``. A cell counts as done only when ``status.json`` says so *and*
``results.json`` exists; both are written atomically, so a killed process or a Ctrl-C leaves
nothing the next invocation would trust. Unfinished cells resume from their last checkpoint. A
finished cell whose third-party components' code changed since it trained (another plugin
version, an edited ``file.py``: :mod:`crystalkit.provenance`) is ``code changed`` and trains
again from the start.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args

from rich.console import Console

from crystalkit.ablation.grid import Cell, Grid, load_grid
from crystalkit.errors import first_line
from crystalkit.io import atomic_write_json
from crystalkit.runs.files import RESULTS_FILE
from crystalkit.runs.sources import code_changes, read_sources
from crystalkit.training.threads import available_cores

STATUS_FILE = "status.json"
LOG_FILE = "train.log"

State = Literal["pending", "running", "done", "failed", "code changed"]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def cell_dir(grid: Grid, cell: Cell) -> Path:
    return grid.output_dir / cell.id


def read_status(directory: Path) -> dict[str, Any]:
    """The cell's ``status.json`` (``pending`` when missing or unreadable)."""
    try:
        status = json.loads((directory / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {"state": "pending", "attempts": 0}
    return (
        status
        if isinstance(status, dict) and status.get("state") in get_args(State)
        else {"state": "pending", "attempts": 0}
    )


def cell_state(directory: Path) -> State:
    """``done`` needs both the status and the results file, and the code of the cell's
    third-party components as it was (else ``code changed``); a ``running`` cell whose process
    is gone (killed, Ctrl-C, machine reboot) counts as ``failed``, to be resumed."""
    status = read_status(directory)
    state = status["state"]
    if state == "done":
        if not (directory / RESULTS_FILE).is_file():
            return "failed"
        return "code changed" if code_changes(read_sources(directory)) else "done"
    if state == "running" and not _alive(status):
        return "failed"
    return state


def _alive(status: dict[str, Any]) -> bool:
    if status.get("host") != socket.gethostname():
        return True  # another machine's job (Slurm): trust its status
    pid = status.get("pid")
    if not isinstance(pid, int) or not 0 < pid < 2**31:  # 0 or less would signal a group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_status(directory: Path, **fields: Any) -> None:
    status = read_status(directory) | fields
    atomic_write_json(directory / STATUS_FILE, status)


def _mark_failed(directory: Path, error: str) -> None:
    """Record a failure the cell's own process could not (it was killed, or never started)."""
    directory.mkdir(parents=True, exist_ok=True)
    _write_status(directory, state="failed", finished=_now(), error=error)


def run_cell(grid_path: str, cell: Cell, num_threads: int | None = None) -> dict[str, Any]:
    """Train one cell (in its own process), resuming its last checkpoint; returns its results.
    Output goes to the cell's ``train.log``; the outcome to its ``status.json``."""
    from crystalkit.training.trainer import train

    grid = load_grid(grid_path)
    directory = cell_dir(grid, cell)
    retrain = cell_state(directory) == "code changed"  # from the start, with the new code
    directory.mkdir(parents=True, exist_ok=True)
    previous = read_status(directory).get("attempts", 0)
    attempts = (previous if isinstance(previous, int) else 0) + 1
    _write_status(
        directory,
        state="running",
        cell=cell.id,
        label=cell.label(),
        seed=cell.seed,
        overrides=list(cell.overrides),
        attempts=attempts,
        pid=os.getpid(),
        host=socket.gethostname(),
        started=_now(),
        finished=None,
        error=None,
    )
    with open(directory / LOG_FILE, "a", encoding="utf-8") as log:
        log.write(f"--- attempt {attempts} at {_now()} ---\n")
        log.flush()
        os.dup2(log.fileno(), sys.stdout.fileno())
        os.dup2(log.fileno(), sys.stderr.fileno())
        try:
            result = train(
                grid.recipe(cell),
                run_dir=directory,
                resume=not retrain,
                overwrite=retrain,
                console=Console(file=sys.stderr, width=120),
                num_threads=num_threads,
                log_group=grid.path.stem,  # a grid's cells share a W&B group
            )
        except BaseException as exc:
            traceback.print_exc()
            sys.stderr.flush()
            _write_status(
                directory,
                state="failed",
                finished=_now(),
                error=f"{type(exc).__name__}: {first_line(exc)}",
            )
            raise
    summary = result.final.summary() if result.final is not None else {}
    _write_status(directory, state="done", finished=_now())
    return summary


def _child(grid_path: str, cell: Cell, num_threads: int | None) -> None:
    try:
        run_cell(grid_path, cell, num_threads)
    except BaseException:
        sys.exit(1)


@dataclass
class GridOutcome:
    done: list[Cell]
    skipped: list[Cell]
    failed: list[Cell]


def pending_cells(grid: Grid, cells: list[Cell] | None = None) -> tuple[list[Cell], list[Cell]]:
    """(cells to run, cells already done) among ``cells`` (default: the grid's cells)."""
    todo, done = [], []
    for cell in grid.cells() if cells is None else cells:
        state = cell_state(cell_dir(grid, cell))
        if state == "done":
            done.append(cell)
        elif state == "running":
            continue  # alive elsewhere (another invocation, another host)
        else:
            todo.append(cell)
    return todo, done


def run_local(
    grid: Grid, jobs: int, console: Console, threads: int | None = None, poll: float = 0.5
) -> GridOutcome:
    """Run the unfinished warm-start sources, then the unfinished cells, ``jobs`` processes at a
    time, each with ``threads`` torch threads (default: its share of the available cores) unless
    its recipe sets ``train.num_threads``. A cell whose source failed fails without running."""
    threads = threads or max(1, available_cores() // jobs)
    sources_todo, _ = pending_cells(grid, grid.sources())
    todo, done = pending_cells(grid)
    for cell in [*sources_todo, *todo]:
        grid.recipe(cell)  # a bad cell fails here, before anything runs
    finished, failed = _run_processes(grid, sources_todo, jobs, threads, console, poll)
    lost = {cell.seed for cell in failed}
    for cell in [c for c in todo if c.seed in lost]:
        _mark_failed(cell_dir(grid, cell), f"the warm-start source of seed {cell.seed} failed")
        failed.append(cell)
        console.print(f"[red]failed[/]  {cell.id}  {cell.label()}: its warm-start source failed")
    todo = [c for c in todo if c.seed not in lost]
    ran, broke = _run_processes(grid, todo, jobs, threads, console, poll)
    return GridOutcome(finished + ran, done, failed + broke)


def _run_processes(
    grid: Grid, todo: list[Cell], jobs: int, threads: int, console: Console, poll: float
) -> tuple[list[Cell], list[Cell]]:
    """Train ``todo`` in child processes, ``jobs`` at a time: (finished, failed)."""
    context = multiprocessing.get_context("spawn")
    queue, running = deque(todo), {}
    finished, failed = [], []
    try:
        while queue or running:
            while queue and len(running) < jobs:
                cell = queue.popleft()
                again = cell_state(cell_dir(grid, cell)) == "code changed"
                process = context.Process(
                    target=_child, args=(str(grid.path), cell, threads), daemon=False
                )
                process.start()
                running[cell.id] = (process, cell, time.perf_counter())
                note = "  (code changed: trains from the start)" if again else ""
                console.print(f"[dim]started[/] {cell.id}  {cell.label()}  seed {cell.seed}{note}")
            time.sleep(poll)
            for key, (process, cell, start) in list(running.items()):
                if process.is_alive():
                    continue
                process.join()
                del running[key]
                directory = cell_dir(grid, cell)
                minutes = (time.perf_counter() - start) / 60
                if process.exitcode == 0 and cell_state(directory) == "done":
                    finished.append(cell)
                    console.print(
                        f"[green]done[/]    {cell.id}  {cell.label()}  ({minutes:.1f} min)"
                    )
                else:
                    if read_status(directory)["state"] == "running":  # killed: no chance to say so
                        _mark_failed(directory, f"process exited with code {process.exitcode}")
                    failed.append(cell)
                    error = read_status(directory).get("error")
                    console.print(
                        f"[red]failed[/]  {cell.id}  {cell.label()}: {error} "
                        f"(log: {directory / LOG_FILE}; re-run to retry)"
                    )
    except KeyboardInterrupt:
        for process, cell, _ in running.values():
            process.terminate()
            process.join()
            _mark_failed(cell_dir(grid, cell), "interrupted")
        raise
    return finished, failed


def run_submitit(
    grid: Grid,
    cluster: str | None,
    console: Console,
    wait: bool | None = None,
    threads: int | None = None,
) -> GridOutcome:
    """Submit the unfinished cells as one job array through submitit (``cluster="local"`` runs
    them as local processes; ``None`` lets submitit pick Slurm when it is available). Unfinished
    warm-start sources go first, as their own array; on Slurm the cells are submitted by the
    next invocation, once the sources are done. ``threads``: torch threads of the cells whose
    recipe sets none (default: the cores of the node a cell lands on)."""
    import submitit

    sources_todo, _ = pending_cells(grid, grid.sources())
    todo, done = pending_cells(grid)
    for cell in [*sources_todo, *todo]:
        grid.recipe(cell)
    executor = submitit.AutoExecutor(folder=grid.output_dir / "submitit", cluster=cluster)
    executor.update_parameters(**grid.spec.slurm)
    waits = wait is not False and not (wait is None and executor.cluster == "slurm")
    finished, failed = [], []
    if sources_todo:
        batch = _submit(executor, grid, sources_todo, console, "warm-start sources", threads)
        if not waits:
            console.print("re-run this command once the sources are done to submit the cells")
            return GridOutcome([], done, [])
        finished, failed = _collect(batch, grid, console)
        lost = {c.seed for c in failed}
        failed += [c for c in todo if c.seed in lost]
        todo = [c for c in todo if c.seed not in lost]
    if not todo:
        return GridOutcome(finished, done, failed)
    batch = _submit(executor, grid, todo, console, "cells", threads)
    if not waits:
        return GridOutcome([], done, [])
    ran, broke = _collect(batch, grid, console)
    return GridOutcome(finished + ran, done, failed + broke)


def _submit(
    executor: Any, grid: Grid, cells: list[Cell], console: Console, what: str, threads: int | None
) -> list:
    paths, counts = [str(grid.path)] * len(cells), [threads] * len(cells)
    jobs = executor.map_array(run_cell, paths, cells, counts)
    console.print(
        f"submitted {len(jobs)} {what} to {executor.cluster}: job {jobs[0].job_id.split('_')[0]}"
    )
    return list(zip(jobs, cells, strict=True))


def _collect(batch: list, grid: Grid, console: Console) -> tuple[list[Cell], list[Cell]]:
    finished, failed = [], []
    for job, cell in batch:
        if job.exception() is None:
            finished.append(cell)
        else:
            failed.append(cell)
            error = read_status(cell_dir(grid, cell)).get("error")
            console.print(f"[red]failed[/]  {cell.id}  {cell.label()}: {error}")
    return finished, failed
