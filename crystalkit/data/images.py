"""Image files -> the ``uint8 [3, H, W]`` tensors a :class:`~crystalkit.data.sample.Sample` holds.

Images are converted to RGB and resized to a square ``image_size`` by default, so that the
corruption sees every image at one size; the backbone then resizes to its own input size
(``preprocess_images``), as for every other dataset. With no size (:func:`sample_tensor` with
``None``) an image keeps its native size: the corruption sees it there and the backbone resizes
afterwards (the released code's blur-then-resize), or resizes each itself (``resolution:
processor``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from crystalkit.errors import UsageError


class ImageFileError(UsageError):
    """An image file that is missing or cannot be decoded (callers prefix where it came from)."""


def open_rgb(path: Path) -> Image.Image:
    """Decode ``path`` completely now: Pillow decodes lazily, and a truncated file should fail
    here with its name rather than later inside a resize."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise ImageFileError(f"image file {path} not found") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageFileError(
            f"image file {path} is not a readable image ({type(exc).__name__})"
        ) from None


def square_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """``image`` resized to ``size`` x ``size`` (bicubic; unchanged at that size already)."""
    square = image.resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(square, dtype=np.uint8).copy()).permute(2, 0, 1)


def sample_tensor(image: Image.Image, size: int | None) -> torch.Tensor:
    """``uint8 [3, H, W]``: squared to ``size`` (:func:`square_tensor`), or at its native size
    when ``size`` is ``None`` (for a backbone that resizes each image itself)."""
    if size is not None:
        return square_tensor(image, size)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
