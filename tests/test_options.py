"""Option log-likelihoods: the fast shared-prompt computation equals teacher-forcing each option
through the training path, for every view and both latent families and answer forms."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from crystalkit.crystal.paths import intact_only, packed
from crystalkit.data.prompt import IGNORE_INDEX
from crystalkit.data.sample import LETTERS
from crystalkit.evaluation.options import option_logprobs
from crystalkit.evaluation.replacement import BUILTIN
from crystalkit.runs.build import build_dataset, build_model


def _setup(tiny_recipe, *overrides: str):
    recipe = tiny_recipe("method=crystal", "latents.schedule.k=3", *overrides)
    dataset = build_dataset(recipe)
    model = build_model(recipe, dataset)
    model.backbone.eval()
    return model.backbone, model.method, [dataset.split("test")[i] for i in range(3)]


def _summed(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of the targets' log-probabilities per row (the slow reference)."""
    mask = targets != IGNORE_INDEX
    logp = logits.float().log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (logp * mask).sum(-1)


def _reference(backbone, method, samples, view: str) -> torch.Tensor:
    """Each option teacher-forced as the answer of a full training layout, one at a time."""
    rows = []
    for sample in samples:
        scores = []
        for j in range(len(sample.options)):
            forced = replace(sample, answer=LETTERS[j])
            k = method.final_k
            if view == "intact":
                layout = method.packer(
                    [forced], method.block.ids(k), recurrent=method.block.recurrent
                )
                out = intact_only(backbone, layout)
                scores.append(_summed(out.intact_logits, out.targets))
            else:
                layout = method.packer(
                    [forced],
                    method.block.ids(k),
                    corrupted_images=method.corrupt([sample], 5),
                    blank_latents=view == "no_copy",
                    recurrent=method.block.recurrent,
                )
                out = packed(backbone, layout)
                scores.append(_summed(out.corrupted_logits, out.targets))
        rows.append(torch.cat(scores))
    return torch.stack(rows)


@pytest.mark.parametrize("family", ["token", "recurrent"])
@pytest.mark.parametrize("answer", ["text", "letter"])
@pytest.mark.parametrize("view", ["intact", "copied", "no_copy"])
def test_option_loglikelihoods_equal_teacher_forcing_each_option(tiny_recipe, family, answer, view):
    backbone, method, samples = _setup(
        tiny_recipe, f"latents.family={family}", f"prompt.answer={answer}"
    )
    if view == "intact":
        layout = method.prompt_layout(samples)
    else:
        corrupt = method.corrupt
        method.corrupt = lambda batch, seed: torch.cat([corrupt([s], 5) for s in batch])
        layout = method.control_layout(samples, 5, blank=view == "no_copy")
    with torch.no_grad():
        fast = option_logprobs(backbone, method, layout, samples, view=view)
        slow = _reference(backbone, method, samples, view)
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(fast).all() and (fast < 0).all()
    # the distributions differ between options: a real per-option score, not a constant
    assert (fast.max(-1).values - fast.min(-1).values > 1e-4).all()


def test_a_replacement_changes_the_option_distribution(tiny_recipe):
    backbone, method, samples = _setup(tiny_recipe)
    layout = method.prompt_layout(samples)
    plain = option_logprobs(backbone, method, layout, samples)
    identity = option_logprobs(backbone, method, layout, samples, lambda b, lay, kv: kv)
    torch.testing.assert_close(identity, plain, atol=1e-5, rtol=1e-5)
    zeroed = option_logprobs(backbone, method, layout, samples, BUILTIN["zero"])
    assert not torch.allclose(zeroed, plain, atol=1e-4)
