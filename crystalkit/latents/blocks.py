"""The latent block: the tokens a sample carries between its question and its answer.

Two families (METHOD.md, "What the latents are"):

* ``token`` — K distinct learned special tokens ``<latent_0> ... <latent_{K-1}>``. Their content
  is their per-layer keys and values, which attend to the image.
* ``recurrent`` — K slots whose input embedding is the last-layer hidden state of the position
  before (Coconut); the slot token ``<latent>`` only marks where they go.

Either way the block is wrapped in ``<latent_start>`` / ``<latent_end>`` markers; K = 0 is no block
at all. New rows start as copies of an existing token's row (Coconut), never random.
"""

from __future__ import annotations

import sys
from typing import Literal

import torch
from torch import nn

from crystalkit.errors import UsageError
from crystalkit.models.backbone import Backbone

START, END, SLOT = "<latent_start>", "<latent_end>", "<latent>"

Family = Literal["token", "recurrent"]


def slot_token(index: int) -> str:
    return f"<latent_{index}>"


class LatentBlock:
    """Token ids of K-slot latent blocks for one backbone (adds the tokens it needs)."""

    def __init__(self, backbone: Backbone, family: Family, max_k: int, init_from: str | None):
        self.family = family
        self.max_k = max_k
        source = init_from or backbone.tokenizer.eos_token
        if max_k and source not in backbone.tokenizer.get_vocab():
            raise UsageError(
                f"latents.init_from: {source!r} is not a token of the backbone's tokenizer "
                "(expected an existing token, e.g. its eos token; null = eos)"
            )
        slots = [SLOT] if family == "recurrent" else [slot_token(i) for i in range(max_k)]
        tokens = [START, END, *slots] if max_k else []
        ids = backbone.add_tokens(tokens, init_from=source) if tokens else []
        self.new_token_ids = ids
        self._start, self._end, self._slots = (ids[0], ids[1], ids[2:]) if ids else (0, 0, [])

    @property
    def recurrent(self) -> bool:
        return self.family == "recurrent"

    def ids(self, k: int) -> list[int]:
        """``[start, slot_1 .. slot_K, end]`` (empty for K = 0)."""
        if not 0 <= k <= self.max_k:
            raise ValueError(f"K must be in [0, {self.max_k}], got {k}")
        if k == 0:
            return []
        slots = self._slots * k if self.recurrent else self._slots[:k]
        return [self._start, *slots, self._end]


def train_only_rows(matrices: list[nn.Parameter], rows: list[int]) -> None:
    """Zero the gradient of every row of ``matrices`` except ``rows`` (the reference trains only
    the new tokens' embedding and output rows). Pair with zero weight decay on these matrices:
    AdamW's update of a row whose gradient is always zero is then exactly zero."""
    for matrix in {id(m): m for m in matrices}.values():
        keep = torch.zeros(matrix.shape[0], 1, dtype=torch.bool)
        keep[rows] = True
        # the mask follows the gradient: the backbone moves to its device after this is set up
        matrix.register_hook(lambda grad, keep=keep: grad * keep.to(grad.device, grad.dtype))


@torch.no_grad()
def reset_token_rows(backbone: Backbone, ids: list[int], source: str) -> None:
    """Set the embedding (and output) rows of ``ids`` to ``source``'s current rows: how a stage
    that first uses latent tokens starts them, as a fresh run on the previous stage's weights
    would. Under LoRA the rows live in peft's trainable-token table, so they are written there."""
    if not ids:
        return
    row = backbone.tokenizer.convert_tokens_to_ids(source)
    peft_layers = sys.modules.get("peft.tuners.trainable_tokens.layer")  # loaded iff LoRA is on
    tables = [
        m
        for m in backbone.modules()
        if peft_layers is not None and isinstance(m, peft_layers.TrainableTokensLayer)
    ]
    for layer in tables:
        if layer.tied_adapter is not None:
            continue  # shares its table with the layer it is tied to
        base = layer.get_base_layer().weight
        for adapter, indices in layer.token_indices.items():
            delta = layer.trainable_tokens_delta[adapter]
            for token in ids:
                delta[indices.index(token)] = base[row]
    if not tables:
        for matrix in backbone.token_matrices():
            matrix[ids] = matrix[row].clone()
