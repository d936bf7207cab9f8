"""Attention rows recorded next to SDPA equal eager attention's, and carry gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from crystalkit.crystal.layout import Packer
from crystalkit.models.attention_capture import enable_attention_capture, record_attention
from crystalkit.models.masks import additive, causal_allowed, positions_from_mask
from crystalkit.runs.build import build_backbone, build_dataset


@pytest.fixture
def setup(tiny_recipe):
    torch.manual_seed(0)
    recipe = tiny_recipe("backbone.num_layers=3", "backbone.lm_kwargs={num_key_value_heads: 1}")
    dataset = build_dataset(recipe)
    backbone = build_backbone(recipe, dataset)
    layout = Packer(backbone)([dataset.split("val")[i] for i in range(3)])
    valid = (layout.segments != 0).long()
    embeds = backbone.embed(layout.input_ids, layout.pixel_values)
    mask = additive(causal_allowed(valid), embeds.dtype)
    inputs = (embeds, mask, positions_from_mask(valid))
    width = layout.input_ids.shape[1]
    query_index = torch.tensor([[width - 3, width - 2], [width - 2, width - 1], [0, width - 1]])
    return backbone, inputs, query_index


def test_captured_rows_match_eager_attention_and_leave_outputs_unchanged(setup):
    backbone, (embeds, mask, positions), query_index = setup
    with torch.no_grad():
        plain = backbone(embeds, mask, positions).logits
    eager = copy.deepcopy(backbone)
    eager.lm.set_attn_implementation("eager")
    with torch.no_grad():
        reference = eager.lm(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            output_attentions=True,
        ).attentions
    enable_attention_capture(backbone.lm)
    with torch.no_grad(), record_attention({0, 2}, query_index) as recording:
        captured = backbone(embeds, mask, positions).logits
    torch.testing.assert_close(captured, plain)
    assert set(recording.rows) == {0, 2}
    for layer, rows in recording.rows.items():
        index = query_index[:, None, :, None].expand(-1, rows.shape[1], -1, rows.shape[-1])
        expected = reference[layer].gather(2, index)
        torch.testing.assert_close(rows, expected.float(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(rows.sum(-1), torch.ones(rows.shape[:-1]))


def test_capture_records_nothing_outside_a_recording_and_rows_have_gradients(setup):
    backbone, (embeds, mask, positions), query_index = setup
    enable_attention_capture(backbone.lm)
    enable_attention_capture(backbone.lm)  # idempotent
    backbone(embeds, mask, positions)
    with record_attention({1}, query_index) as recording:
        backbone(embeds.detach(), mask, positions)
    rows = recording.rows[1]
    rows[..., :4].sum().backward()
    q_proj = backbone.lm.model.layers[1].self_attn.q_proj.weight
    assert q_proj.grad is not None and q_proj.grad.abs().sum() > 0


def test_captured_gradients_are_exact_under_gradient_checkpointing(setup):
    backbone, (embeds, mask, positions), query_index = setup
    checkpointed = copy.deepcopy(backbone)
    checkpointed.enable_gradient_checkpointing()
    grads = []
    for model in (backbone, checkpointed):
        model.enable_attention_capture()
        model.train()
        model.zero_grad()
        with record_attention({0, 2}, query_index) as recording:
            logits = model(embeds.detach(), mask, positions).logits
        loss = logits.square().mean() + sum(r[..., :5].sum() for r in recording.rows.values())
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert checkpointed.lm.model.gradient_checkpointing
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)
