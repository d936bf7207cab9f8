"""The tiny Qwen2.5-VL with bfloat16 / float16 weights (``backbone.dtype``, as the paper recipe
runs): the fast computations agree with their references at low-precision tolerance, and
Idefics3 / SmolVLM keep a mid-grey view in float16.

**What "at bf16 tolerance" means here.** Every comparison has a fast computation F (the packed
sequence, the adapter's intact path, cached generation) and a reference R that the fp32 tests
already equate with it (two-pass, the model's own forward, the training computation). Both run on
the same low-precision model; ``g`` is R's own gap to the same computation on a float32 copy of
those weights (the rounding that R alone suffers). If F computes what R computes, F and R are two
roundings of the same exact result, each off by about ``g``, so ``|F - R| <= g_F + g`` (triangle
inequality) is about ``2 g``: the tests assert ``|F - R| <= C * g`` with ``C = 2`` (measured on this
model: at most ~1.0 g). A mistake of F's own that shows only at low precision (a mask, position or
cache handled in the wrong dtype) adds its error to F alone and breaks the bound; R's gap cannot
grow with it. Each test also checks ``g > 0``: the model really computed in low precision.
Gaps are maxima of absolute differences over the compared entries, in float32.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hf_models import build, intact_answer_rows, own_forward

from crystalkit.crystal.paths import Needs, intact_only, packed, two_pass
from crystalkit.evaluation.generation import generate_answers

C = 2.0
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _twins(dtype: str, *overrides: str):
    """``(low-precision backbone, its float32 copy, method, samples)``, both in eval mode: the
    copy holds the same (rounded) weights, so the two differ only in the arithmetic."""
    _, low, method, samples = build("qwen2_5_vl", f"backbone.dtype={dtype}", *overrides)
    assert next(low.parameters()).dtype == DTYPES[dtype]
    low.eval()
    return low, copy.deepcopy(low).float(), method, samples


def _within(fast: torch.Tensor, reference: torch.Tensor, reference32: torch.Tensor, what: str):
    own = _gap(reference, reference32)
    assert own > 0, f"{what}: the low-precision reference equals float32 (not low precision?)"
    assert _gap(fast, reference) <= C * own, (what, _gap(fast, reference), own)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("latents", ["token", "recurrent"])
def test_packed_equals_two_pass_at_low_precision(dtype, latents):
    """Answer logits of both paths and the last layer's latent attention rows (what CE, KL and
    the attention term read): packed against the two-pass reference."""
    low, full, method, samples = _twins(dtype, f"latents.family={latents}")
    layout = method.layout(samples, step=0)
    needs = Needs(layers=(-1,))
    with torch.no_grad():
        fast = packed(low, layout, needs)
        reference, reference32 = two_pass(low, layout, needs), two_pass(full, layout, needs)
    assert fast.intact_logits.dtype == DTYPES[dtype]
    rows = fast.answer_mask
    for field in ("intact_logits", "corrupted_logits", "intact_attention", "corrupted_attention"):
        got, ref, ref32 = (getattr(out, field) for out in (fast, reference, reference32))
        if isinstance(got, dict):
            got, ref, ref32 = got[-1], ref[-1], ref32[-1]
        _within(got[rows], ref[rows], ref32[rows], field)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_intact_path_equals_the_models_own_forward_at_low_precision(dtype):
    """The adapter's intact path (its image merge, M-RoPE positions, 4-D mask) against the
    unmodified model's own forward on each unpadded sample, both on the same low-precision model."""
    low, full, method, samples = _twins(dtype)
    layout = method.layout(samples, step=0)
    with torch.no_grad():
        for row, (ids, got, cols) in enumerate(intact_answer_rows(low, layout)):
            pixels = layout.pixel_values[row]
            reference = own_forward(low, ids, pixels)[0, cols]
            reference32 = own_forward(full, ids, pixels)[0, cols]
            _within(got, reference, reference32, f"sample {row}")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("latents", ["token", "recurrent"])
def test_generation_runs_the_training_latent_computation_at_low_precision(dtype, latents):
    """The first answer distribution of batched greedy decoding against the training
    computation's logits at the answer cue."""
    low, full, method, samples = _twins(dtype, f"latents.family={latents}")
    layout = method.layout(samples, step=method.recipe.train.steps)
    cue = len(low.tokenizer.encode("answer :", add_special_tokens=False)) - 1
    with torch.no_grad():
        reference = intact_only(low, layout).intact_logits[:, cue]
        reference32 = intact_only(full, layout).intact_logits[:, cue]
        prompt = method.prompt_layout(samples)
        fast = generate_answers(low, prompt, 1, [low.tokenizer.eos_token_id]).first_logits
    _within(fast, reference, reference32, "first answer logits")


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_mid_grey_corrupted_view_survives_float16(family):
    """A fully masked mid-grey image normalises to an all-zero view, which the model drops as
    padding after casting it to its dtype. crystalkit's nudge must survive that cast: float32's
    smallest normal number is 0 in float16, so the view would vanish and the step fail."""
    _, backbone, method, samples = build(
        family,
        "backbone.dtype=float16",
        "corruption.name=mask",
        "corruption.fraction=1.0",
        "corruption.value=0.5",
        "crystal.corrupt_at=model_input",
    )
    layout = method.layout(samples, step=0)
    grey = backbone.preprocess_images(method.corrupt(samples, 0))
    assert bool((grey == 0).all())  # the premise: every corrupted view is all zeros
    assert torch.tensor(torch.finfo(torch.float32).tiny).half() == 0  # what the fix avoids
    with torch.no_grad():
        features, _ = backbone.image_features(grey)
    assert features.shape[0] == len(samples) * backbone.num_image_tokens
    assert bool(features.isfinite().all())
    loss, terms = method.loss(backbone, layout)
    assert set(terms) == {"ce_intact", "ce_corrupted", "kl", "attention"}
    assert bool(loss.isfinite())
