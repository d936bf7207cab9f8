"""Built-in corruptions.

A corruption is a callable ``(images, generator) -> images`` over a float batch ``[B, 3, H, W]``
in ``[0, 1]``; all randomness comes from ``generator`` so a step's corruption is reproducible.
Parameters are the constructor's typed keyword arguments (validated from the recipe).
"""

from __future__ import annotations

import torch

from crystalkit.registries import CORRUPTIONS


@CORRUPTIONS.register("none")
class NoCorruption:
    """Identity: the corrupted path sees the intact image (control)."""

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return images
