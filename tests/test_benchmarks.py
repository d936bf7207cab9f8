"""``benchmarks/gpu_check.py``: without a GPU it checks the test-size Qwen2.5-VL on CPU, writes its
JSON and exits 0 — what CI runs of the script the 7B run's GPU check uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, THREADS


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
