"""Data parallelism, accumulation, precision and checkpointing match one process on one batch.

Exactness tests swap the embedded backbone's CNN (batch norm: per-shard batch statistics) for a
ConvNeXt (layer norm), whose rows are independent of the rest of the batch.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from cli_process import assert_one_error_line, invoke
from conftest import ROOT, TINY
from hf_models import SMALL as HF_SMALL
from safetensors.torch import load_file

from crystalkit.config.loader import load_recipe
from crystalkit.config.schema import Recipe
from crystalkit.crystal.method import Method
from crystalkit.errors import UsageError
from crystalkit.models.backbone import Backbone
from crystalkit.runs import checkpoint as ckpt
from crystalkit.runs import files
from crystalkit.runs.build import build_dataset, build_model
from crystalkit.training.distributed import (
    ShardLoss,
    World,
    broadcast_module,
    data_parallel,
    unit_counts,
)
from crystalkit.training.trainer import train

FINETUNE = ROOT / "recipes" / "direct_finetune.yaml"
CRYSTAL = ROOT / "recipes" / "crystal_scratch.yaml"
#: small and norm-free where it matters; one thread per process (torchrun runs two)
SMALL = [
    *TINY,
    "backbone.encoder=convnext_atto",
    "~backbone.encoder_kwargs",  # replaced, not merged: the resnet channels do not apply
    "backbone.encoder_kwargs={dims: [8, 16, 32, 64], depths: [1, 1, 1, 1]}",
    "dataset.train_size=64",
    "dataset.val_size=8",
    "dataset.test_size=8",
    "eval.batch_size=8",
    "train.steps=3",
    "train.log_every=1",
    "train.num_threads=1",
]
#: the test-size Qwen2.5-VL (layer norm throughout, so exact as it is)
QWEN = ROOT / "recipes" / "tiny" / "qwen2_5_vl.yaml"
SMALL_QWEN = [
    *HF_SMALL,
    "train.steps=3",
    "train.log_every=1",
    "train.num_threads=1",
    "eval.batch_size=8",
]
OBJECTIVES = [
    "method=crystal",
    "latents.schedule.k=3",
    "objectives={kl: {fraction: 0.1}, attention: {layers: [0, -1]}, cosine: {}}",
]
#: metrics that must agree with the single-process run
COMPARED = ("loss", "grad_norm", "lr", "k")


def _small(base: Path) -> list[str]:
    return SMALL_QWEN if base == QWEN else SMALL


def _recipe(tmp_path: Path, base: Path, *overrides: str) -> Recipe:
    return load_recipe(base, [*_small(base), f"output_dir={tmp_path / 'runs'}", *overrides])


def _torchrun(base: Path, tmp_path: Path, *args: str) -> subprocess.Popen:
    """``torchrun --nproc_per_node 2 -m crystalkit train BASE SMALL... ARGS`` on CPU (gloo)."""
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FORCE_COLOR")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", "-m", "crystalkit", "train", str(base), *_small(base)]
    command += [f"output_dir={tmp_path / 'runs'}", *args]
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: a hang kills launcher and workers
    )


def _finish(process: subprocess.Popen, timeout: float = 180) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The latest checkpoint's weights (a LoRA run's: only what trains)."""
    folder = ckpt.latest_checkpoint(run_dir).path
    lora = folder / files.CHECKPOINT_TRAINABLE
    return load_file(str(lora if lora.is_file() else folder / files.CHECKPOINT_WEIGHTS))


def _assert_same_run(run: Path, reference: Path) -> None:
    """Same training records (one per step: rank 0 alone writes), so the same losses and global
    gradient norms, and the same final weights. AdamW divides each gradient element by its own
    magnitude, so an element whose gradient is at rounding level can move by up to the learning
    rate on a last-bit difference: nearly all elements must agree to 1e-6, and all to 1e-4."""
    got, want = _records(run), _records(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want, strict=True):
        if "loss" in b:
            keys = [k for k in b if k in COMPARED or k.startswith("loss/")]
            assert keys and a.keys() == b.keys()
            for key in keys:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    a, b = _weights(run), _weights(reference)
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert diff.max() < 1e-4 and (diff > 1e-6).float().mean() < 1e-3, diff.max()
    assert json.loads((run / "results.json").read_text())["num_samples"] == 8


def test_two_processes_resume_a_one_process_run_exactly(tmp_path):
    """Steps 1-2 in one process, step 3 resumed by ``torchrun`` on two: same as one process."""
    reference = train(_recipe(tmp_path, FINETUNE, "name=one")).run_dir
    split = ["name=split", "train.save_every=2"]
    train(_recipe(tmp_path, FINETUNE, *split), stop_after=2)
    done = _finish(_torchrun(FINETUNE, tmp_path, *split, "--resume"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("test accuracy") == 1  # rank 0 reports
    _assert_same_run(tmp_path / "runs" / "split", reference)


def test_two_processes_match_one_process(tmp_path):
    """Several backbone calls per step (recurrent chunks, two passes) and two micro-batches."""
    variant = ["latents.family=recurrent", "crystal.strategy=two_pass"]
    launched = _torchrun(CRYSTAL, tmp_path, *OBJECTIVES, *variant, "train.grad_accum_steps=2")
    reference = train(_recipe(tmp_path, CRYSTAL, *OBJECTIVES, *variant, "name=one")).run_dir
    done = _finish(launched)
    assert done.returncode == 0, done.stderr
    _assert_same_run(tmp_path / "runs" / "crystal_scratch", reference)


def test_two_processes_match_one_process_on_qwen2_5_vl_with_lora(tmp_path):
    """A real VLM architecture (M-RoPE, its vision tower) with LoRA on the LLM and the vision
    tower, the latent rows trainable; LoRA dropout off, since its masks are drawn per shard."""
    lora = ["lora.enabled=true", "lora.r=4", "lora.dropout=0.0"]
    launched = _torchrun(QWEN, tmp_path, *lora)
    reference = train(_recipe(tmp_path, QWEN, *lora, "name=one")).run_dir
    done = _finish(launched)
    assert done.returncode == 0, done.stderr
    _assert_same_run(tmp_path / "runs" / "qwen2_5_vl", reference)


def test_sharded_run_matches_one_process_and_resumes_exactly(tmp_path):
    """FSDP2 (recurrent latents: several forwards per backward), then a resume from its step-2
    checkpoint (full optimizer state reloaded into shards) that redoes step 3."""
    sharded = ["latents.family=recurrent", "train.fsdp=true", "train.save_every=2"]
    launched = _torchrun(CRYSTAL, tmp_path, *OBJECTIVES, *sharded)
    reference = train(
        _recipe(tmp_path, CRYSTAL, *OBJECTIVES, "latents.family=recurrent", "name=one")
    ).run_dir
    done = _finish(launched)
    assert done.returncode == 0, done.stderr
    run_dir = tmp_path / "runs" / "crystal_scratch"
    _assert_same_run(run_dir, reference)
    shutil.rmtree(run_dir / "checkpoints" / "step_000003")  # as if killed after step 2
    done = _finish(_torchrun(CRYSTAL, tmp_path, *OBJECTIVES, *sharded, "--resume"))
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stderr and ckpt.latest_checkpoint(run_dir).step == 3
    _assert_same_run(run_dir, reference)


def test_sharded_qwen2_5_vl_matches_one_process(tmp_path):
    """FSDP on a transformers backbone: the embedding and the vision tower's patch embedding and
    merger sit in the root group and are used outside ``forward`` (``embed_inputs``)."""
    launched = _torchrun(QWEN, tmp_path, "train.fsdp=true")
    reference = train(_recipe(tmp_path, QWEN, "name=one")).run_dir
    done = _finish(launched)
    assert done.returncode == 0, done.stderr
    _assert_same_run(tmp_path / "runs" / "qwen2_5_vl", reference)


def _broadcast_worker(rank: int, init_method: str) -> None:
    """Rank 0 and 1 with different trainable weights, and frozen weights that agree, then not."""
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    world = World(rank=rank, size=2)

    def model(frozen_seed: int) -> torch.nn.Sequential:
        torch.manual_seed(frozen_seed)
        frozen = torch.nn.Linear(4, 4).requires_grad_(False)
        torch.manual_seed(100 + rank)  # what trains differs per rank until broadcast
        return torch.nn.Sequential(frozen, torch.nn.Linear(4, 4))

    same = model(frozen_seed=0)
    frozen = same[0].weight.clone()
    broadcast_module(same, world)
    trained = [torch.empty(4, 4) for _ in range(2)]
    dist.all_gather(trained, same[1].weight.detach())
    assert torch.equal(trained[0], trained[1])  # rank 0's everywhere
    assert torch.equal(same[0].weight, frozen)
    try:
        broadcast_module(model(frozen_seed=rank), world)
    except UsageError as exc:
        assert str(exc).startswith("backbone: rank 1 built other frozen weights than rank 0")
    else:
        raise AssertionError("frozen weights that differ between ranks were not refused")
    dist.destroy_process_group()


def test_broadcast_sends_what_trains_and_checks_what_is_frozen(tmp_path):
    """Frozen weights stay each rank's own (memory-mapped and shared on a node, not copied), so
    ranks whose frozen weights differ are refused in one line."""
    mp.spawn(_broadcast_worker, args=(f"file://{tmp_path / 'rendezvous'}",), nprocs=2)


def _model(recipe: Recipe) -> tuple[Backbone, Method, list]:
    dataset = build_dataset(recipe)
    model = build_model(recipe, dataset)
    return model.backbone, model.method, [dataset.split("train")[i] for i in range(6)]


@pytest.mark.parametrize(
    "weighting",
    [
        [],
        [  # a scheduled weight mid-ramp, and a term that gives no gradient
            "objectives.kl.weight={name: linear, start: 0.5, end: 2.0}",
            "objectives.attention.gradient=false",
        ],
        ["latents.template=released", "latents.write=true"],  # CE over answer + template
        ["latents.template=released", "latents.write=true", "crystal.ce=corrupted"],
    ],
    ids=["constant", "scheduled", "written", "written_corrupted"],
)
def test_shard_losses_and_gradients_sum_to_the_batch_ones(tmp_path, weighting):
    recipe = _recipe(tmp_path, CRYSTAL, *OBJECTIVES, *weighting)
    backbone, method, samples = _model(recipe)
    backbone.train()
    layout = method.layout(samples, step=0)
    weights = method.weights_at(3)
    answer_tokens = (layout.answer_targets() >= 0).sum(-1)
    assert len(set(answer_tokens.tolist())) > 1  # per-shard means would not add up
    total, terms = method.loss(backbone, layout, weights)
    total.backward()
    expected = {n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None}
    backbone.zero_grad()
    shard_loss, summed, summed_terms = ShardLoss(method), 0.0, dict.fromkeys(terms, 0.0)
    for rows in (slice(0, 1), slice(1, 4), slice(4, 6)):  # uneven on purpose
        micro = layout.rows(rows)
        loss, scaled = shard_loss(
            *method.loss(backbone, micro, weights), unit_counts(micro), unit_counts(layout), weights
        )
        loss.backward()
        summed += loss.item()
        summed_terms = {k: summed_terms[k] + v.item() for k, v in scaled.items()}
    assert summed == pytest.approx(total.item(), rel=1e-6)
    assert summed_terms == pytest.approx({k: v.item() for k, v in terms.items()}, rel=1e-5)
    for name, grad in expected.items():
        torch.testing.assert_close(backbone.get_parameter(name).grad, grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("base", [FINETUNE, CRYSTAL], ids=["finetune", "crystal"])
def test_gradient_accumulation_equals_one_big_batch(tmp_path, base):
    extra = OBJECTIVES if base == CRYSTAL else []
    one = train(_recipe(tmp_path, base, *extra, "name=big", "train.steps=2")).run_dir
    accumulated = _recipe(tmp_path, base, *extra, "name=acc", "train.steps=2")
    accumulated.train.grad_accum_steps = 4
    _assert_same_run(train(accumulated).run_dir, one)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_trains_close_to_fp32(tmp_path, precision):
    fp32 = _records(train(_recipe(tmp_path, FINETUNE, "name=fp32", "train.steps=2")).run_dir)
    low_precision = [f"name={precision}", "train.steps=2", f"train.precision={precision}"]
    run = train(_recipe(tmp_path, FINETUNE, *low_precision)).run_dir
    low = _records(run)
    assert low[0]["loss"] == pytest.approx(fp32[0]["loss"], rel=2e-2)  # same weights, step 1
    assert low[0]["loss"] != fp32[0]["loss"]  # autocast was on
    weights = _weights(run)
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())
    state = ckpt.load_trainer_state(ckpt.latest_checkpoint(run))
    assert bool(state["scaler"]) is (precision == "fp16")  # loss scaling saved for resume


def test_gradient_checkpointing_gives_the_same_steps(tmp_path, monkeypatch):
    calls = []
    enable = Backbone.enable_gradient_checkpointing
    monkeypatch.setattr(
        Backbone, "enable_gradient_checkpointing", lambda self: calls.append(enable(self))
    )
    plain = train(_recipe(tmp_path, CRYSTAL, *OBJECTIVES, "name=plain", "train.steps=2")).run_dir
    assert not calls
    recomputed = _recipe(tmp_path, CRYSTAL, *OBJECTIVES, "name=gc", "train.steps=2")
    recomputed.train.gradient_checkpointing = True
    _assert_same_run(train(recomputed).run_dir, plain)
    assert len(calls) == 1


def test_gradient_checkpointing_refuses_kv_cache_paths(tmp_path):
    recipe = _recipe(tmp_path, CRYSTAL, *OBJECTIVES, "latents.family=recurrent")
    recipe.train.gradient_checkpointing = True
    with pytest.raises(UsageError, match=r"train\.gradient_checkpointing: .*recurrent"):
        train(recipe)


def test_uneven_global_batch_is_one_line(tmp_path):
    args = ["train", FINETUNE, *SMALL, f"output_dir={tmp_path}", "train.grad_accum_steps=3"]
    line = assert_one_error_line(invoke(*args))
    assert "train.batch_size: 8 (the global batch) is not divisible by 1 processes" in line
    recipe = _recipe(tmp_path, FINETUNE, "train.batch_size=12")
    with pytest.raises(UsageError, match=r"train\.batch_size: 12 .* 5 processes"):
        data_parallel(recipe, World(rank=0, size=5))
    assert data_parallel(recipe, World(rank=0, size=3)).world.size == 3


@pytest.mark.parametrize(
    ("overrides", "size", "message"),
    [
        ([], 1, "needs several processes"),
        (["method=crystal", "crystal.strategy=two_pass"], 2, "two_pass"),
        (["train.precision=fp16"], 2, "fp16"),
    ],
)
def test_fsdp_refuses_what_it_cannot_shard(tmp_path, overrides, size, message):
    recipe = _recipe(tmp_path, FINETUNE, "train.fsdp=true", *overrides)
    with pytest.raises(UsageError, match=rf"^train\.fsdp: .*{message}"):
        data_parallel(recipe, World(rank=0, size=size))


def test_runs_saved_before_the_scaling_keys_still_resume(tmp_path):
    recipe = _recipe(tmp_path, FINETUNE, "name=old", "train.save_every=2")
    run_dir = train(recipe, stop_after=2).run_dir
    saved = run_dir / "recipe.yaml"
    old = yaml.safe_load(saved.read_text())
    for key in ("grad_accum_steps", "precision", "gradient_checkpointing", "fsdp"):
        del old["train"][key]
    saved.write_text(yaml.safe_dump(old))
    assert train(recipe, resume=True).steps == 3
    changed = _recipe(tmp_path, FINETUNE, "name=old", "train.save_every=2", "train.precision=bf16")
    with pytest.raises(UsageError, match=r"train\.precision was 'fp32'"):
        train(changed, resume=True)
