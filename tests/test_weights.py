"""Weight schedules: bounds, endpoints and monotonicity, a number as a constant, the released
code's step gate, and each term's weight reaching the loss."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from crystalkit.crystal.method import build_weight
from crystalkit.objectives.weights import Constant, Cosine, Gate, Linear
from crystalkit.params import config_model
from crystalkit.registries import WEIGHTS
from crystalkit.runs.build import build_dataset, build_model

totals = st.integers(1, 5000)
weights = st.floats(0, 10, allow_nan=False)
fractions = st.floats(0, 1, allow_nan=False)


@given(totals, weights, weights, fractions, fractions, st.data())
def test_linear_is_monotone_bounded_and_hits_both_ends(total, start, end, a, b, data):
    begin, until = sorted((a, b))
    if until - begin < 1e-6:
        return
    schedule = Linear(start, end, begin, until)
    steps = sorted(data.draw(st.lists(st.integers(0, total), min_size=2, max_size=20)))
    values = [schedule(s, total) for s in steps]
    assert values == sorted(values, reverse=start > end)
    assert all(min(start, end) - 1e-9 <= v <= max(start, end) + 1e-9 for v in values)
    assert schedule(total, total) == pytest.approx(end)
    assert schedule(0, total) == pytest.approx(start)
    assert all(schedule(s, total) == pytest.approx(start) for s in steps if s <= begin * total)


@given(totals, weights, weights, fractions, st.data())
def test_gate_switches_once_at_its_fraction(total, value, after, until, data):
    gate = Gate(value=value, until=until, after=after)
    step = data.draw(st.integers(0, total))
    assert gate(step, total) == (value if step < until * total else after)


@given(st.integers(0, 100), totals, st.data())
def test_gate_at_a_step_is_the_released_vqa_only_stage(vqa_only_stage, total, data):
    """The released code aligns while ``step <= vqa_only_stage``: ``until_step`` is one more."""
    gate = Gate(until_step=vqa_only_stage + 1)
    step = data.draw(st.integers(0, total))
    assert gate(step, total) == (1.0 if step <= vqa_only_stage else 0.0)


@given(totals, weights, weights, st.data())
def test_cosine_runs_from_start_to_end_monotonically(total, start, end, data):
    schedule = Cosine(start, end)
    assert schedule(0, total) == pytest.approx(start)
    assert schedule(total, total) == pytest.approx(end, abs=1e-9)
    steps = sorted(data.draw(st.lists(st.integers(0, total), min_size=2, max_size=20)))
    values = [schedule(s, total) for s in steps]
    assert values == pytest.approx(sorted(values, reverse=start > end))


@given(weights, totals, st.data())
def test_a_number_is_a_constant_schedule(value, total, data):
    step = data.draw(st.integers(0, total))
    assert build_weight(value)(step, total) == value == Constant(value)(step, total)


@pytest.mark.parametrize(
    "build",
    [
        lambda: Constant(-1.0),
        lambda: Constant(math.inf),
        lambda: Linear(begin=0.6, until=0.5),
        lambda: Linear(until=1.5),
        lambda: Gate(until=-0.1),
        lambda: Gate(until_step=-1),
        lambda: Cosine(start=-2.0),
    ],
)
def test_invalid_parameters_are_rejected(build):
    with pytest.raises(ValueError):
        build()


def test_steps_outside_the_stage_are_rejected():
    with pytest.raises(ValueError, match="step must be"):
        Gate()(11, 10)


def test_weight_schedules_are_registered_with_typed_parameters():
    assert {"constant", "linear", "gate", "cosine"} <= set(WEIGHTS.names())
    params = config_model(WEIGHTS.get("gate")).model_validate({"until_step": 4001})
    assert params.model_dump() == {"value": 1.0, "until": 0.5, "until_step": 4001, "after": 0.0}


def test_scheduled_weights_reach_the_loss_and_a_term_without_gradient_trains_nothing(tiny_recipe):
    """``total = w_ce(t) CE + w_kl(t) KL``, and ``gradient: false`` keeps the term in the value
    but out of the gradient (the released attention term)."""
    recipe = tiny_recipe(
        "method=crystal",
        "latents.schedule.k=2",
        "crystal.ce_weight={name: linear, start: 1.0, end: 0.5}",
        "objectives={kl: {fraction: 1.0, weight: {name: gate, until: 0.5, value: 3.0}}, "
        "cosine: {gradient: false, weight: 2.0}}",
    )
    dataset = build_dataset(recipe)
    model = build_model(recipe, dataset)
    backbone, method = model.backbone, model.method
    backbone.eval()
    samples = [dataset.split("train")[i] for i in range(4)]
    layout = method.layout(samples, step=0)
    early, late = method.weights_at(0), method.weights_at(recipe.train.steps - 1)
    assert (early["ce"], early["kl"], early["cosine"]) == (1.0, 3.0, 2.0)
    assert late["kl"] == 0.0 and late["ce"] == pytest.approx(1.0 - 0.5 * 7 / 8)
    for weights in (early, late):
        total, terms = method.loss(backbone, layout, weights)
        ce = (terms["ce_intact"] + terms["ce_corrupted"]) / 2
        expected = weights["ce"] * ce + weights["kl"] * terms["kl"] + 2.0 * terms["cosine"]
        assert total.item() == pytest.approx(expected.item(), rel=1e-6)

    def grads(weights):
        backbone.zero_grad()
        method.loss(backbone, layout, weights)[0].backward()
        return [p.grad.clone() for p in backbone.parameters() if p.grad is not None]

    with_term = grads(late)
    without_term = grads(late | {"cosine": 0.0})
    assert all(torch.equal(a, b) for a, b in zip(with_term, without_term, strict=True))
