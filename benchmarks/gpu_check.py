"""Is a GPU ready for the 7B run? One script, a few minutes on one GPU, nothing downloaded.

    python benchmarks/gpu_check.py [--out FILE] [--threads N]

On a GPU, in bf16 weights and autocast with SDPA (the vision tower on FlashAttention-2 when
``flash_attn`` is installed; the language model needs SDPA for the packed block mask), for the
test-size Qwen2.5-VL (``recipes/tiny/qwen2_5_vl.yaml``) and the 2-layer 7B-width slice
(``benchmarks/qwen2_5_vl_7b_slice.yaml``, 152,064 token rows, LoRA r16):

0. **the vision tower's kernel** (with ``flash_attn`` installed): image features of the fixed
   batch under FlashAttention-2 against SDPA, within the dtype's tolerance — the check that
   ``backbone.vision_attn_implementation: flash_attention_2`` waits for;
1. **packed = two-pass**: both paths' answer logits of one batch, no gradient, under the two
   strategies; the largest difference relative to the largest logit must stay within the
   dtype's tolerance (bf16 rounds every layer's output; fp32 only reorders sums);
2. **step time and memory**: median seconds of a finetune, a CrystaL packed and a two-pass step
   (forward, backward, AdamW; synchronised) and ``torch.cuda.max_memory_allocated`` of each;
3. **training lowers the loss**: 20 CrystaL steps (the recipe's strategy and objectives) on one
   fixed batch with AdamW at a constant lr of 1e-3; the last loss must be below the first.

Without a GPU it checks the test-size model alone, fp32 on CPU (what CI runs), lists the slice as
skipped and exits 0 when the checks pass. It writes one JSON (default ``runs/gpu_check.json``)
and exits 1 when a check fails or a configuration raises (its error is in the JSON, and the other
configuration still runs).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from crystalkit.config import load_recipe
from crystalkit.crystal.layout import Layout
from crystalkit.crystal.method import Method
from crystalkit.crystal.paths import packed, two_pass
from crystalkit.runs.build import build_dataset, build_model
from crystalkit.training.optim import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
SMALL_DATA = ["dataset.train_size=16", "dataset.val_size=4", "dataset.test_size=4"]
#: name -> (recipe, overrides, batch size, also on CPU)
CONFIGS = {
    "tiny_qwen2_5_vl": (ROOT / "recipes" / "tiny" / "qwen2_5_vl.yaml", SMALL_DATA, 4, True),
    "qwen2_5_vl_7b_slice": (ROOT / "benchmarks" / "qwen2_5_vl_7b_slice.yaml", [], 1, False),
}
#: on a GPU: the paper's precision for every configuration
GPU = ["device=cuda", "backbone.dtype=bfloat16", "train.precision=bf16"]
VARIANTS = {
    "finetune": ["method=finetune", "latents.schedule.k=0"],
    "crystal packed": ["crystal.strategy=packed"],
    "crystal two-pass": ["crystal.strategy=two_pass"],
}
#: largest |packed - two-pass| logit over the largest |logit|, by weight dtype
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
TRAIN_STEPS = 20
TRAIN = ["train.lr=1e-3", "train.lr_schedule=constant", "train.warmup_ratio=0"]
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Check:
    """One configuration: its model (built once, with the recipe's LoRA), a fixed batch, and a
    :class:`Method` per variant on that model."""

    def __init__(self, recipe: Path, overrides: list[str], batch_size: int):
        self.path, self.overrides = recipe, overrides
        self.recipe = load_recipe(recipe, overrides)
        self.device = torch.device(self.recipe.device)
        dataset = build_dataset(self.recipe)
        self.backbone = build_model(self.recipe, dataset).backbone.to(self.device)
        self.samples = [dataset.split("train")[i] for i in range(batch_size)]
        self.autocast = AUTOCAST.get(self.recipe.train.precision)
        self.dtype = next(self.backbone.parameters()).dtype

    def method(self, *overrides: str) -> Method:
        return Method(load_recipe(self.path, [*self.overrides, *overrides]), self.backbone)

    def layout(self, method: Method) -> Layout:
        return method.layout(self.samples, 0).to(self.device)

    def loss(self, method: Method, layout: Layout) -> torch.Tensor:
        enabled = self.autocast is not None
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=enabled):
            return method.loss(self.backbone, layout)[0]

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def parity(self) -> dict[str, Any]:
        """Both paths' logits at the answer tokens under the packed and the two-pass strategy (eval mode: no
        dropout, no gradient)."""
        method = self.method()
        layout = self.layout(method)
        self.backbone.eval()
        enabled = self.autocast is not None
        with torch.no_grad(), torch.autocast(self.device.type, self.autocast, enabled=enabled):
            a, b = (s(self.backbone, layout, method.needs) for s in (packed, two_pass))
        self.backbone.train()
        real = a.answer_mask  # answer columns of shorter answers are padding: not compared
        pairs = [
            (a.intact_logits[real], b.intact_logits[real]),
            (a.corrupted_logits[real], b.corrupted_logits[real]),
        ]
        diff = max(float((x.float() - y.float()).abs().max()) for x, y in pairs)
        scale = max(float(x.float().abs().max()) for x, _ in pairs)
        relative = diff / scale
        tolerance = TOLERANCE[self.dtype]
        return {
            "max_abs_diff": diff,
            "max_abs_logit": scale,
            "relative": relative,
            "tolerance": tolerance,
            "ok": relative <= tolerance,
        }

    def image_features(self) -> torch.Tensor:
        """The vision tower's features of the fixed batch (eval mode, no gradient)."""
        layout = self.layout(self.method())
        self.backbone.eval()
        enabled = self.autocast is not None
        with torch.no_grad(), torch.autocast(self.device.type, self.autocast, enabled=enabled):
            features = self.backbone.image_features(layout.pixel_values)[0]
        self.backbone.train()
        return features.float()

    def vision_kernel(self) -> dict[str, Any]:
        """Switch the vision tower to FlashAttention-2 and compare its image features with
        SDPA's (the language model stays on SDPA: FA2 cannot read the packed block mask)."""
        reference = self.image_features()
        try:
            self.backbone.model.set_attn_implementation({"vision_config": "flash_attention_2"})
        except (ImportError, ValueError) as exc:  # installed but unusable here: say why
            return {"kernel": "sdpa", "flash_attention_2": f"refused: {str(exc).splitlines()[0]}"}
        features = self.image_features()
        relative = float((features - reference).abs().max() / reference.abs().max())
        tolerance = TOLERANCE[self.dtype]
        return {
            "kernel": "flash_attention_2",
            "relative_to_sdpa": relative,
            "tolerance": tolerance,
            "ok": relative <= tolerance,
        }

    def step_costs(self, repeats: int) -> dict[str, dict[str, Any]]:
        """Median step seconds and peak allocated memory of each variant (one warm-up step)."""
        optimizer, _ = build_optimizer(self.backbone, self.recipe.train)
        costs = {}
        for name, overrides in VARIANTS.items():
            method = self.method(*overrides)
            layout = self.layout(method)

            def step(method: Method = method, layout: Layout = layout) -> None:
                optimizer.zero_grad(set_to_none=True)
                self.loss(method, layout).backward()
                optimizer.step()

            step()
            if self.device.type == "cuda":
                self.synchronize()
                torch.cuda.reset_peak_memory_stats(self.device)
            seconds = []
            for _ in range(repeats):
                start = time.perf_counter()
                step()
                self.synchronize()
                seconds.append(time.perf_counter() - start)
            peak = (
                torch.cuda.max_memory_allocated(self.device) / 2**30
                if self.device.type == "cuda"
                else None
            )
            costs[name] = {
                "step_s": statistics.median(seconds),
                "max_memory_allocated_gib": peak,
                "columns": layout.input_ids.shape[1],
            }
        return costs

    def training(self) -> dict[str, Any]:
        """TRAIN_STEPS CrystaL steps on the fixed batch with a fresh AdamW at a constant lr."""
        method = self.method(*TRAIN)
        layout = self.layout(method)
        optimizer, _ = build_optimizer(self.backbone, method.recipe.train)
        losses = []
        for _ in range(TRAIN_STEPS):
            optimizer.zero_grad(set_to_none=True)
            loss = self.loss(method, layout)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        return {
            "steps": TRAIN_STEPS,
            "lr": method.recipe.train.lr,
            "losses": losses,
            "ok": losses[-1] < losses[0],
        }


def check(name: str, gpu: bool, repeats: int) -> dict[str, Any]:
    recipe, overrides, batch_size, on_cpu = CONFIGS[name]
    if not gpu and not on_cpu:
        return {"skipped": "no GPU (the CPU configuration checks the test-size model only)"}
    overrides = [*overrides, *(GPU if gpu else ["device=cpu"])]
    start = time.perf_counter()
    c = Check(recipe, overrides, batch_size)
    vision: dict[str, Any] = {"kernel": "sdpa"}
    if gpu and importlib.util.find_spec("flash_attn") is not None:
        vision = c.vision_kernel()
    built = time.perf_counter() - start
    result = {
        "recipe": str(recipe.relative_to(ROOT)),
        "overrides": overrides,
        "weights": str(c.dtype).removeprefix("torch."),
        "precision": c.recipe.train.precision,
        "attention": {"language_model": "sdpa", "vision_tower": vision},
        "batch_size": batch_size,
        "parameters": sum(p.numel() for p in c.backbone.parameters()),
        "trainable": sum(p.numel() for p in c.backbone.parameters() if p.requires_grad),
        "build_s": built,
        "packed_vs_two_pass": c.parity(),
        "steps": c.step_costs(repeats),
        "training": c.training(),
    }
    result["seconds"] = time.perf_counter() - start
    result["ok"] = (
        result["packed_vs_two_pass"]["ok"] and result["training"]["ok"] and vision.get("ok", True)
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs") / "gpu_check.json")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on CPU")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = torch.cuda.is_available()
    torch.manual_seed(0)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "flash_attn": importlib.util.find_spec("flash_attn") is not None,
        "threads": torch.get_num_threads(),
        "configs": {},
    }
    for name in CONFIGS:
        try:
            report["configs"][name] = check(name, gpu, 5 if gpu else 2)
        except Exception as exc:  # a check reports on every configuration, failed or not
            report["configs"][name] = {"error": f"{type(exc).__name__}: {exc}", "ok": False}
        if gpu:
            torch.cuda.empty_cache()
    report["ok"] = all(c.get("ok", True) for c in report["configs"].values())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, result in report["configs"].items():
        if "skipped" in result or "error" in result:
            print(f"{name}: {result.get('skipped') or 'FAILED, ' + result['error']}")
            continue
        parity, train = result["packed_vs_two_pass"], result["training"]
        costs = ", ".join(
            f"{v} {s['step_s'] * 1e3:.0f} ms"
            + (f" {s['max_memory_allocated_gib']:.1f} GiB" if s["max_memory_allocated_gib"] else "")
            for v, s in result["steps"].items()
        )
        print(
            f"{name} ({result['weights']}, {result['seconds']:.0f} s): packed vs two-pass "
            f"{parity['relative']:.1e} of the largest logit (tolerance {parity['tolerance']:.0e}); "
            f"{costs}; loss {train['losses'][0]:.3f} -> {train['losses'][-1]:.3f} in "
            f"{train['steps']} steps: {'ok' if result['ok'] else 'FAILED'}"
        )
    print(f"wrote {args.out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
