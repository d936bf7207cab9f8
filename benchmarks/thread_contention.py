"""Training beside a competing process: samples/s with 1 and 2 torch threads, and what the OpenMP
wait policy does to it.

    python benchmarks/thread_contention.py                       # 60 steps of direct_finetune
    python benchmarks/thread_contention.py --steps 120 --repeats 3

Every configuration trains in a fresh process (the OpenMP runtime reads its environment once, when
torch loads it), first alone, then while a competitor keeps one core busy (``--competitor busy``, a Python busy
loop) or trains itself with 2 threads (``--competitor train``, two trainings on one machine). A configuration is a thread count and the environment the run
starts with:

* ``spin`` — ``OMP_WAIT_POLICY=ACTIVE``: a thread that reaches a barrier spins until the others
  arrive (what the OpenMP runtime does for a while by default);
* ``default`` — no wait-policy variable set;
* ``passive`` — ``OMP_WAIT_POLICY=PASSIVE``: a waiting thread sleeps at once;
* ``auto`` — ``train.num_threads`` not set: crystalkit takes the cores nobody else keeps busy
  when the run starts (``resolve_num_threads``; before, every available core).

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
#: wait policy -> what the run's environment sets
POLICIES: dict[str, dict[str, str]] = {
    "spin": {"OMP_WAIT_POLICY": "ACTIVE"},
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
}
#: (train.num_threads, wait policy); None: not set, crystalkit chooses
CONFIGS: list[tuple[int | None, str]] = [
    (1, "default"),
    (2, "spin"),
    (2, "default"),
    (2, "passive"),
    (None, "default"),
]


def train(
    recipe: Path, steps: int, threads: int | None, policy: str, folder: Path, name: str
) -> tuple[float, int]:
    """Training samples/s of one run in a fresh process, and the threads it used."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(POLICIES[policy])
    overrides = [
        f"train.steps={steps}",
        *([f"train.num_threads={threads}"] if threads else []),
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
    rate = steps * saved["train"]["batch_size"] / results["train_seconds"]
    return rate, results["num_threads"]


def competitor(kind: str, recipe: Path, folder: Path) -> subprocess.Popen:
    """A process that keeps one core busy (``busy``) or trains with 2 threads (``train``) until
    it is killed."""
    if kind == "busy":
        return subprocess.Popen([sys.executable, "-c", "while True: pass"])
    command = [sys.executable, "-m", "crystalkit", "train", str(recipe), "train.steps=1000000"]
    command += ["train.num_threads=2", "name=competitor", f"output_dir={folder}", "--overwrite"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def measure(
    args: argparse.Namespace, key: tuple[int | None, str, bool], folder: Path, tag: str
) -> tuple[float, int]:
    """One run of configuration ``key`` (alone, or beside the competitor); prints a line."""
    threads, policy, busy = key
    other = competitor(args.competitor, Path(args.recipe), folder) if busy else None
    try:
        time.sleep((30.0 if args.competitor == "train" else 1.0) if busy else 0.0)  # it runs
        name = f"{tag}_{threads or 'auto'}_{policy}_{int(busy)}"
        rate, used = train(Path(args.recipe), args.steps, threads, policy, folder, name)
    finally:
        if other is not None:
            other.kill()
            other.wait()
    where = f"beside a {args.competitor} competitor" if busy else "alone"
    label = f"{threads} thread(s)" if threads else f"auto ({used} thread(s))"
    print(f"{label}, {policy} {where}: {rate:.0f} samples/s", flush=True)
    return rate, used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", nargs="?", default=ROOT / "recipes" / "direct_finetune.yaml")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--competitor", choices=("busy", "train"), default="busy")
    args = parser.parse_args()
    rates: dict[tuple[int | None, str, bool], list[float]] = {}
    used: dict[tuple[int | None, str, bool], set[int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for busy in (False, True):
                for threads, policy in CONFIGS:
                    key = (threads, policy, busy)
                    rate, used_threads = measure(args, key, Path(tmp), f"r{repeat}")
                    rates.setdefault(key, []).append(rate)
                    used.setdefault(key, set()).add(used_threads)
    base = statistics.median(rates[(1, "default", False)])
    print(f"\nmedian training samples/s over {args.repeats} runs; ratio to 1 thread alone")
    print(
        f"| threads | wait policy | alone | ratio | beside a {args.competitor} competitor | ratio |"
    )
    print("|---|---|---|---|---|---|")
    for threads, policy in CONFIGS:
        alone = statistics.median(rates[(threads, policy, False)])
        busy = statistics.median(rates[(threads, policy, True)])
        label = threads or "auto: " + " / ".join(
            ",".join(map(str, sorted(used[(threads, policy, b)]))) for b in (False, True)
        )
        print(
            f"| {label} | {policy} | {alone:.0f} | {alone / base:.2f} | {busy:.0f} | "
            f"{busy / base:.2f} |"
        )


if __name__ == "__main__":
    main()
