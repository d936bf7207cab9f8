"""LoRA through peft: only adapters and latent rows train, checkpoints hold only what trains and
resume exactly, and an export (merged or adapter) gives the trained model's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_process import assert_one_error_line, invoke
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from crystalkit.config.loader import load_recipe
from crystalkit.crystal.paths import Needs
from crystalkit.errors import CheckpointError, UsageError
from crystalkit.evaluation.saved import evaluate_run_dir
from crystalkit.runs import checkpoint as ckpt
from crystalkit.runs import files
from crystalkit.runs.build import Model, build_dataset, build_model
from crystalkit.runs.load import load_adapter, load_run, load_run_model
from crystalkit.training.optim import build_optimizer
from crystalkit.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
LORA = ["lora.enabled=true", "lora.r=4", "latents.schedule.k=3"]
RUN = ["train.steps=6", "train.lr=1e-2", "eval.max_samples=8"]  # for train(): a short run
CRYSTAL = [
    "method=crystal",
    "objectives={kl: {fraction: 1.0}, attention: {layers: [0, -1]}}",
    "dataset.tasks=[position]",
]
#: 2 decoder layers x 7 projections + the projector's 2 linear layers
ADAPTED = 2 * 7 + 2


def _build(tiny_recipe, *overrides: str) -> tuple[Model, list]:
    recipe = tiny_recipe(*LORA, *overrides)
    dataset = build_dataset(recipe)
    return build_model(recipe, dataset), [dataset.split("train")[i] for i in range(4)]


def _logits(model: Model, samples: list) -> torch.Tensor:
    """Intact-path answer logits in eval mode (no dropout, fixed batch-norm statistics)."""
    backbone, method = model.backbone.eval(), model.method
    with torch.no_grad():
        return method.strategy(backbone, method.layout(samples, step=0), Needs()).intact_logits


def _steps(model: Model, samples: list, recipe_train, steps: int = 3) -> None:
    backbone, method = model.backbone.train(), model.method
    optimizer, _ = build_optimizer(backbone, recipe_train)
    for step in range(steps):
        loss, _ = method.loss(backbone, method.layout(samples, step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_lora_trains_only_adapters_and_latent_rows(tiny_recipe):
    model, samples = _build(tiny_recipe, *CRYSTAL, "train.lr=1e-2")
    recipe, backbone, ids = model.method.recipe, model.backbone, model.method.block.new_token_ids
    trainable = {n: p for n, p in backbone.named_parameters() if p.requires_grad}
    assert all("lora_" in n or ".trainable_tokens_delta." in n for n in trainable)
    adapted = [m for m in backbone.modules() if isinstance(m, LoraLayer)]
    assert len(adapted) == ADAPTED
    r, hidden = recipe.lora.r, recipe.backbone.params["hidden_size"]
    lora_params = sum(r * (m.in_features + m.out_features) for m in adapted)
    assert sum(p.numel() for p in trainable.values()) == lora_params + len(ids) * hidden
    frozen = {n: p.detach().clone() for n, p in backbone.named_parameters() if not p.requires_grad}
    (rows,) = [p for n, p in trainable.items() if ".trainable_tokens_delta." in n]
    initial_rows = rows.detach().clone()

    _steps(model, samples, recipe.train)

    for name, before in frozen.items():  # the embedding's own latent rows included
        assert torch.equal(before, backbone.get_parameter(name)), name
    assert all(p.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)  # all learn
    assert (rows.detach() != initial_rows).any(-1).all()  # every latent row trained
    hidden_state = torch.randn(1, hidden)  # the tied head reads the same trained rows
    with torch.no_grad():
        head = backbone.lm.get_output_embeddings()(hidden_state)[0, ids]
    torch.testing.assert_close(head, hidden_state[0] @ rows.detach().T)


def test_fresh_lora_is_the_base_model_and_the_attention_capture_still_records(tiny_recipe):
    plain_recipe = tiny_recipe(*CRYSTAL, "latents.schedule.k=3")
    dataset = build_dataset(plain_recipe)
    plain = build_model(plain_recipe, dataset)
    lora, samples = _build(tiny_recipe, *CRYSTAL)
    for model in (plain, lora):
        model.backbone.eval()
    _, terms_a = plain.method.loss(plain.backbone, plain.method.layout(samples, 0))
    loss_b, terms_b = lora.method.loss(lora.backbone, lora.method.layout(samples, 0))
    assert terms_a.keys() == terms_b.keys() and terms_b["attention"] > 0
    for key in terms_a:  # lora_B starts at zero and the token rows at the base's rows
        torch.testing.assert_close(terms_b[key], terms_a[key], atol=1e-6, rtol=0)
    loss_b.backward()
    q_proj = lora.backbone.lm.model.layers[-1].self_attn.q_proj
    assert q_proj.lora_B["default"].weight.grad.abs().sum() > 0  # attention term's gradient


def test_vision_tower_option_chooses_the_adapted_modules(tiny_recipe):
    on, _ = _build(tiny_recipe)
    off, _ = _build(tiny_recipe, "lora.vision_tower=false", "latents.schedule.k=0")
    names_on = {n for n, m in on.backbone.named_modules() if isinstance(m, LoraLayer)}
    names_off = {n for n, m in off.backbone.named_modules() if isinstance(m, LoraLayer)}
    assert names_on - names_off == {"projector.0", "projector.2"}
    assert names_off and all(n.startswith("lm.model.layers.") for n in names_off)
    tokens_off = [n for n, _ in off.backbone.named_parameters() if "trainable_tokens" in n]
    assert tokens_off == []  # K = 0: no latent tokens, so no token rows train


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["lora.target_modules=[qproj]", "lora.vision_tower=false"], "lora.target_modules: none"),
        (["lora.target_modules=[lm_head]"], "lora.target_modules: lm.lm_head is a token matrix"),
    ],
)
def test_bad_lora_settings_are_one_line_errors(tiny_recipe, overrides, expected):
    with pytest.raises(UsageError, match=expected):
        _build(tiny_recipe, *overrides)


def test_lora_on_a_hugging_face_vlm_with_untied_token_matrices():
    """The Backbone interface is all LoRA needs: a test-size LLaVA (CLIP tower, untied
    embedding and head) gets adapters in both towers, token rows in both matrices, and merges."""
    recipe = load_recipe(
        ROOT / "recipes" / "tiny" / "llava_clip.yaml",
        [*LORA, "dataset.image_size=64", "dataset.train_size=16", "dataset.test_size=8"],
    )
    dataset = build_dataset(recipe)
    model = build_model(recipe, dataset)
    backbone = model.backbone
    adapted = {id(m) for m in backbone.modules() if isinstance(m, LoraLayer)}
    for tower in (backbone.vision_tower, backbone.language_model):
        assert adapted & {id(m) for m in tower.modules()}
    tables = [n for n, p in backbone.named_parameters() if ".trainable_tokens_delta." in n]
    assert len(tables) == 2  # embedding and head, each with the latent rows
    with torch.no_grad():
        for name, param in backbone.named_parameters():
            if param.requires_grad and "lora_B" in name:
                param.normal_(std=0.05)
            elif param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    samples = [dataset.split("train")[i] for i in range(3)]
    expected = _logits(model, samples)
    model.peft.merge_and_unload()
    torch.testing.assert_close(_logits(model, samples), expected, atol=1e-5, rtol=0)


def test_lora_checkpoint_holds_only_what_trains_and_reloads_identically(tiny_recipe, tmp_path):
    model, samples = _build(tiny_recipe, "train.lr=1e-2")
    _steps(model, samples, model.method.recipe.train)
    saved = ckpt.save_checkpoint(tmp_path, 3, model.backbone, None, keep=1)
    assert not (saved.path / files.CHECKPOINT_WEIGHTS).exists()
    stored = load_file(str(saved.path / files.CHECKPOINT_TRAINABLE))
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable <= stored.keys()
    assert all(".running_" in n or "num_batches" in n for n in stored.keys() - trainable)
    full = sum(t.numel() * t.element_size() for t in model.backbone.state_dict().values())
    ratio = (saved.path / files.CHECKPOINT_TRAINABLE).stat().st_size / full
    assert ratio < 0.5, ratio

    again, _ = _build(tiny_recipe, "train.lr=1e-2")
    ckpt.load_weights(again.backbone, saved)
    assert torch.equal(_logits(again, samples), _logits(model, samples))


def test_mismatched_or_corrupt_lora_checkpoints_are_one_line_errors(tiny_recipe, tmp_path):
    model, _ = _build(tiny_recipe)
    saved = ckpt.save_checkpoint(tmp_path, 1, model.backbone, None, keep=1)
    plain = build_model(tiny_recipe("latents.schedule.k=3"), build_dataset(tiny_recipe()))
    with pytest.raises(CheckpointError, match=r"lora\.enabled is false"):
        ckpt.load_weights(plain.backbone, saved)
    other_seed, _ = _build(tiny_recipe, "seed=1")
    with pytest.raises(CheckpointError, match="another frozen base"):
        ckpt.load_weights(other_seed.backbone, saved)
    with pytest.raises(CheckpointError, match=r"no trainer_state\.pt"):
        ckpt.load_trainer_state(saved)
    (saved.path / files.CHECKPOINT_TRAINABLE).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="cannot load weights"):
        ckpt.load_weights(model.backbone, saved)


def test_lora_run_resumes_exactly_and_reloads_as_trained(tiny_recipe):
    full = train(tiny_recipe(*LORA, *RUN, "name=full"))
    interrupted = tiny_recipe(*LORA, *RUN, "name=resumed", "train.save_every=3")
    train(interrupted, stop_after=3)
    resumed = train(interrupted, resume=True)
    a, b = (
        load_file(str(ckpt.latest_checkpoint(run.run_dir).path / files.CHECKPOINT_TRAINABLE))
        for run in (full, resumed)
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    results = json.loads((resumed.run_dir / "results.json").read_text())
    assert evaluate_run_dir(resumed.run_dir, "test").accuracy == results["accuracy"]


def test_export_merged_and_adapter_give_the_lora_models_outputs(tiny_recipe, tmp_path):
    run_dir = train(tiny_recipe(*LORA, *CRYSTAL, *RUN)).run_dir
    _, dataset, lora, _ = load_run_model(run_dir)
    samples = [dataset.split("test")[i] for i in range(8)]
    expected = _logits(lora, samples)

    merged_dir = tmp_path / "merged"
    result = invoke("export", run_dir, "--merge", "--out", merged_dir)
    assert result.exit_code == 0, result.output
    recipe, _, backbone, method, step = load_run(merged_dir)
    assert not recipe.lora.enabled and step == 6
    assert all(p.requires_grad for p in backbone.parameters())  # a plain model
    assert (ckpt.latest_checkpoint(merged_dir).path / files.CHECKPOINT_WEIGHTS).is_file()
    merged = _logits(Model(backbone, method, None), samples)
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=0)
    results = json.loads((run_dir / "results.json").read_text())
    assert evaluate_run_dir(merged_dir, "test").accuracy == results["accuracy"]

    assert invoke("export", run_dir).exit_code == 0
    adapter_dir = run_dir / "export"
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    assert torch.equal(_logits(load_adapter(adapter_dir), samples), expected)
    assert invoke("export", run_dir).exit_code == 0  # an earlier export is replaced


def test_export_refuses_bad_run_dirs_and_targets(tiny_recipe, tmp_path):
    plain = train(tiny_recipe("name=plain", "train.steps=1", "eval.max_samples=8")).run_dir
    line = assert_one_error_line(invoke("export", plain))
    assert "not a LoRA run" in line and "--merge exports the full model" in line
    line = assert_one_error_line(invoke("export", tmp_path / "missing"))
    assert "not a directory" in line
    line = assert_one_error_line(invoke("export", plain, "--merge", "--out", plain))
    assert "--out" in line and "not a crystalkit export" in line
