"""End-to-end training: loss goes down, resume is exact, checkpoints survive crashes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from crystalkit.errors import UsageError
from crystalkit.evaluation.saved import evaluate_run_dir
from crystalkit.runs import checkpoint as ckpt
from crystalkit.runs import files
from crystalkit.training.trainer import train


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = ckpt.latest_checkpoint(run_dir)
    assert latest is not None
    return load_file(str(latest.path / files.CHECKPOINT_WEIGHTS))


def test_training_reduces_loss_and_writes_run(tiny_recipe, tmp_path):
    recipe = tiny_recipe("train.steps=30", "train.lr=3e-3", "train.log_every=5")
    result = train(recipe)
    run = result.run_dir
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").open()) if "loss" in r]
    assert len(losses) == 6
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2
    assert (run / "recipe.yaml").is_file() and (run / "tokenizer.json").is_file()
    results = json.loads((run / "results.json").read_text())
    assert results["num_samples"] == 32 and 0.0 <= results["accuracy"] <= 1.0
    predictions = (run / "predictions_test.jsonl").read_text().splitlines()
    assert (
        len(predictions) == 32
        and {"raw", "prediction", "correct"} <= json.loads(predictions[0]).keys()
    )


def test_resume_gives_same_weights_as_uninterrupted(tiny_recipe, tmp_path):
    full = train(tiny_recipe("name=full", "train.steps=6"))
    interrupted = tiny_recipe("name=resumed", "train.steps=6", "train.save_every=3")
    partial = train(interrupted, stop_after=3)
    assert partial.final is None and ckpt.latest_checkpoint(partial.run_dir).step == 3
    resumed = train(interrupted, resume=True)
    a, b = _weights(full.run_dir), _weights(resumed.run_dir)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (resumed.run_dir / "metrics.jsonl").open()]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) + 1  # + the final eval record


def test_resume_refuses_a_changed_recipe(tiny_recipe):
    first = tiny_recipe("name=r", "train.steps=4", "train.save_every=2")
    train(first, stop_after=2)
    with pytest.raises(UsageError, match=r"train\.lr"):
        train(
            tiny_recipe("name=r", "train.steps=4", "train.save_every=2", "train.lr=0.5"),
            resume=True,
        )


def test_existing_run_is_not_overwritten_silently(tiny_recipe):
    recipe = tiny_recipe("name=twice", "train.steps=2")
    train(recipe)
    with pytest.raises(UsageError, match="--resume"):
        train(recipe)
    assert train(recipe, overwrite=True).steps == 2


def test_crash_during_save_keeps_previous_checkpoint(tiny_recipe, monkeypatch):
    recipe = tiny_recipe("name=crash", "train.steps=4", "train.save_every=2")
    train(recipe, stop_after=2)
    run_dir = Path(recipe.output_dir) / "crash"
    before = _weights(run_dir)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies in the middle of writing step 4

    monkeypatch.setattr(ckpt, "atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, resume=True)
    latest = ckpt.latest_checkpoint(run_dir)
    assert latest is not None and latest.step == 2
    assert all(torch.equal(before[k], v) for k, v in _weights(run_dir).items())
    assert not list((run_dir / "checkpoints").glob(".step_*"))  # no half-written folder left


def test_latest_pointer_falls_back_to_newest_complete_checkpoint(tiny_recipe):
    recipe = tiny_recipe(
        "name=ptr", "train.steps=4", "train.save_every=2", "train.keep_checkpoints=3"
    )
    run_dir = train(recipe).run_dir
    root = run_dir / "checkpoints"
    (root / "latest").write_text("step_000099\n")  # points at nothing
    (root / "step_000004" / files.CHECKPOINT_META).unlink()  # newest is incomplete
    assert ckpt.latest_checkpoint(run_dir).step == 2


def test_eval_reproduces_final_accuracy(tiny_recipe):
    run_dir = train(tiny_recipe("name=ev", "train.steps=4")).run_dir
    expected = json.loads((run_dir / "results.json").read_text())["accuracy"]
    again = evaluate_run_dir(run_dir, "test")
    assert again.accuracy == expected
    assert json.loads((run_dir / "eval_test.json").read_text())["step"] == 4


def test_corrupt_checkpoint_is_a_usage_error(tiny_recipe):
    run_dir = train(tiny_recipe("name=bad", "train.steps=2")).run_dir
    latest = ckpt.latest_checkpoint(run_dir)
    (latest.path / files.CHECKPOINT_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(UsageError, match="cannot load weights"):
        evaluate_run_dir(run_dir, "test")


def test_overwrite_removes_the_previous_runs_checkpoints(tiny_recipe):
    long = tiny_recipe("name=ow", "train.steps=6", "train.save_every=3")
    run_dir = train(long).run_dir
    short = tiny_recipe("name=ow", "train.steps=2")
    train(short, overwrite=True)
    assert ckpt.latest_checkpoint(run_dir).step == 2
    assert [p.name for p in (run_dir / "checkpoints").glob("step_*")] == ["step_000002"]


def test_oversubscription_warning_needs_starved_threads_and_a_busy_machine():
    from crystalkit.training.threads import oversubscription_warning as warning

    # 2 threads got a quarter of 2 cores' time over 10 s while load 3.1 ran on 2 cores
    message = warning(5.0, 10.0, 2, 3.1, 2, 4.9)
    assert message is not None
    for part in ("load average 3.1", "2 cores", "2 torch threads", "25%", "4.9 samples/s"):
        assert part in message
    assert "train.num_threads=1" in message and "stop the other jobs" in message
    assert warning(18.0, 10.0, 2, 3.1, 2, 50.0) is None  # busy machine, but the run got its CPU
    assert warning(6.0, 10.0, 2, 1.9, 2, 50.0) is None  # starved look, but nothing else runs
    assert warning(2.0, 10.0, 1, 6.0, 2, 5.0) is None  # one thread waits for nobody
    assert warning(0.1, 0.2, 2, 6.0, 2, 5.0) is None  # too short a window to judge
    # more threads than cores: the share is of the cores they could use
    assert warning(12.0, 10.0, 8, 9.0, 2, 5.0) is None
    assert warning(12.0, 10.0, 8, 9.0, 4, 5.0) is not None


def test_oversubscription_is_warned_once_per_run(tiny_recipe, monkeypatch):
    from crystalkit.errors import PerformanceWarning
    from crystalkit.training import threads

    monkeypatch.setattr(threads, "oversubscription_warning", lambda *args: "machine is busy")
    with pytest.warns(PerformanceWarning, match="machine is busy") as caught:
        train(tiny_recipe("name=busy", "train.steps=4", "train.log_every=1"))
    assert len([w for w in caught if w.category is PerformanceWarning]) == 1


def test_default_num_threads_is_the_available_cores_nobody_keeps_busy(tiny_recipe, monkeypatch):
    import os

    from crystalkit.training import threads
    from crystalkit.training.threads import resolve_num_threads

    applied: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", applied.append)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for busy, expected in ((0.0, 3), (0.4, 3), (1.2, 2), (2.6, 1), (9.0, 1)):
        monkeypatch.setattr(threads, "busy_cores", lambda busy=busy: busy)
        assert resolve_num_threads(None) == expected
    monkeypatch.setattr(threads, "busy_cores", lambda: 1.0)
    recipe = tiny_recipe("name=threads", "train.steps=1", "train.num_threads=null")
    assert recipe.train.num_threads is None
    train(recipe)
    assert applied == [2]
    train(recipe, overwrite=True, num_threads=1)  # the ablation runner's share of the cores
    assert applied == [2, 1]
    explicit = tiny_recipe("name=explicit", "train.steps=1", "train.num_threads=3")
    train(explicit, num_threads=1)  # an explicit count wins over the runner's share
    assert applied == [2, 1, 3]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what torchrun sets for several processes
    assert resolve_num_threads(None) == 1 and resolve_num_threads(2) == 2


def test_busy_cores_reads_the_machines_cpu_time(monkeypatch):
    import subprocess
    import sys

    from crystalkit.training import threads

    samples = iter([(100, 1000, 4), (300, 1400, 4)])  # 200 of 400 jiffies busy on 4 CPUs
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(samples))
    assert threads.busy_cores(0.0) == pytest.approx(2.0)
    monkeypatch.undo()
    if threads._cpu_times() is None:
        pytest.skip("no /proc/stat on this system")
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert threads.busy_cores(0.5) >= 0.7  # at least the spinner's core
    finally:
        spinner.kill()
        spinner.wait()


def test_vision_lr_scale_gives_the_vision_tower_its_own_rate(tiny_recipe):
    """The vision tower's parameters (and only they) step at lr * vision_lr_scale; with scale 1
    the optimizer keeps its two groups (decayed matrices, then the rest) as before; with 0 the
    tower does not move while the language model trains."""
    from crystalkit.runs.build import build_backbone, build_dataset
    from crystalkit.training.optim import build_optimizer

    recipe = tiny_recipe("train.vision_lr_scale=0.1", "train.lr=0.002")
    backbone = build_backbone(recipe, build_dataset(recipe))
    tower = {id(p) for p in backbone.vision_tower.parameters()}
    optimizer, _ = build_optimizer(backbone, recipe.train)
    rates = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert [rates[i] for i in tower] == pytest.approx([0.0002] * len(tower))
    assert {rate for i, rate in rates.items() if i not in tower} == {0.002}
    assert len(rates) == sum(1 for p in backbone.parameters() if p.requires_grad)

    plain, _ = build_optimizer(backbone, tiny_recipe("train.lr=0.002").train)
    assert [g["weight_decay"] for g in plain.param_groups] == [0.01, 0.0]

    frozen = tiny_recipe("name=frozen_tower", "train.vision_lr_scale=0", "train.steps=3")
    run_dir = train(frozen).run_dir
    trained = load_file(str(ckpt.latest_checkpoint(run_dir).path / files.CHECKPOINT_WEIGHTS))
    torch.manual_seed(frozen.seed)  # as build_model seeds the init
    start = build_backbone(frozen, build_dataset(frozen)).state_dict()
    encoder = [k for k in start if k.startswith("encoder.")]
    assert encoder and all(torch.equal(trained[k], start[k]) for k in encoder)
    language = [k for k in start if k.startswith("lm.") and k in trained]  # tied: saved once
    assert not all(torch.equal(trained[k], start[k]) for k in language)


def test_extra_splits_are_evaluated_beside_the_periodic_split(tiny_recipe):
    recipe = tiny_recipe("train.steps=5", "train.eval_every=2", "eval.extra_splits=[train]")
    run = train(recipe).run_dir  # periodic at steps 2 and 4; step 5 is the final evaluation
    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    evaluated = [(r["step"], r["split"]) for r in records if "split" in r and "accuracy" in r]
    assert evaluated[:4] == [(2, "val"), (2, "train"), (4, "val"), (4, "train")]
    assert {split for _, split in evaluated[4:]} <= {"test"}


def test_a_misspelt_evaluation_split_stops_before_training(tiny_recipe):
    recipe = tiny_recipe("train.steps=4", "train.eval_every=2", "eval.extra_splits=[trian]")
    with pytest.raises(UsageError, match=r"no split 'trian'.*did you mean 'train'"):
        train(recipe, stop_after=1)
    assert not (Path(recipe.output_dir) / recipe.name / "metrics.jsonl").exists()
