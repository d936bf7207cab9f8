"""Wall-clock of the main job, one seed after another, each alone on the machine.

    python benchmarks/main_job.py                          # seeds 0-4 of crystal_default.yaml
    python benchmarks/main_job.py recipes/direct_finetune.yaml --seeds 0 1 2

Each seed runs ``crystalkit train RECIPE seed=S dataset.seed=S`` in a fresh process from the
repository root (where warm starts resolve), start-up, warm start, training and the final test
pass included, as a user would, into a temporary folder.
Prints the wall-clock and the test accuracy of every seed, then mean, sd and the 95 % prediction
interval of the accuracy. Absolute times drift with the machine's load: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from crystalkit.ablation.stats import summary

ROOT = Path(__file__).resolve().parents[1]


def run(recipe: Path, seed: int, output: Path) -> tuple[float, dict]:
    command = [
        sys.executable,
        "-m",
        "crystalkit",
        "train",
        str(recipe),
        f"seed={seed}",
        f"dataset.seed={seed}",  # test items vary with the seed, as in ablations/main_job.yaml
        f"name=seed_{seed}",
        f"output_dir={output}",
    ]
    start = time.perf_counter()
    subprocess.run(
        command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    seconds = time.perf_counter() - start
    results = json.loads((output / f"seed_{seed}" / "results.json").read_text(encoding="utf-8"))
    return seconds, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", nargs="?", default=ROOT / "recipes" / "crystal_default.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = parser.parse_args()
    accuracies = []
    print(f"{Path(args.recipe).name}: seed, wall-clock, train seconds, test accuracy")
    with tempfile.TemporaryDirectory() as folder:
        for seed in args.seeds:
            seconds, results = run(Path(args.recipe), seed, Path(folder))
            accuracies.append(results["accuracy"])
            print(
                f"seed {seed}: {seconds / 60:.2f} min wall-clock, "
                f"{results['train_seconds']:.0f} s training, "
                f"test accuracy {results['accuracy']:.1%} on {results['num_samples']} samples",
                flush=True,
            )
    stats = summary(accuracies)
    line = f"mean {stats.mean:.1%} over {stats.n} seeds"
    if stats.sd is not None:
        low, high = stats.pi
        line += f", sd {stats.sd:.1%}, 95% prediction interval [{low:.1%}, {high:.1%}]"
    print(line)


if __name__ == "__main__":
    main()
