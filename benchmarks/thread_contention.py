"""Training beside a competing process: samples/s with 1 and 2 torch threads, and what the OpenMP
wait policy does to it.

    python benchmarks/thread_contention.py                       # 60 steps of direct_finetune
    python benchmarks/thread_contention.py --steps 120 --repeats 3

Every configuration trains in a fresh process (the OpenMP runtime reads its environment once, when
torch loads it), first alone, then while a competitor keeps one core busy (a Python busy loop:
another job on a shared machine). A configuration is a thread count and the environment the run
starts with:

* ``spin`` — ``OMP_WAIT_POLICY=ACTIVE``: a thread that reaches a barrier spins until the others
  arrive (what the OpenMP runtime does for a while by default);
* ``default`` — no wait-policy variable set: what ``crystalkit`` does then;
* ``short spin`` — ``GOMP_SPINCOUNT=10000`` (GNU OpenMP, torch's runtime on Linux): spin briefly;
* ``passive`` — ``OMP_WAIT_POLICY=PASSIVE``: a waiting thread sleeps at once.

The rate is the run's own training samples/s (``results.json``: training steps x batch size /
training seconds; start-up and evaluation excluded). Ratios are to the 1-thread run alone,
measured in the same invocation (absolute rates drift with the machine; ratios much less). Run it
on an otherwise idle machine; it prints one line per run and a table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
#: configuration -> environment a run starts with (None: removed)
POLICIES: dict[str, dict[str, str | None]] = {
    "spin": {"OMP_WAIT_POLICY": "ACTIVE"},
    "default": {},
    "short spin": {"GOMP_SPINCOUNT": "10000"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
}
CONFIGS = [(1, "default"), (2, "spin"), (2, "default"), (2, "short spin"), (2, "passive")]


def train(recipe: Path, steps: int, threads: int, policy: str, folder: Path, name: str) -> float:
    """Training samples/s of one run in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(POLICIES[policy])
    overrides = [
        f"train.steps={steps}",
        f"train.num_threads={threads}",
        "train.eval_every=0",
        "eval.max_samples=32",
        f"name={name}",
        f"output_dir={folder}",
    ]
    command = [sys.executable, "-m", "crystalkit", "train", str(recipe), *overrides]
    subprocess.run(
        command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    results = json.loads((folder / name / "results.json").read_text(encoding="utf-8"))
    saved = yaml.safe_load((folder / name / "recipe.yaml").read_text(encoding="utf-8"))
    return steps * saved["train"]["batch_size"] / results["train_seconds"]


def competitor() -> subprocess.Popen:
    """A process that keeps one core busy until it is killed."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", nargs="?", default=ROOT / "recipes" / "direct_finetune.yaml")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rates: dict[tuple[int, str, bool], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for busy in (False, True):
                for threads, policy in CONFIGS:
                    other = competitor() if busy else None
                    try:
                        time.sleep(0.5 if busy else 0.0)  # the competitor is running
                        name = f"r{repeat}_{threads}_{policy}_{int(busy)}"
                        rate = train(
                            Path(args.recipe), args.steps, threads, policy, Path(tmp), name
                        )
                    finally:
                        if other is not None:
                            other.kill()
                            other.wait()
                    rates.setdefault((threads, policy, busy), []).append(rate)
                    where = "beside a busy core" if busy else "alone"
                    print(
                        f"{threads} thread(s), {policy:7s} {where}: {rate:.0f} samples/s",
                        flush=True,
                    )
    base = statistics.median(rates[(1, "default", False)])
    print(f"\nmedian training samples/s over {args.repeats} runs; ratio to 1 thread alone")
    print("| threads | wait policy | alone | ratio | beside a busy core | ratio |")
    print("|---|---|---|---|---|---|")
    for threads, policy in CONFIGS:
        alone = statistics.median(rates[(threads, policy, False)])
        busy = statistics.median(rates[(threads, policy, True)])
        print(
            f"| {threads} | {policy} | {alone:.0f} | {alone / base:.2f} | {busy:.0f} | "
            f"{busy / base:.2f} |"
        )


if __name__ == "__main__":
    main()
