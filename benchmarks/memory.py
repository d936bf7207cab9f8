"""How much memory does a 7B training step need? Measured at the real widths on a cut model.

    python benchmarks/memory.py [RECIPE] [--layers 28] [--vision-blocks 32] [overrides...]

RECIPE (default ``benchmarks/qwen2_5_vl_7b_slice.yaml``: the paper recipe on a random
Qwen2.5-VL-7B cut to 2 decoder layers and 2 vision blocks) is built once with its LoRA; each
variant (finetune, CrystaL packed, CrystaL two-pass) runs one warm-up step and one measured step
(forward, backward, AdamW) on the same batch. Measured per variant:

* bytes autograd saves for backward (distinct storages, parameters excluded), attributed to the
  decoder layer, vision block or output head whose forward saved them — what a step holds at
  the end of its forward;
* parameter, gradient and AdamW state bytes;
* the process's peak resident memory during the measured step (``VmHWM``, reset before it).

Saved + parameters + gradients + optimizer is a **lower bound** of a step's peak: it leaves out
transient buffers (a layer's intermediates freed before backward, the full logits while the loss
reads them, gradient buffers in backward, kernel workspaces, the allocator's slack).

Extrapolation to the full model: the first decoder layer stands for every layer but the last
(which also holds the attention-alignment rows), vision block 0 for the windowed blocks and the
last vision block for the full-attention ones; parameters scale the same way.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from crystalkit.config import load_recipe
from crystalkit.crystal.method import Method
from crystalkit.crystal.packing import Segment
from crystalkit.runs.build import build_dataset, build_model
from crystalkit.training.optim import build_optimizer

DEFAULT_RECIPE = Path(__file__).resolve().parent / "qwen2_5_vl_7b_slice.yaml"
VARIANTS = {
    "finetune": ["method=finetune", "latents.schedule.k=0"],
    "crystal packed": ["crystal.strategy=packed"],
    "crystal two-pass": ["crystal.strategy=two_pass"],
}
OTHER = "rest"  # embeddings, projector, norms, loss: everything outside a layer or block
MIB, GIB = 2**20, 2**30


def scopes(backbone: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The modules saved bytes and parameters are attributed to, by name."""
    named = {f"llm.{i}": m for i, m in enumerate(backbone.language_model.layers)}
    blocks = getattr(backbone.vision_tower, "blocks", [])
    named |= {f"vision.{i}": m for i, m in enumerate(blocks)}
    named["lm_head"] = backbone.token_model.get_output_embeddings()
    return named


@contextmanager
def saved_bytes_by_scope(named: dict[str, torch.nn.Module], exclude: set[int]) -> Iterator[dict]:
    """``{scope: bytes}`` of the distinct storages autograd saves inside the block, each counted
    once, for the innermost scope running when it was first saved (storages in ``exclude``, the
    parameters, are left out)."""
    stack: list[str] = []
    owner: dict[int, tuple[str, int]] = {}
    totals: dict[str, int] = defaultdict(int)

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in exclude and ptr not in owner:
            owner[ptr] = (stack[-1] if stack else OTHER, storage.nbytes())
        return t

    def enter(name: str) -> Callable[..., None]:
        return lambda *_: stack.append(name)  # None: the module's inputs stay as they are

    def leave(*_: object) -> None:
        stack.pop()

    handles = []
    for name, module in named.items():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield totals
    finally:
        for handle in handles:
            handle.remove()
        for scope, nbytes in owner.values():
            totals[scope] += nbytes


def parameter_bytes(module: torch.nn.Module) -> tuple[int, int]:
    """``(all parameter bytes, trainable parameter bytes)``."""
    params = list(module.parameters())
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    return sum(p.numel() * p.element_size() for p in params), trainable


def peak_rss_during(fn: Callable[[], None]) -> int:
    """Peak resident bytes of this process while ``fn`` runs (Linux: ``VmHWM`` reset first)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    fn()
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def extrapolate(measured: dict[str, int], layers: int, vision_blocks: int, full: int) -> int:
    """The full model's bytes from a cut model's per-scope bytes (see the module docstring)."""
    llm = sorted((k for k in measured if k.startswith("llm.")), key=lambda k: int(k[4:]))
    vision = sorted((k for k in measured if k.startswith("vision.")), key=lambda k: int(k[7:]))
    total = measured.get(OTHER, 0) + measured.get("lm_head", 0)
    total += measured[llm[-1]] + (layers - 1) * measured[llm[0]]
    if vision:
        total += (vision_blocks - full) * measured[vision[0]] + full * measured[vision[-1]]
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default=str(DEFAULT_RECIPE))
    parser.add_argument("--layers", type=int, default=28, help="decoder layers of the full model")
    parser.add_argument("--vision-blocks", type=int, default=32, help="its vision blocks")
    parser.add_argument("--full-blocks", type=int, default=4, help="of which full attention")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if "=" in args.recipe:  # overrides without a recipe: the default one
        args.overrides.insert(0, args.recipe)
        args.recipe = str(DEFAULT_RECIPE)

    base = load_recipe(args.recipe, args.overrides)
    if base.train.num_threads:
        torch.set_num_threads(base.train.num_threads)
    device = torch.device(base.device)
    start = time.perf_counter()
    dataset = build_dataset(base)
    backbone = build_model(base, dataset).backbone.to(device)
    build_s = time.perf_counter() - start
    built_rss = peak_rss_during(lambda: None)  # resident after building: weights and all
    optimizer, _ = build_optimizer(backbone, base.train)
    sample = [dataset.split("train")[0]]
    named = scopes(backbone)
    param_ptrs = {p.untyped_storage().data_ptr() for p in backbone.parameters()}
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(base.train.precision)
    per_scope_params = {n: parameter_bytes(m) for n, m in named.items()}
    total_params, trainable = parameter_bytes(backbone)
    per_scope_params[OTHER] = (
        total_params - sum(p for p, _ in per_scope_params.values()),
        trainable - sum(t for _, t in per_scope_params.values()),
    )
    full_params = extrapolate({k: p for k, (p, _) in per_scope_params.items()}, *extent(args))
    full_trainable = extrapolate({k: t for k, (_, t) in per_scope_params.items()}, *extent(args))

    rows = []
    for name, overrides in VARIANTS.items():
        method = Method(load_recipe(args.recipe, [*args.overrides, *overrides]), backbone)
        layout = method.layout(sample, 0).to(device)
        saved: dict[str, int] = {}

        def step(method=method, layout=layout, saved=saved) -> None:
            optimizer.zero_grad(set_to_none=True)
            enabled = dtype is not None
            with (
                saved_bytes_by_scope(named, param_ptrs) as totals,
                torch.autocast(device.type, dtype=dtype, enabled=enabled),
            ):
                loss, _ = method.loss(backbone, layout)
            loss.backward()
            optimizer.step()
            saved.clear()
            saved.update(totals)

        step()  # warm-up: AdamW allocates its state
        start = time.perf_counter()
        rss = peak_rss_during(step)
        seconds = time.perf_counter() - start
        optim = sum(
            t.numel() * t.element_size()
            for state in optimizer.state.values()
            for t in state.values()
            if torch.is_tensor(t)
        )
        tokens = int((layout.segments != Segment.PAD).sum())
        activations = sum(saved.values())
        fixed = total_params + trainable + optim
        full_act = extrapolate(saved, *extent(args))
        full_fixed = full_params + full_trainable + optim * full_trainable // trainable
        rows.append((name, seconds, tokens, saved, activations, fixed, rss, full_act, full_fixed))

    threads = torch.get_num_threads()
    weights = next(iter(backbone.parameters())).dtype
    print(
        f"recipe {args.recipe}  device {device}  threads {threads}  precision "
        f"{base.train.precision}  weights {weights}  build {build_s:.0f} s, then resident "
        f"{built_rss / GIB:.2f} GiB"
    )
    print(
        f"parameters {total_params / GIB:.2f} GiB, trainable {trainable / MIB:.1f} MiB "
        f"(full model: {full_params / GIB:.2f} GiB, {full_trainable / MIB:.1f} MiB)"
    )
    last = max((k for k in named if k.startswith("llm.")), key=lambda k: int(k[4:]))
    print(f"\nCut model, MiB (saved for backward by scope; {last} is the last layer)")
    print(
        f"{'variant':18} {'step s':>6} {'tokens':>6} {'saved':>6} {'llm.0':>6} "
        f"{last:>6} {'vision':>6} {'lm_head':>7} {'rest':>6} {'params+grads+AdamW':>18} "
        f"{'lower bound':>11} {'peak RSS':>8}"
    )
    for name, seconds, tokens, saved, act, fixed, rss, _, _ in rows:
        vision = sum(v for k, v in saved.items() if k.startswith("vision."))
        print(
            f"{name:18} {seconds:6.1f} {tokens:6d} {act / MIB:6.0f} {saved['llm.0'] / MIB:6.0f} "
            f"{saved[last] / MIB:6.0f} {vision / MIB:6.0f} {saved.get('lm_head', 0) / MIB:7.0f} "
            f"{saved.get(OTHER, 0) / MIB:6.0f} {fixed / MIB:18.0f} {(act + fixed) / MIB:11.0f} "
            f"{rss / MIB:8.0f}"
        )
    print(
        f"\nFull model, GiB ({args.layers} layers, {args.vision_blocks} vision blocks of which "
        f"{args.full_blocks} full attention)"
    )
    print(
        f"{'variant':18} {'saved':>6} {'params+grads+AdamW':>18} {'lower bound':>11} "
        f"{'KiB per token and layer':>23}"
    )
    for name, _, tokens, saved, _, _, _, full_act, full_fixed in rows:
        print(
            f"{name:18} {full_act / GIB:6.1f} {full_fixed / GIB:18.1f} "
            f"{(full_act + full_fixed) / GIB:11.1f} {saved['llm.0'] / tokens / 1024:23.0f}"
        )


def extent(args: argparse.Namespace) -> tuple[int, int, int]:
    return args.layers, args.vision_blocks, args.full_blocks


if __name__ == "__main__":
    main()
