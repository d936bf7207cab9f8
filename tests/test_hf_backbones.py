"""The Hugging Face adapters against the models' own forward, and the pitfalls they avoid.

Every family is built at test size from ``recipes/tiny/*.yaml`` (random weights, offline BPE
tokenizer, a locally constructed image processor), so the whole path — raw image + text ->
processor -> model -> loss — runs here exactly as on a GPU with a real checkpoint.
"""

from __future__ import annotations

import copy

import pytest
import torch
from cli_process import assert_one_error_line, invoke
from conftest import ROOT
from hf_models import FAMILIES, build, chunked_forward, own_forward

from crystalkit.crystal.packing import INTACT_PATH, Segment, packed_allowed
from crystalkit.crystal.paths import Needs, intact_only, layout_inputs, packed
from crystalkit.crystal.runner import run_sequence
from crystalkit.errors import UsageError
from crystalkit.evaluation.generation import generate_answers
from crystalkit.models.attention_capture import PREFIX
from crystalkit.models.hf import base
from crystalkit.models.masks import additive


def _valid_answer_logits(layout, logits: torch.Tensor, row: int) -> tuple[list[int], torch.Tensor]:
    intact, _ = layout.select(INTACT_PATH)
    queries = intact.answer_queries(Segment.ANSWER_INTACT)
    kept = torch.nonzero(intact.segments[row] != Segment.PAD).flatten().tolist()
    inside = [(i, c) for i, c in enumerate(kept) if queries.start <= c < queries.stop]
    return [i for i, _ in inside], logits[row, [c - queries.start for _, c in inside]]


@pytest.mark.parametrize("family", FAMILIES)
def test_intact_path_equals_the_models_own_forward(family):
    """Image merge, image markers, positions (M-RoPE) and deepstack all match what the unmodified
    model computes on its own, sample by sample without padding."""
    _, backbone, method, samples = build(family)
    backbone.eval()
    layout = method.layout(samples, step=0)
    intact, _ = layout.select(INTACT_PATH)
    with torch.no_grad():
        ours = intact_only(backbone, layout).intact_logits
        for row in range(len(samples)):
            keep = intact.segments[row] != Segment.PAD
            reference = own_forward(
                backbone, intact.input_ids[row : row + 1, keep], layout.pixel_values[row]
            )
            cols, got = _valid_answer_logits(layout, ours, row)
            torch.testing.assert_close(got, reference[0, cols], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("latents", ["token", "recurrent"])
def test_crystal_step_packed_equals_two_pass(family, latents):
    """A full CrystaL training step (both CEs, KL, attention) in either strategy: same losses and
    the same gradients, reaching the vision tower and the latent rows."""
    grads, losses = [], []
    for strategy in ("packed", "two_pass"):
        _, backbone, method, samples = build(
            family, f"latents.family={latents}", f"crystal.strategy={strategy}"
        )
        loss, terms = method.loss(backbone, method.layout(samples, step=0))
        loss.backward()
        losses.append({k: v.item() for k, v in terms.items()})
        grads.append({n: p.grad for n, p in backbone.named_parameters() if p.grad is not None})
    assert set(losses[0]) == {"ce_intact", "ce_corrupted", "kl", "attention"}
    for key, value in losses[0].items():
        assert losses[1][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-3, msg=name)
    backbone_grads = grads[0]
    vision = [n for n in backbone_grads if ".visual." in n or "vision" in n]
    assert vision and any(backbone_grads[n].abs().sum() > 0 for n in vision)
    embedding = backbone.model.get_input_embeddings().weight
    latent_rows = backbone_grads[next(n for n, p in backbone.named_parameters() if p is embedding)]
    assert latent_rows[method.block.new_token_ids].abs().sum() > 0


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_recurrent_loop_with_cache_equals_parallel_replay(family):
    """The recurrent latents, computed chunk by chunk with a KV cache and sliced M-RoPE positions,
    replayed in one parallel forward give the same answer logits."""
    _, backbone, method, samples = build(family, "latents.family=recurrent", "method=finetune")
    backbone.eval()
    layout = method.layout(samples, step=0)
    intact, cols = layout.select(INTACT_PATH)
    with torch.no_grad():
        inputs = layout_inputs(backbone, layout).columns(cols)
        run = run_sequence(backbone, inputs, slots=intact.slot_ranges())
        filled = inputs.embeds.clone()
        for col, value in run.slot_inputs.items():
            filled[:, col] = value
        replay = backbone(
            filled,
            additive(packed_allowed(intact.segments), filled.dtype),
            inputs.positions,
            layer_inputs=inputs.layer_inputs,
        ).logits
    assert inputs.positions.shape[0] == 3  # M-RoPE
    answer = intact.answer_queries(Segment.ANSWER_INTACT)
    valid = intact.segments[:, answer.start : answer.stop] != Segment.PAD
    difference = (run.logits(answer) - replay[:, answer.start : answer.stop])[valid].abs().max()
    assert difference < 1e-5


def test_qwen3_deepstack_features_reach_the_decoder():
    """Without the per-layer inputs the intact path no longer equals the model's own forward."""
    _, backbone, method, samples = build("qwen3_vl")
    backbone.eval()
    layout = method.layout(samples, step=0)
    intact, cols = layout.select(INTACT_PATH)
    with torch.no_grad():
        inputs = layout_inputs(backbone, layout).columns(cols)
        assert inputs.layer_inputs is not None and inputs.layer_inputs.shape[0] == 2
        mask = additive(packed_allowed(intact.segments), inputs.embeds.dtype)
        full = backbone(inputs.embeds, mask, inputs.positions, layer_inputs=inputs.layer_inputs)
        without = backbone(inputs.embeds, mask, inputs.positions)
    assert (full.logits - without.logits).abs().max() > 1e-3


def _one_sample(family: str):
    _, backbone, method, samples = build(family)
    backbone.eval()
    layout = method.packer(samples[:1], [])
    return backbone, layout


def test_stale_rope_deltas_do_not_shift_positions():
    """Given only embeddings, the top-level forward cannot compute M-RoPE positions: it falls back
    to a range plus whatever ``rope_deltas`` an earlier call left on the model (transformers 5.24).
    crystalkit computes positions itself, so its result is the model's own with any value left
    there, whether or not a release still reads it."""
    backbone, layout = _one_sample("qwen2_5_vl")
    ids, pixels = layout.input_ids, layout.pixel_values[0]
    cue = layout.regions[Segment.ANSWER_INTACT]
    with torch.no_grad():
        reference = own_forward(backbone, ids, pixels)[0, cue.start : cue.stop - 1]
        results = []
        for stale in (None, torch.tensor([[-7]]), torch.tensor([[5]])):
            backbone.model.model.rope_deltas = stale
            results.append(intact_only(backbone, layout).intact_logits[0])
            assert backbone.model.model.rope_deltas is stale  # it ran with the value in place
    for ours in results:
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)
        assert torch.equal(ours, results[0])


def test_cache_with_explicit_mask_and_positions_equals_one_forward():
    """A 2-D mask over all keys + a KV cache + automatic positions raises a size mismatch in the
    model (transformers 5.24); the explicit 4-D mask and sliced M-RoPE positions crystalkit passes
    continue a cache exactly, whatever a release does with the 2-D form."""
    backbone, layout = _one_sample("qwen2_5_vl")
    with torch.no_grad():
        reference = own_forward(backbone, layout.input_ids, layout.pixel_values[0])
        logits, _ = chunked_forward(backbone, layout, tail=3)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-4)


def test_boolean_and_additive_masks_give_the_models_own_result():
    """A boolean "may attend" mask (misread by eager attention in transformers 5.24) and
    crystalkit's additive float mask give the model's own result under eager and SDPA alike:
    the backbone converts a boolean mask itself instead of casting it to a +1 / 0 bias."""
    backbone, layout = _one_sample("qwen2_5_vl")
    eager = copy.deepcopy(backbone)
    eager.model.set_attn_implementation("eager")
    with torch.no_grad():
        reference = own_forward(backbone, layout.input_ids, layout.pixel_values[0])
        inputs = layout_inputs(backbone, layout)
        allowed = packed_allowed(layout.segments)
        for model in (backbone, eager):
            for mask in (allowed[:, None], additive(allowed, inputs.embeds.dtype)):
                out = model(inputs.embeds, mask, inputs.positions)
                torch.testing.assert_close(out.logits, reference, atol=1e-5, rtol=1e-4)
        cast = backbone(inputs.embeds, allowed[:, None].float(), inputs.positions).logits
    assert (cast - reference).abs().max() > 1e-2  # the premise: a +1 / 0 bias masks nothing


def test_flash_attention_is_refused_for_the_language_model_in_one_line(tmp_path):
    result = invoke(
        "train",
        ROOT / "recipes" / "tiny" / "qwen2_5_vl.yaml",
        "backbone.attn_implementation=flash_attention_2",
        f"output_dir={tmp_path}",
    )
    line = assert_one_error_line(result)
    assert "backbone.attn_implementation: flash_attention_2 cannot run the language model" in line
    assert "2-D padding mask" in line and "use sdpa" in line
    assert not any(tmp_path.iterdir())


def test_vision_flash_attention_without_flash_attn_is_one_line(monkeypatch):
    """Where transformers cannot load FlashAttention-2 (no flash-attn package or no CUDA GPU), a
    request for it in the vision tower stops with one line before the model is built."""
    monkeypatch.setattr(base, "is_flash_attn_2_available", lambda: False)
    with pytest.raises(UsageError) as caught:
        build("qwen2_5_vl", "backbone.vision_attn_implementation=flash_attention_2")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("backbone.vision_attn_implementation: flash_attention_2 needs")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_siglip", "smolvlm"])
def test_vision_tower_takes_its_own_attention_kernel(family):
    """``vision_attn_implementation`` reaches the vision tower's sub-config only; the language
    model keeps ``attn_implementation``, and the image features are the single-kernel model's."""
    _, backbone, method, samples = build(family)
    _, mixed, _, _ = build(family, "backbone.vision_attn_implementation=eager")
    assert mixed.model.config.vision_config._attn_implementation == "eager"
    # (the attention objective wraps the language model's kernel in the recording probe)
    assert mixed.language_model.config._attn_implementation.removeprefix(PREFIX) == "sdpa"
    assert backbone.model.config.vision_config._attn_implementation == "sdpa"
    pixels = method.layout(samples, step=0).pixel_values
    with torch.no_grad():
        ours, theirs = mixed.image_features(pixels)[0], backbone.image_features(pixels)[0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_attention_capture_rows_match_eager_and_stay_exact_under_checkpointing(family):
    _, backbone, method, samples = build(family)
    layout = method.layout(samples, step=0)
    needs = Needs(layers=(0, -1))
    eager = copy.deepcopy(backbone)
    eager.model.set_attn_implementation("eager")
    backbone.eval()
    with torch.no_grad():
        probed = packed(backbone, layout, needs)
        inputs = layout_inputs(eager, layout)
        reference = eager.language_model(
            inputs_embeds=inputs.embeds,
            attention_mask=additive(packed_allowed(layout.segments), inputs.embeds.dtype),
            position_ids=inputs.positions,
            output_attentions=True,
            **eager.layer_input_kwargs(inputs.layer_inputs),
        ).attentions
    latent = layout.regions[Segment.LATENT]
    for asked, layer in ((0, 0), (-1, backbone.num_layers - 1)):
        q = layout.answer_queries(Segment.ANSWER_INTACT)
        rows = reference[layer][:, :, q.start : q.stop, latent.start : latent.stop].mean(1)
        rows = rows / rows.sum(-1, keepdim=True)
        torch.testing.assert_close(probed.intact_attention[asked], rows, atol=1e-5, rtol=1e-4)

    grads = []
    checkpointed = copy.deepcopy(backbone)
    checkpointed.enable_gradient_checkpointing()
    for model in (backbone, checkpointed):
        model.train()
        loss, _ = method.loss(model, layout)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert checkpointed.language_model.gradient_checkpointing
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("latents", ["token", "recurrent"])
def test_generation_runs_the_training_latent_computation(family, latents):
    _, backbone, method, samples = build(family, f"latents.family={latents}")
    backbone.eval()
    with torch.no_grad():
        train_layout = method.layout(samples, step=method.recipe.train.steps)
        training = intact_only(backbone, train_layout).intact_logits
        cue = len(backbone.tokenizer.encode("answer :", add_special_tokens=False)) - 1
        prompt = method.prompt_layout(samples)
        out = generate_answers(backbone, prompt, 3, [backbone.tokenizer.eos_token_id])
    torch.testing.assert_close(out.first_logits, training[:, cue], atol=1e-5, rtol=1e-4)
    assert out.tokens.shape[0] == len(samples) and out.tokens.shape[1] >= 1
    # batched generation equals one sample at a time
    with torch.no_grad():
        alone = generate_answers(backbone, method.prompt_layout(samples[:1]), 3, [-1])
    torch.testing.assert_close(alone.first_logits[0], out.first_logits[0], atol=1e-5, rtol=1e-4)


def test_a_larger_config_vocab_size_gives_spare_token_rows():
    """``text_config.vocab_size`` above the offline tokenizer's size is kept (spare rows, as the 7B
    checkpoint's 152,064 for 151,665 tokens); below it, the tokenizer's size wins."""
    _, backbone, method, samples = build(
        "qwen2_5_vl", "backbone.config.text_config.vocab_size=3000"
    )
    assert len(backbone.tokenizer) < 3000  # latent tokens included: they fit in the spare rows
    assert {m.shape[0] for m in backbone.token_matrices()} == {3000}
    out = intact_only(backbone, method.layout(samples, 0))
    assert out.intact_logits.shape[-1] == 3000
    _, small, _, _ = build("qwen2_5_vl", "backbone.config.text_config.vocab_size=64")
    assert {m.shape[0] for m in small.token_matrices()} == {len(small.tokenizer)}
