"""Real photographs as backgrounds of the synthetic benchmark, at a contrast that keeps every object
visible.

The photos are the two that scikit-learn ships as package data (the files ``load_sample_images``
reads: a Chinese temple and a flower, 640 x 427), so no download and no extra dependency is
needed. They are decoded with Pillow straight from the package folder: importing
``sklearn.datasets`` would cost seconds in every process (and every DataLoader worker).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from crystalkit.data.images import open_rgb

GREY = 128
#: the photo's deviation from mid-grey is scaled by this, so every background pixel lies within
#: ``128 +- 32`` per channel: at most 56 (Euclidean) from grey, under half the distance from grey
#: to any palette colour (the nearest, green, is 127 away); objects stay the nearest colour to
#: themselves and a pixel's colour still says whether it belongs to an object
PHOTO_CONTRAST = 0.25


def photo_files() -> list[Path]:
    """scikit-learn's sample photos, in the order ``load_sample_images`` gives them."""
    spec = importlib.util.find_spec("sklearn")
    folder = Path(spec.origin).parent / "datasets" / "images" if spec and spec.origin else None
    files = sorted(folder.glob("*.jpg")) if folder is not None else []
    if not files:
        raise ValueError(
            "background photo: scikit-learn's sample photos (sklearn/datasets/images/*.jpg) were "
            "not found; install scikit-learn or use background: noise"
        )
    return files


@functools.cache
def photos() -> tuple[torch.Tensor, ...]:
    """The decoded photos, ``float32`` ``[3, H, W]`` in 0-255 (decoded once per process)."""
    return tuple(
        torch.from_numpy(np.array(open_rgb(path), dtype=np.float32)).permute(2, 0, 1).contiguous()
        for path in photo_files()
    )


def photo_background(size: int, rng: np.random.Generator) -> torch.Tensor:
    """A random square crop of a random photo (side between half and all of the photo's height),
    resized to ``size`` x ``size`` and flattened towards mid-grey by :data:`PHOTO_CONTRAST`."""
    images = photos()
    photo = images[rng.integers(len(images))]
    height, width = photo.shape[1:]
    side = int(rng.integers(min(height, width) // 2, min(height, width) + 1))
    y = int(rng.integers(0, height - side + 1))
    x = int(rng.integers(0, width - side + 1))
    crop = photo[None, :, y : y + side, x : x + side]
    resized = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)[0]
    return resized.clamp_(0, 255).sub_(GREY).mul_(PHOTO_CONTRAST).add_(GREY)
