"""What the two paths give an objective: :class:`PathOutputs`.

An objective reads the answer logits of both paths and, when it declares them, attention rows over
the latent keys and last-layer hidden states; the strategies of :mod:`crystalkit.crystal.paths`
fill in exactly what the recipe's objectives declare.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from crystalkit.data.prompt import IGNORE_INDEX


@dataclass
class PathOutputs:
    """Both paths at the answer-predicting columns ``[B, W]`` (``targets`` holds what each column
    predicts, ``IGNORE_INDEX`` where nothing). Attention maps are ``[B, W, K]`` over the K latent
    keys (head-averaged, renormalised), keyed by the requested layer index. With
    ``latents.write``, ``written`` holds the cross-entropy pairs of the written template."""

    targets: torch.Tensor
    intact_logits: torch.Tensor
    corrupted_logits: torch.Tensor | None = None
    intact_attention: dict[int, torch.Tensor] = field(default_factory=dict)
    corrupted_attention: dict[int, torch.Tensor] = field(default_factory=dict)
    intact_hidden: torch.Tensor | None = None
    corrupted_hidden: torch.Tensor | None = None
    num_latents: int = 0
    #: ``latents.write``: the written template's ``(logits [B, n, V], targets [B, n])`` by owner
    #: (``intact``, ``corrupted``, ``shared``: see :meth:`Layout.written_pairs`)
    written: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def answer_mask(self) -> torch.Tensor:
        return self.targets != IGNORE_INDEX
