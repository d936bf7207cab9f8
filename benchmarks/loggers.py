"""What do the metric loggers cost? Wall time of the same run with ``metrics.jsonl`` alone, with
TensorBoard, and with W&B (offline: nothing leaves the machine), in one process.

    python benchmarks/loggers.py recipes/crystal_scratch.yaml train.steps=50 train.log_every=1

Each run trains into a temporary folder; the first one also pays the one-off imports, so the
jsonl-only run goes first and is repeated last. Prints each time and its ratio to jsonl alone (the
ratio is what to compare across machines). The figure each evaluation draws for TensorBoard and
W&B is included: add ``train.eval_every=N`` to measure it.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

from rich.console import Console

from crystalkit.config.loader import load_recipe
from crystalkit.training.trainer import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")

    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        for i, loggers in enumerate(["[]", "[tensorboard]", "[wandb]", "[]"]):
            recipe = load_recipe(
                args.recipe,
                [
                    *args.overrides,
                    f"output_dir={folder}",
                    f"name=run{i}",
                    f"train.loggers={loggers}",
                ],
            )
            start = time.perf_counter()
            train(recipe, console=Console(file=io.StringIO()))
            times[f"{loggers} #{i}"] = time.perf_counter() - start
    base = list(times.values())[-1]
    for name, seconds in times.items():
        print(f"{name:18} {seconds:7.2f} s  x{seconds / base:.2f}")


if __name__ == "__main__":
    main()
