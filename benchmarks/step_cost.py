"""What does the CrystaL step cost? In one process, on the same backbone and batches: the median
time of one training step (forward, backward, optimizer) for direct finetuning, CrystaL packed and
CrystaL two-pass, and the activation memory with and without attention alignment.

    python benchmarks/step_cost.py [RECIPE] [--repeats N] [overrides...]

Memory: on CUDA the peak allocated memory of a step; on CPU (no allocator statistics) the bytes of
the tensors autograd saves for backward — the activation memory that sets a step's peak.
The issue's targets: packed <= 1.1 x (packed tokens / finetune tokens) x finetune; attention
alignment adds < 10 % memory.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from timing import median_seconds

from crystalkit.config import load_recipe
from crystalkit.crystal.method import Method
from crystalkit.crystal.packing import Segment
from crystalkit.runs.build import build_backbone, build_dataset
from crystalkit.seeding import StepSampler
from crystalkit.training.optim import build_optimizer

DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "crystal_scratch.yaml"


def saved_activation_bytes(fn) -> int:
    """Bytes of distinct storages autograd keeps for backward while ``fn`` builds the graph."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return sum(seen.values())


def peak_bytes(fn, device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return saved_activation_bytes(fn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default=str(DEFAULT_RECIPE))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    variants = {
        "finetune": ["method=finetune", "latents.schedule.k=0"],
        "crystal packed": ["crystal.strategy=packed"],
        "crystal two-pass": ["crystal.strategy=two_pass"],
        "crystal packed, no attention": ["crystal.strategy=packed", "~objectives.attention"],
    }
    base = load_recipe(args.recipe, args.overrides)
    if base.train.num_threads:
        torch.set_num_threads(base.train.num_threads)
    device = torch.device(base.device)
    torch.manual_seed(base.seed)
    dataset = build_dataset(base)
    split = dataset.split("train")
    sampler = StepSampler(len(split), base.train.batch_size, base.seed)
    samples = [[split[i] for i in sampler.indices(s)] for s in range(4)]
    # one backbone for every variant: the same weights and vocabulary (latent tokens included)
    backbone = build_backbone(base, dataset).to(device)
    Method(base, backbone)
    optimizer, _ = build_optimizer(backbone, base.train)

    results = {}
    for name, overrides in variants.items():
        recipe = load_recipe(args.recipe, [*args.overrides, *overrides])
        method = Method(recipe, backbone)
        layouts = [method.layout(batch, step).to(device) for step, batch in enumerate(samples)]

        def step(i: int, method=method, layouts=layouts) -> None:
            loss, _ = method.loss(backbone, layouts[i % len(layouts)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()

        seconds = median_seconds(step, args.repeats)
        memory = peak_bytes(
            lambda method=method, layouts=layouts: method.loss(backbone, layouts[0])[0], device
        )
        tokens = sum(int((lay.segments != Segment.PAD).sum()) for lay in layouts) / len(layouts)
        results[name] = (seconds, memory, tokens, layouts[0].input_ids.shape[1])

    ft_time, ft_mem, ft_tokens, ft_width = results["finetune"]
    threads = torch.get_num_threads()
    print(
        f"recipe {args.recipe}  batch {base.train.batch_size}  device {device}  threads {threads}"
    )
    print(
        f"{'variant':30} {'step ms':>8} {'x step':>7} {'tokens':>7} {'x tok':>6} "
        f"{'columns':>7} {'x col':>6} {'memory MB':>9} {'x mem':>6}"
    )
    for name, (seconds, memory, tokens, width) in results.items():
        print(
            f"{name:30} {seconds * 1e3:8.1f} {seconds / ft_time:7.2f} {tokens:7.0f} "
            f"{tokens / ft_tokens:6.2f} {width:7d} {width / ft_width:6.2f} "
            f"{memory / 2**20:9.1f} {memory / ft_mem:6.2f}"
        )
    packed_time, packed_mem, _, packed_width = results["crystal packed"]
    budget = 1.1 * packed_width / ft_width
    print(
        f"packed step / finetune step = {packed_time / ft_time:.2f} "
        f"(target <= {budget:.2f} = 1.1 x computed-token ratio)"
    )
    no_attention = results["crystal packed, no attention"][1]
    print(
        f"attention alignment memory overhead = {packed_mem / no_attention - 1:+.1%} (target < 10 %)"
    )
    print(f"two-pass step / packed step = {results['crystal two-pass'][0] / packed_time:.2f}")


if __name__ == "__main__":
    main()
