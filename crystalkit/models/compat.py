"""transformers API differences crystalkit bridges (tested range: see pyproject).

transformers 5.2x renamed the KV-cache argument and output field from ``past_key_values`` to
``cache``; passing the old name still works there but warns, and older 5.x releases only know it.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn


@functools.cache
def _cache_kwarg(forward_owner: type) -> str:
    params = inspect.signature(forward_owner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """``{"cache": cache}`` or ``{"past_key_values": cache}``, whichever ``model`` accepts."""
    return {_cache_kwarg(type(model)): cache}


def output_cache(output: Any) -> Any:
    """The KV cache returned in a model output, whatever the release calls it."""
    name = "cache" if "cache" in getattr(output, "__dataclass_fields__", {}) else "past_key_values"
    return getattr(output, name, None)


def enable_checkpointing(model: nn.Module, kwargs: dict[str, Any]) -> None:
    """Turn on activation checkpointing (``activation_checkpointing_enable`` in recent releases,
    ``gradient_checkpointing_enable`` before; the old name warns in 5.2x)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def cache_layers_kv(cache: Any) -> list[tuple[Any, Any]]:
    """Per-layer ``(keys, values)`` ``[B, H_kv, T, d]`` of a ``DynamicCache`` (``.layers`` since
    transformers 4.56; ``key_cache``/``value_cache`` lists before)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))
