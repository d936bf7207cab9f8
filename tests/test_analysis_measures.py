"""The analysis measures on hand-built cases whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crystalkit.analysis.measures import (
    bootstrap_ci,
    centred_cosine,
    effective_rank,
    flip_rate,
    instance_spread,
    kl_divergence,
    mean_pairwise_cosine,
    option_distribution,
    relative_change,
    rescue,
)


def test_kl_is_zero_for_equal_distributions_and_ignores_absent_options():
    logp = option_distribution(torch.tensor([[-1.0, -2.0, -3.0, float("-inf")]]))
    assert logp[0, :3].exp().sum() == pytest.approx(1.0) and logp[0, 3] == float("-inf")
    assert kl_divergence(logp, logp).item() == pytest.approx(0.0)
    other = option_distribution(torch.tensor([[-3.0, -2.0, -1.0, float("-inf")]]))
    p, q = logp[0, :3].exp(), other[0, :3].exp()
    expected = float((p * (p / q).log()).sum())
    assert kl_divergence(logp, other).item() == pytest.approx(expected)
    assert flip_rate(logp, other).tolist() == [1.0] and flip_rate(logp, logp).tolist() == [0.0]


def test_rescue_is_the_share_of_the_loss_won_back():
    assert rescue(0.3, 0.45, 0.6) == pytest.approx(0.5)
    assert rescue(0.3, 0.3, 0.6) == 0.0 and rescue(0.3, 0.6, 0.6) == 1.0
    assert math.isnan(rescue(0.5, 0.5, 0.5))


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_rows():
    values = torch.arange(100, dtype=torch.float64) % 2  # a fair coin, mean 0.5

    def mean(idx: torch.Tensor) -> float:
        return float(values[idx].mean())

    low, high = bootstrap_ci(mean, len(values))
    assert low < 0.5 < high and 0.05 < high - low < 0.35
    many = torch.arange(4000, dtype=torch.float64) % 2
    low2, high2 = bootstrap_ci(lambda i: float(many[i].mean()), len(many), draws=300)
    assert high2 - low2 < (high - low) / 3


def test_states_that_ignore_the_image_do_not_move_and_those_that_copy_it_do():
    torch.manual_seed(0)
    image_a, image_b = torch.randn(64, 8), torch.randn(64, 8)
    blind = torch.ones(64, 8) * 3.0  # latents that never read the image
    spread = instance_spread(image_a)
    assert relative_change(blind, blind, spread).max() == 0
    change = relative_change(image_a, image_b, spread)  # latents that copy the image
    assert change.mean() == pytest.approx(1.0, abs=0.25)  # two random instances: ~1 spread


def test_centred_cosine_removes_the_shared_direction():
    shared = torch.tensor([100.0, 0.0, 0.0])
    a, b = shared + torch.tensor([0.0, 1.0, 0.0]), shared + torch.tensor([0.0, 0.0, 1.0])
    raw = torch.nn.functional.cosine_similarity(a, b, dim=0)
    assert raw > 0.99  # anisotropy makes unrelated states look identical
    assert centred_cosine(a, b, shared).item() == pytest.approx(0.0, abs=1e-6)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 12), st.integers(2, 6))
def test_collapsed_states_have_cosine_one_and_rank_one(n, dim):
    direction = torch.randn(dim)
    collapsed = torch.stack([direction * (i + 1) for i in range(n)])  # one line through 0
    assert mean_pairwise_cosine(collapsed, torch.zeros(dim)).item() == pytest.approx(1.0, abs=1e-5)
    assert effective_rank(collapsed) == pytest.approx(1.0, abs=1e-4)


def test_spread_out_states_have_low_cosine_and_full_rank():
    torch.manual_seed(0)
    states = torch.randn(400, 6)
    assert abs(mean_pairwise_cosine(states, torch.zeros(6)).item()) < 0.02
    assert effective_rank(states) > 5.5
    per_index = torch.randn(30, 4, 6)  # [N, K, D]: one cosine per index
    assert mean_pairwise_cosine(per_index, torch.zeros(6)).shape == (4,)


def test_a_probe_recovers_a_planted_attribute_and_not_random_labels():
    from crystalkit.analysis.probing import probe

    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(3, (300,), generator=generator)
    features = torch.randn(300, 32, generator=generator)
    features[:, 5] += 6.0 * labels  # the attribute, planted in one direction
    found = probe(features, labels.tolist())
    assert found.accuracy > 0.9 and found.majority < 0.45
    assert found.control < found.majority + 0.1  # shuffled labels: nothing to find
    noise = probe(torch.randn(300, 32, generator=generator), labels.tolist())
    assert noise.accuracy < noise.majority + 0.1
    assert probe(features, ["a"] * 300) is None  # one class
    assert probe(features[:4], [0, 0, 0, 1]) is None  # too few of a class for 3 folds
