"""Alignment loss kernels against hand-computed values and slow per-sample references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crystalkit.objectives.functional import (
    JS_MAX,
    attention_divergence,
    cosine_distance,
    hardest_mean,
    latent_attention,
    token_kl,
)


def test_token_kl_known_value():
    p = torch.tensor([0.5, 0.5]).log()
    q = torch.tensor([0.25, 0.75]).log()
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    value = token_kl(p.view(1, 1, 2), q.view(1, 1, 2))
    assert value.shape == (1, 1)
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_token_kl_is_zero_for_identical_paths_and_stops_target_gradient():
    target = torch.randn(2, 3, 5, requires_grad=True)
    student = target.detach().clone().requires_grad_(True)
    kl = token_kl(target, student)
    assert torch.allclose(kl, torch.zeros_like(kl), atol=1e-6)
    shifted = token_kl(target, student + torch.randn_like(student)).sum()
    shifted.backward()
    assert target.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_symmetric_variant_lets_gradient_reach_the_target():
    target = torch.randn(1, 2, 4, requires_grad=True)
    token_kl(target, torch.randn(1, 2, 4), stop_gradient=False).sum().backward()
    assert target.grad is not None and target.grad.abs().sum() > 0


def _hardest_reference(values, mask, fraction, min_count):
    means = []
    for row, keep_mask in zip(values.tolist(), mask.tolist(), strict=True):
        picked = sorted((v for v, m in zip(row, keep_mask, strict=True) if m), reverse=True)
        if not picked:
            continue
        k = min(len(picked), max(min_count, math.floor(fraction * len(picked) + 1e-6)))
        means.append(sum(picked[:k]) / k)
    return sum(means) / len(means) if means else 0.0


@settings(max_examples=80, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(1, 12),
    st.floats(0.0, 1.0),
    st.integers(1, 3),
    st.data(),
)
def test_hardest_mean_matches_reference(batch, length, fraction, min_count, data):
    values = torch.tensor(
        data.draw(st.lists(st.floats(0, 10), min_size=batch * length, max_size=batch * length))
    ).view(batch, length)
    mask = torch.tensor(
        data.draw(st.lists(st.booleans(), min_size=batch * length, max_size=batch * length))
    ).view(batch, length)
    got = hardest_mean(values, mask, fraction, min_count).item()
    assert got == pytest.approx(_hardest_reference(values, mask, fraction, min_count), abs=1e-5)


def test_hardest_mean_reference_setting_keeps_ten_percent_min_one():
    values = torch.arange(20.0).view(1, 20)
    mask = torch.ones(1, 20, dtype=torch.bool)
    assert hardest_mean(values, mask).item() == pytest.approx((19 + 18) / 2)  # floor(0.1*20)=2
    assert hardest_mean(values[:, :5], mask[:, :5]).item() == 4.0  # floor(0.5)=0 -> min 1


def test_latent_attention_selects_head_averages_and_renormalises():
    probs = torch.zeros(1, 2, 1, 4)
    probs[0, 0, 0] = torch.tensor([0.4, 0.2, 0.2, 0.2])
    probs[0, 1, 0] = torch.tensor([0.1, 0.6, 0.2, 0.1])
    key_mask = torch.tensor([[False, True, True, False]])
    rows = latent_attention(probs, key_mask)
    # head mean over keys 1, 2: (0.4, 0.2) -> renormalised (2/3, 1/3)
    assert torch.allclose(rows, torch.tensor([[[2 / 3, 1 / 3]]]))


@given(
    st.sampled_from(["kl", "js", "mse"]), st.integers(1, 3), st.integers(1, 4), st.integers(2, 6)
)
def test_attention_divergence_zero_iff_equal_and_bounded(kind, b, q, k):
    p = torch.softmax(torch.randn(b, q, k), -1)
    rows = torch.ones(b, q, dtype=torch.bool)
    assert attention_divergence(p, p, rows, kind).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.softmax(torch.randn(b, q, k) * 3, -1)
    value = attention_divergence(p, other, rows, kind).item()
    assert value >= 0
    if kind == "js":
        assert value <= JS_MAX + 1e-6


def test_attention_divergence_known_values_and_row_mask():
    p = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])
    q = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]])
    only_first = torch.tensor([[True, False]])
    assert attention_divergence(p, q, only_first, "kl").item() == pytest.approx(
        math.log(2), rel=1e-5
    )
    assert attention_divergence(p, q, only_first, "mse").item() == pytest.approx(0.5)
    both = torch.ones(1, 2, dtype=torch.bool)
    assert attention_divergence(p, q, both, "kl").item() == pytest.approx(math.log(2) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="unknown divergence"):
        attention_divergence(p, q, both, "l1")  # type: ignore[arg-type]


def test_cosine_distance_known_values_and_stop_gradient():
    a = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]], requires_grad=True)
    b = torch.tensor([[[0.0, 1.0], [2.0, 0.0]]], requires_grad=True)
    mask = torch.tensor([[True, True]])
    value = cosine_distance(a, b, mask)
    assert value.item() == pytest.approx(0.5)  # (1 - 0 + 1 - 1) / 2
    value.backward()
    assert a.grad is None and b.grad is not None
    assert cosine_distance(a, b, torch.tensor([[False, True]])).item() == pytest.approx(0.0)
