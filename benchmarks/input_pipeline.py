"""Is the on-the-fly synthetic data a bottleneck? Median cost of building one batch (render the
samples, corrupt the images, tokenize, lay out) relative to one training step of the same
recipe, in one process.

    python benchmarks/input_pipeline.py [RECIPE] [--repeats N] [overrides...]

Prints absolute medians (they drift on a shared machine) and the ratio (which is what to compare).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from timing import median_seconds

from crystalkit.config import load_recipe
from crystalkit.crystal.method import Method
from crystalkit.runs.build import build_backbone, build_dataset
from crystalkit.seeding import StepSampler
from crystalkit.training.optim import build_optimizer

DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "crystal_scratch.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default=str(DEFAULT_RECIPE))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.train.num_threads:
        torch.set_num_threads(recipe.train.num_threads)
    torch.manual_seed(recipe.seed)
    dataset = build_dataset(recipe)
    backbone = build_backbone(recipe, dataset)
    method = Method(recipe, backbone)
    optimizer, _ = build_optimizer(backbone, recipe.train)
    split = dataset.split("train")
    sampler = StepSampler(len(split), recipe.train.batch_size, recipe.seed)

    def build(step: int) -> object:
        return method.layout([split[i] for i in sampler.indices(1000 + step)], step)

    batches = [build(s) for s in range(4)]

    def train_step(step: int) -> None:
        loss, _ = method.loss(backbone, batches[step % len(batches)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    data = median_seconds(build, args.repeats)
    step = median_seconds(train_step, args.repeats)
    size = recipe.train.batch_size
    print(f"recipe {args.recipe}  batch {size}  threads {torch.get_num_threads()}")
    print(f"batch construction  {data * 1e3:8.1f} ms  ({size / data:7.0f} samples/s)")
    print(f"training step       {step * 1e3:8.1f} ms  ({size / step:7.0f} samples/s)")
    print(f"data / step ratio   {data / step:8.3f}")


if __name__ == "__main__":
    main()
