"""LoRA through peft, on any :class:`Backbone`.

peft wraps a small host module (:func:`peft_host`) holding the backbone, and replaces the
targeted layers *inside* the backbone, so the backbone keeps working through its interface: the
crystal code still calls ``embed``, ``forward``, ``language_model`` and the attention capture, whose
attention modules (and their ``layer_idx``) are untouched; only their projections become LoRA
layers. The host exists because peft reads the wrapped model's ``config``, input embeddings and
tied weights to train token rows, and a backbone's ``config`` is crystalkit's own.

The latent tokens' rows stay trainable through peft's ``trainable_token_indices``: the embedding
(and, when untied, the output head) gets a small table of just those rows; with tied matrices
peft shares that table with the head. Everything else of the base is frozen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from crystalkit.errors import UsageError
from crystalkit.models.backbone import Backbone

#: attribute of the host that holds the backbone; prefixes every name in peft's files
HOST_ATTRIBUTE = "backbone"


class LoraSettings(Protocol):
    """What LoRA reads from a recipe's ``lora:`` section
    (:class:`~crystalkit.config.schema.LoraConfig`)."""

    r: int
    alpha: float
    dropout: float
    bias: str
    target_modules: list[str]
    vision_tower: bool


@dataclass
class _HostConfig:
    """What peft reads from a model's config (a dataclass: peft turns it into a dict). No
    ``model_type``: peft would take the host for a transformers model and remap its names."""

    tie_word_embeddings: bool


class _Host(nn.Module):
    def __init__(self, backbone: Backbone, token_modules: Sequence[str]):
        super().__init__()
        self.backbone = backbone
        embedding, *heads = token_modules
        self._embedding = embedding
        # {head weight: embedding weight}: how transformers declares tying, and what peft reads
        self._tied_weights_keys = {
            f"{HOST_ATTRIBUTE}.{h}.weight": f"{HOST_ATTRIBUTE}.{embedding}.weight" for h in heads
        }
        self.config = _HostConfig(tie_word_embeddings=bool(heads))

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_submodule(self._embedding)


def token_modules(backbone: Backbone) -> list[list[str]]:
    """Per token matrix (:meth:`Backbone.token_matrices`), the names of the modules using it as
    their weight, embedding first: one group of two when input and output are tied."""
    groups = []
    for matrix in backbone.token_matrices():
        names = [n for n, m in backbone.named_modules() if getattr(m, "weight", None) is matrix]
        names.sort(key=lambda n: not isinstance(backbone.get_submodule(n), nn.Embedding))
        groups.append(names)
    return groups


def peft_host(backbone: Backbone) -> nn.Module:
    """The module peft wraps for ``backbone``. To load an exported adapter elsewhere: build the
    run's model without LoRA (:func:`crystalkit.runs.build.build_model` of its recipe with
    ``lora.enabled=false``), then ``PeftModel.from_pretrained(peft_host(backbone), DIR)``."""
    groups = token_modules(backbone)
    tied = next((g for g in groups if len(g) > 1), None)
    return _Host(backbone, tied if tied is not None else [groups[0][0]])


def peft_config(
    backbone: Backbone, config: LoraSettings, token_ids: Sequence[int]
) -> PeftLoraConfig:
    """peft's config for ``config`` on ``backbone``: explicit module names (so the vision tower
    rule of :meth:`Backbone.lora_targets` holds) and the latent rows of every token matrix."""
    targets = backbone.lora_targets(config.target_modules, config.vision_tower)
    groups = token_modules(backbone)
    token_names = {n for group in groups for n in group}
    clash = sorted(token_names.intersection(targets))
    if clash:
        raise UsageError(
            f"lora.target_modules: {clash[0]} is a token matrix; its latent rows already train "
            "(the other rows stay frozen), remove it from target_modules"
        )
    if config.vision_tower and backbone.vision_tower is None:
        raise UsageError(
            f"lora.vision_tower: {type(backbone).__name__} has no vision tower; "
            "set lora.vision_tower=false"
        )
    if not targets:
        raise UsageError(
            f"lora.target_modules: none of {config.target_modules} names a module of the "
            f"language model of {type(backbone).__name__}"
        )
    # per matrix, its first module: the embedding of a tied pair (peft ties the head to it)
    rows = {f"{HOST_ATTRIBUTE}.{group[0]}": list(token_ids) for group in groups}
    return PeftLoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        bias=config.bias,
        target_modules=[f"{HOST_ATTRIBUTE}.{name}" for name in targets],
        trainable_token_indices=rows if token_ids else None,
    )


def apply_lora(backbone: Backbone, config: LoraSettings, token_ids: Sequence[int]) -> PeftModel:
    """Add LoRA layers to ``backbone`` in place and freeze the rest except the ``token_ids``
    rows. Returns peft's wrapper, needed to merge (``merge_and_unload``) or save the adapter
    (``save_pretrained``); training and evaluation keep using ``backbone`` itself."""
    lora = peft_config(backbone, config, token_ids)
    try:
        return get_peft_model(peft_host(backbone), lora)
    except ValueError as exc:  # peft's verdict on a target it cannot adapt
        raise UsageError(f"lora: peft cannot apply it: {exc}") from None


def base_buffers(backbone: Backbone) -> dict[str, torch.Tensor]:
    """The base model's persistent buffers, outside peft's layers: batch-norm statistics move
    during training although their layers are frozen, and peft's adapter files do not hold
    them."""
    tuned = tuple(f"{n}." for n, m in backbone.named_modules() if isinstance(m, BaseTunerLayer))
    persistent = backbone.state_dict(keep_vars=True).keys()
    return {
        n: b.detach().contiguous()
        for n, b in backbone.named_buffers()
        if n in persistent and not n.startswith(tuned)
    }
