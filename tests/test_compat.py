"""The bridges over transformers API renames, on fakes of either side and on the installed release."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from hf_models import build, chunked_forward
from torch import nn
from transformers import DynamicCache

from crystalkit.models.compat import (
    cache_kwargs,
    cache_layers_kv,
    enable_checkpointing,
    output_cache,
)


class _NewName(nn.Module):
    def forward(self, inputs_embeds=None, cache=None): ...


class _OldName(nn.Module):
    def forward(self, inputs_embeds=None, past_key_values=None): ...


@dataclass
class _NewOutput:
    logits: torch.Tensor
    cache: object = None


@dataclass
class _OldOutput:
    logits: torch.Tensor
    past_key_values: object = None


def test_cache_argument_and_output_field_follow_the_release():
    cache = object()
    assert cache_kwargs(_NewName(), cache) == {"cache": cache}
    assert cache_kwargs(_OldName(), cache) == {"past_key_values": cache}
    logits = torch.zeros(1)
    assert output_cache(_NewOutput(logits, cache)) is cache
    assert output_cache(_OldOutput(logits, cache)) is cache


def test_cache_layers_from_the_current_and_the_legacy_layout():
    keys, values = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4)
    cache = DynamicCache()
    cache.update(keys, values, 0)
    ((k, v),) = cache_layers_kv(cache)
    assert torch.equal(k, keys) and torch.equal(v, values)

    class Legacy:
        key_cache, value_cache = [keys], [values]

    assert cache_layers_kv(Legacy()) == [(keys, values)]


def test_checkpointing_switch_uses_whichever_method_exists():
    calls = []

    class New:
        def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None):
            calls.append(("new", activation_checkpointing_kwargs))

    class Old:
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            calls.append(("old", gradient_checkpointing_kwargs))

    enable_checkpointing(New(), {"use_reentrant": False})
    enable_checkpointing(Old(), {"use_reentrant": False})
    assert calls == [("new", {"use_reentrant": False}), ("old", {"use_reentrant": False})]


def test_installed_release_takes_the_chosen_names_without_deprecation_warnings():
    """A cached two-chunk forward of a real adapter warns about nothing renamed: crystalkit
    passes the names this transformers release expects."""
    _, backbone, method, samples = build("qwen2_5_vl")
    backbone.eval()
    layout = method.packer(samples[:2], [])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        _, cache = chunked_forward(backbone, layout, tail=2)
    assert cache is not None and len(cache_layers_kv(cache)) == backbone.num_layers
