"""The benchmarks' own machinery: ``gpu_check.py`` without a GPU (it checks the test-size
Qwen2.5-VL on CPU, writes its JSON and exits 0 — what CI runs of the 7B run's GPU check) and
``memory.py``'s attribution of saved bytes."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import ROOT, THREADS
from torch import nn


def test_gpu_check_falls_back_to_cpu_and_its_checks_hold(tmp_path: Path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU configuration, even on a GPU host
    script = ROOT / "benchmarks" / "gpu_check.py"
    result = subprocess.run(
        [sys.executable, str(script), "--out", str(out), "--threads", str(THREADS)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["threads"] == THREADS
    assert report["configs"]["qwen2_5_vl_7b_slice"]["skipped"].startswith("no GPU")
    tiny = report["configs"]["tiny_qwen2_5_vl"]
    assert (tiny["weights"], tiny["precision"], tiny["batch_size"]) == ("float32", "fp32", 4)
    # packed and two-pass: the same answer logits up to fp32 summation order
    parity = tiny["packed_vs_two_pass"]
    assert parity["tolerance"] == 1e-4 and parity["max_abs_logit"] > 0
    assert parity["relative"] == parity["max_abs_diff"] / parity["max_abs_logit"] <= 1e-4
    # a timed step of each variant; no allocator statistics on CPU
    assert set(tiny["steps"]) == {"finetune", "crystal packed", "crystal two-pass"}
    for cost in tiny["steps"].values():
        assert cost["step_s"] > 0 and cost["max_memory_allocated_gib"] is None
    packed, finetune = tiny["steps"]["crystal packed"], tiny["steps"]["finetune"]
    assert packed["columns"] > finetune["columns"]  # both paths in one sequence
    # 20 steps on one fixed batch at lr 1e-3: memorising it lowers the loss
    training = tiny["training"]
    assert training["steps"] == len(training["losses"]) == 20 and training["lr"] == 1e-3
    assert training["losses"][-1] < training["losses"][0]
    assert tiny["ok"] is True and report["ok"] is True
    assert "tiny_qwen2_5_vl (float32" in result.stdout and "ok" in result.stdout


def _benchmark(name: str):
    """A script of ``benchmarks/`` as a module (they import their siblings by name)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_memory_benchmark_attributes_every_saved_storage_once():
    memory, step_cost = _benchmark("memory"), _benchmark("step_cost")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
    x = torch.randn(5, 16, requires_grad=True)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with memory.saved_bytes_by_scope({"first": model[0], "last": model[2]}, weights) as totals:
        loss = model(x).square().sum()
    loss.backward()
    # by hand: the first layer keeps its input x; tanh keeps its output, which the last layer
    # also saves (counted once, for tanh, outside any scope); square keeps the model's output
    assert dict(totals) == {"first": 5 * 16 * 4, memory.OTHER: (5 * 32 + 5 * 8) * 4}
    # the slow reference: every distinct saved storage, the layers' weights included
    everything = step_cost.saved_activation_bytes(lambda: model(x).square().sum())
    assert everything == sum(totals.values()) + (16 * 32 + 32 * 8) * 4


def test_the_7b_slice_is_the_paper_recipe_at_the_real_widths():
    """What memory.py and gpu_check.py measure stays the paper recipe, cut in depth only."""
    from crystalkit.config.loader import load_recipe

    cut = load_recipe(ROOT / "benchmarks" / "qwen2_5_vl_7b_slice.yaml")
    paper = load_recipe(ROOT / "recipes" / "paper" / "qwen2_5_vl_7b_crystal.yaml")
    for section in ("method", "latents", "crystal", "objectives", "lora", "corruption", "prompt"):
        assert getattr(cut, section) == getattr(paper, section), section
    assert cut.train.precision == paper.train.precision == "bf16"
    backbone = cut.backbone.params
    for key in ("dtype", "attn_implementation", "image_size"):
        assert backbone[key] == paper.backbone.params[key], key
    text, vision = backbone["config"]["text_config"], backbone["config"]["vision_config"]
    assert (text["hidden_size"], text["intermediate_size"], text["vocab_size"]) == (
        3584,
        18944,
        152064,
    )
    assert (text["num_attention_heads"], text["num_key_value_heads"]) == (28, 4)
    assert (vision["hidden_size"], vision["out_hidden_size"], vision["patch_size"]) == (
        1280,
        3584,
        14,
    )


def test_position_errors_name_the_distractor_an_answer_points_at():
    from crystalkit.data.synthetic import QUADRANTS, SyntheticShapes, quadrant

    errors = _benchmark("position_errors")
    config = SyntheticShapes.Config(tasks=["position"], num_distractors=(2, 2))
    split = SyntheticShapes(config).split("test")
    checked = 0
    for index in range(64):
        sample = split[index]
        target, colour, shape = (
            QUADRANTS[quadrant(tuple(o["box"]), config.image_size)] for o in sample.meta["objects"]
        )
        if len({target, colour, shape}) < 3:
            continue
        letter = {q: "ABCD"[i] for i, q in enumerate(sample.options)}
        empty = next(q for q in QUADRANTS if q not in (target, colour, shape))
        assert errors.classify(sample, letter[target], correct=True) == errors.RIGHT
        assert errors.classify(sample, letter[colour], False) == "a same-colour distractor"
        assert errors.classify(sample, letter[shape], False) == "a same-shape distractor"
        assert errors.classify(sample, letter[empty], False) == "no object"
        assert errors.classify(sample, None, False) == "no answer"
        checked += 1
    assert checked >= 5
