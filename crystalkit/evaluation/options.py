"""The answer as a distribution over the options, not just the option greedy decoding picks.

Each option's log-likelihood is that of its whole answer — the text (or letter) the model was
trained to write, then the end-of-sequence token — after the prompt and its latent block: ``top
left`` and ``top right`` share their first token, so a first-token distribution cannot tell them
apart. The prompt runs once (:func:`~crystalkit.evaluation.generation.run_prompt`, so every view and
latent replacement of evaluation applies) and its cache is shared by all options of a sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from crystalkit.crystal.layout import Layout
from crystalkit.crystal.method import Method
from crystalkit.data.sample import LETTERS, Sample
from crystalkit.evaluation.generation import Prompt, View, feed, run_prompt
from crystalkit.models.backbone import Backbone
from crystalkit.models.compat import cache_layers_kv


def option_answers(method: Method, sample: Sample) -> list[list[int]]:
    """Token ids of each option's answer as training writes it (letter or text, then eos)."""
    packer, tokenizer = method.packer, method.packer.backbone.tokenizer
    texts = LETTERS[: len(sample.options)] if packer.answer == "letter" else sample.options
    return [
        [*tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]
        for text in texts
    ]


def _repeat(prompt: Prompt, backbone: Backbone, times: int) -> Prompt:
    """Every row of ``prompt`` repeated ``times`` times (consecutively), cache included."""
    cache = backbone.new_cache()
    for layer, (keys, values) in enumerate(cache_layers_kv(prompt.cache)):
        cache.update(keys.repeat_interleave(times, 0), values.repeat_interleave(times, 0), layer)
    return Prompt(
        cache,
        prompt.mask.repeat_interleave(times, 0),
        prompt.next_positions.repeat_interleave(times, -2),
        prompt.logits.repeat_interleave(times, 0),
    )


@torch.inference_mode()
def option_logprobs(
    backbone: Backbone,
    method: Method,
    layout: Layout,
    samples: Sequence[Sample],
    replacement: Callable[..., Any] | None = None,
    view: View = "intact",
) -> torch.Tensor:
    """``[B, O]`` log-likelihood of each option's whole answer for a prompt layout of
    ``samples`` (``O`` = the most options any sample has; missing options are ``-inf``)."""
    answers = [option_answers(method, sample) for sample in samples]
    options = max(len(a) for a in answers)
    length = max(len(ids) for a in answers for ids in a)
    device = layout.input_ids.device
    pad = backbone.tokenizer.pad_token_id
    tokens = torch.full((len(samples) * options, length), pad, dtype=torch.long, device=device)
    valid = torch.zeros_like(tokens, dtype=torch.bool)
    for i, sample_answers in enumerate(answers):
        for j, ids in enumerate(sample_answers):
            tokens[i * options + j, : len(ids)] = torch.tensor(ids, device=device)
            valid[i * options + j, : len(ids)] = True
    prompt = _repeat(run_prompt(backbone, layout, replacement, view), backbone, options)
    scores = prompt.logits.float().log_softmax(-1).gather(-1, tokens[:, :1])[:, 0]
    if length > 1:  # tokens 1..n-1 predict tokens 2..n
        logits, _ = feed(backbone, prompt, tokens[:, :-1], valid[:, :-1])
        rest = logits.float().log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
        scores = scores + (rest * valid[:, 1:]).sum(-1)
    present = valid[:, 0]
    scores = torch.where(present, scores, torch.full_like(scores, float("-inf")))
    return scores.view(len(samples), options)
