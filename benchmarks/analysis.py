"""How long does ``crystalkit analyze`` take? Wall time of the whole analysis of N samples of a
run next to one plain evaluation (greedy decoding) of the same samples, in one process.

    crystalkit train recipes/crystal_default.yaml            # or any finished run
    python benchmarks/analysis.py runs/crystal_default [--samples 512] [--threads 2]

The analysis writes ``analysis_test.json`` / ``.png`` into the run, as the command does. Prints
both times and their ratio (the ratio is what to compare across machines).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from crystalkit.analysis.report import analyze_run
from crystalkit.evaluation.accuracy import evaluate
from crystalkit.runs.load import load_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    recipe, dataset, backbone, method, _ = load_run(args.run_dir)
    start = time.perf_counter()
    eval_cfg = recipe.eval.model_copy(update={"max_samples": args.samples})
    evaluate(backbone, dataset.split("test"), method, eval_cfg)
    plain = time.perf_counter() - start

    start = time.perf_counter()
    report = analyze_run(args.run_dir, "test", args.samples)
    analysis = time.perf_counter() - start
    print(f"{args.run_dir}: {report['num_samples']} samples, {args.threads} threads")
    print(f"  plain evaluation  {plain:6.1f} s")
    print(f"  analysis          {analysis:6.1f} s  ({analysis / plain:.1f}x the evaluation)")


if __name__ == "__main__":
    main()
