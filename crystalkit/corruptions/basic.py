"""Built-in corruptions.

A corruption is a callable ``(images, generator) -> images`` over a float batch ``[B, 3, H, W]``
in ``[0, 1]``; all randomness comes from ``generator`` so a step's corruption is reproducible.
Parameters are the constructor's typed keyword arguments (validated from the recipe). One that
reads the evidence boxes (``uses_boxes``) also gets them (:mod:`crystalkit.corruptions.contract`).

Every built-in draws its random parameters per sample (``sample(shape, generator)``, plus the
boxes for one that reads them) and applies them with batched tensor ops (``apply(images,
params)``); ``__call__`` is the two in sequence. The split lets tests and analysis code see which
parameters a batch received. Random numbers are drawn on ``generator.device`` and moved to the
images' device, so a CPU generator works with CUDA images (pass a generator on the images' device
to avoid the copy).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F

from crystalkit.components import build_component
from crystalkit.corruptions.boxes import Boxes, evidence_size
from crystalkit.corruptions.contract import Corruption, apply_corruption, reads_boxes
from crystalkit.errors import UsageError
from crystalkit.registries import CORRUPTIONS

Tensor = torch.Tensor
Params = dict[str, Tensor]
Shape = torch.Size | tuple[int, ...]
Generator = torch.Generator


# -- helpers ----------------------------------------------------------------------------------


def _rand(generator: torch.Generator, *shape: int) -> Tensor:
    """Uniform [0, 1) float32 numbers from ``generator``, on the generator's device."""
    return torch.rand(shape, generator=generator, device=generator.device)


def _uniform(generator: torch.Generator, n: int, low: float, high: float) -> Tensor:
    return low + (high - low) * _rand(generator, n)


def _check_batch(images: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(
            f"expected a float image batch [B, 3, H, W], got {tuple(images.shape)} {images.dtype}"
        )


def work_dtype(images: Tensor) -> torch.dtype:
    """Compute in float32 for half types (CPU convolutions and HSV maths need it)."""
    return images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32


def _check_range(name: str, value: tuple[float, float], low: float, high: float = math.inf) -> None:
    lo, hi = value
    if not (low <= lo <= hi <= high):
        bound = f"[{low}, {high}]" if math.isfinite(high) else f"[{low}, inf)"
        raise ValueError(
            f"{name} must be an ordered pair (low <= high) within {bound}, got {value}"
        )


def per_image_boxes(what: str, boxes: Boxes | None, batch: int) -> Boxes:
    """``boxes`` if they hold one list per image of the batch, else a ``ValueError``."""
    if boxes is None or len(boxes) != batch:
        raise ValueError(
            f"{what} needs one list of evidence boxes per image ({batch}), got "
            f"{'none' if boxes is None else len(boxes)}"
        )
    return boxes


def check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be within [0, 1], got {value}")


class Sampled:
    """Base for built-ins: ``__call__`` = ``apply(images, sample(images.shape, generator))``
    (``sample(images.shape, generator, boxes)`` for one that reads the boxes)."""

    #: whether ``sample`` takes the evidence boxes (the contract's declaration)
    uses_boxes: bool = False

    def sample(self, shape: torch.Size | tuple[int, ...], generator: torch.Generator) -> Params:
        raise NotImplementedError

    def apply(self, images: Tensor, params: Params) -> Tensor:
        raise NotImplementedError

    def __call__(
        self, images: Tensor, generator: torch.Generator, boxes: Boxes | None = None
    ) -> Tensor:
        _check_batch(images)
        if self.uses_boxes:
            drawn = self.sample(images.shape, generator, boxes)
        else:
            drawn = self.sample(images.shape, generator)
        return self.apply(images, {k: v.to(images.device) for k, v in drawn.items()})

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


# -- corruptions ------------------------------------------------------------------------------


@CORRUPTIONS.register("none")
class NoCorruption:
    """Identity: the corrupted path sees the intact image (control)."""

    def __init__(self) -> None:
        pass

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return images

    def __repr__(self) -> str:
        return "NoCorruption()"


@CORRUPTIONS.register("blur")
class GaussianBlur(Sampled):
    """Gaussian blur, radius drawn per sample (the reference corruption), scaled to image size.

    Args:
        radius: range of the blur's standard deviation, drawn uniformly per sample: in pixels of a
            ``reference_size`` image (reference: 2-5 at 448 px), or with ``relative_to:
            evidence`` in multiples of the sample's evidence size.
        reference_size: image side the radius is given for; smaller images get a proportionally
            smaller blur, so the corruption removes the same share of detail at any resolution.
        relative_to: image: ``radius`` is in pixels of a ``reference_size`` image; evidence: in
            multiples of the evidence size (the mean side of the sample's evidence boxes, averaged
            over its boxes), so the blur removes the same share of what the question needs
            whatever the objects' size (reads the boxes; ``reference_size`` is unused).
    """

    def __init__(
        self,
        radius: tuple[float, float] = (2.0, 5.0),
        reference_size: int = 448,
        relative_to: Literal["image", "evidence"] = "image",
    ) -> None:
        _check_range("radius", radius, 0.0)
        if reference_size < 1:
            raise ValueError(f"reference_size must be >= 1, got {reference_size}")
        if relative_to not in ("image", "evidence"):
            raise ValueError(f"relative_to must be 'image' or 'evidence', got {relative_to!r}")
        self.radius = (float(radius[0]), float(radius[1]))
        self.reference_size = reference_size
        self.relative_to = relative_to

    @property
    def uses_boxes(self) -> bool:
        """Only a blur relative to the evidence reads the boxes."""
        return self.relative_to == "evidence"

    def sample(self, shape: Shape, generator: Generator, boxes: Boxes | None = None) -> Params:
        batch, _, height, _ = shape
        radius = _uniform(generator, batch, *self.radius)
        if self.relative_to == "image":
            return {"sigma": radius * (height / self.reference_size)}
        boxes = per_image_boxes("blur relative_to: evidence", boxes, batch)
        sizes = torch.tensor([evidence_size(b) for b in boxes], device=radius.device)
        return {"sigma": radius * sizes}

    @staticmethod
    def kernel_radius(sigma: Tensor, height: int, width: int) -> Tensor:
        """Per-sample half kernel size: ``ceil(3 sigma)``, at most ``min(H, W) - 1`` (reflect)."""
        return torch.ceil(3.0 * sigma).clamp(0, min(height, width) - 1).long()

    def apply(self, images: Tensor, params: Params) -> Tensor:
        batch, channels, height, width = images.shape
        dtype = work_dtype(images)
        sigma = params["sigma"].to(dtype)
        half = self.kernel_radius(sigma, height, width)
        pad = int(half.max()) if batch else 0
        if pad == 0:
            return images
        offsets = torch.arange(-pad, pad + 1, device=images.device, dtype=dtype)
        safe_sigma = sigma.clamp_min(1e-6)[:, None]
        kernel = torch.exp(-0.5 * (offsets / safe_sigma) ** 2)
        kernel = kernel * (offsets.abs() <= half[:, None])  # truncate each sample at its own radius
        kernel = kernel / kernel.sum(dim=1, keepdim=True)
        kernel = kernel.repeat_interleave(channels, dim=0)  # [B*C, 2*pad+1]
        groups = batch * channels
        x = images.to(dtype).reshape(1, groups, height, width)
        x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        x = F.conv2d(x, kernel.view(groups, 1, 1, -1), groups=groups)
        x = F.conv2d(x, kernel.view(groups, 1, -1, 1), groups=groups)
        return x.reshape(images.shape).clamp(0.0, 1.0).to(images.dtype)


@CORRUPTIONS.register("erase")
class RandomErase(Sampled):
    """Random erasing: one box per sample (10-30 % of the area) filled with a constant.

    Args:
        area: range of the box's share of the image area, drawn per sample.
        aspect: range of the box's height / width ratio, drawn log-uniformly per sample.
        value: fill value in [0, 1] (0 = black).
    """

    def __init__(
        self,
        area: tuple[float, float] = (0.1, 0.3),
        aspect: tuple[float, float] = (0.3, 3.3),
        value: float = 0.0,
    ) -> None:
        _check_range("area", area, 0.0, 1.0)
        if not 0.0 < aspect[0] <= aspect[1]:
            raise ValueError(f"aspect must be an ordered pair of positive ratios, got {aspect}")
        check_unit("value", value)
        self.area = (float(area[0]), float(area[1]))
        self.aspect = (float(aspect[0]), float(aspect[1]))
        self.value = float(value)

    def sample(self, shape: torch.Size | tuple[int, ...], generator: torch.Generator) -> Params:
        batch, _, height, width = shape
        area = _uniform(generator, batch, *self.area) * (height * width)
        log_aspect = _uniform(generator, batch, math.log(self.aspect[0]), math.log(self.aspect[1]))
        aspect = torch.exp(log_aspect)  # box height / width
        box_h = torch.round(torch.sqrt(area * aspect)).clamp(1, height)
        box_w = torch.round(torch.sqrt(area / aspect)).clamp(1, width)
        top = torch.floor(_rand(generator, batch) * (height - box_h + 1)).clamp(max=height - box_h)
        left = torch.floor(_rand(generator, batch) * (width - box_w + 1)).clamp(max=width - box_w)
        return {"top": top, "left": left, "height": box_h, "width": box_w}

    def apply(self, images: Tensor, params: Params) -> Tensor:
        _, _, height, width = images.shape
        rows = torch.arange(height, device=images.device)[None, :]
        cols = torch.arange(width, device=images.device)[None, :]
        top, left = params["top"][:, None], params["left"][:, None]
        in_rows = (rows >= top) & (rows < top + params["height"][:, None])  # [B, H]
        in_cols = (cols >= left) & (cols < left + params["width"][:, None])  # [B, W]
        box = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # [B, 1, H, W]
        return images.masked_fill(box, self.value)


def _patch_grid(images_shape: torch.Size | tuple[int, ...], patch: int) -> tuple[int, int]:
    _, _, height, width = images_shape
    return -(-height // patch), -(-width // patch)


@CORRUPTIONS.register("mask")
class PatchMask(Sampled):
    """Patch masking: a random fraction of a patch grid filled with a constant, per sample.

    Args:
        patch_size: side of the square patches in pixels.
        fraction: share of the patches masked in each sample, in [0, 1].
        value: fill value of masked patches in [0, 1] (0.5 = mid grey).
    """

    def __init__(self, patch_size: int = 8, fraction: float = 0.5, value: float = 0.5) -> None:
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        check_unit("fraction", fraction)
        check_unit("value", value)
        self.patch_size = patch_size
        self.fraction = float(fraction)
        self.value = float(value)

    def sample(self, shape: torch.Size | tuple[int, ...], generator: torch.Generator) -> Params:
        rows, cols = _patch_grid(shape, self.patch_size)
        n_patches = rows * cols
        count = round(self.fraction * n_patches)
        ranks = _rand(generator, shape[0], n_patches).argsort(dim=1).argsort(dim=1)
        return {"masked": (ranks < count).view(shape[0], rows, cols)}

    def apply(self, images: Tensor, params: Params) -> Tensor:
        _, _, height, width = images.shape
        grid = params["masked"]
        pixels = grid.repeat_interleave(self.patch_size, dim=1).repeat_interleave(
            self.patch_size, dim=2
        )
        return images.masked_fill(pixels[:, None, :height, :width], self.value)


@CORRUPTIONS.register("patch_shuffle")
class PatchShuffle(Sampled):
    """Patch shuffling: an independent random permutation of the patch grid per sample.

    Args:
        patch_size: side of the square patches in pixels; must divide the image height and width.
    """

    def __init__(self, patch_size: int = 8) -> None:
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        self.patch_size = patch_size

    def _grid(self, shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
        _, _, height, width = shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"patch_shuffle needs image height and width divisible by patch_size="
                f"{self.patch_size}, got {height}x{width}"
            )
        return height // self.patch_size, width // self.patch_size

    def sample(self, shape: torch.Size | tuple[int, ...], generator: torch.Generator) -> Params:
        rows, cols = self._grid(shape)
        return {"permutation": _rand(generator, shape[0], rows * cols).argsort(dim=1)}

    def apply(self, images: Tensor, params: Params) -> Tensor:
        batch, channels = images.shape[:2]
        rows, cols = self._grid(images.shape)
        p = self.patch_size
        patches = images.reshape(batch, channels, rows, p, cols, p).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(batch, rows * cols, channels, p, p)
        index = params["permutation"][:, :, None, None, None].expand_as(patches)
        shuffled = patches.gather(1, index).reshape(batch, rows, cols, channels, p, p)
        return shuffled.permute(0, 3, 1, 4, 2, 5).reshape(images.shape)


@CORRUPTIONS.register("noise")
class GaussianNoise(Sampled):
    """Additive Gaussian noise, standard deviation drawn per sample, clamped to [0, 1].

    Args:
        std: range of the noise's standard deviation (pixel values in [0, 1]), drawn per sample.
    """

    def __init__(self, std: tuple[float, float] = (0.1, 0.3)) -> None:
        _check_range("std", std, 0.0)
        self.std = (float(std[0]), float(std[1]))

    def sample(self, shape: torch.Size | tuple[int, ...], generator: torch.Generator) -> Params:
        std = _uniform(generator, shape[0], *self.std)
        noise = torch.randn(tuple(shape), generator=generator, device=generator.device)
        return {"std": std, "noise": noise}

    def apply(self, images: Tensor, params: Params) -> Tensor:
        dtype = work_dtype(images)
        noise = params["noise"].to(dtype) * params["std"].to(dtype)[:, None, None, None]
        return (images.to(dtype) + noise).clamp(0.0, 1.0).to(images.dtype)


# -- colour -----------------------------------------------------------------------------------


def _grayscale(images: Tensor) -> Tensor:
    """ITU-R 601-2 luma, as torchvision: ``[..., 3, H, W] -> [..., 1, H, W]``."""
    r, g, b = images.unbind(dim=-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def _blend(images: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    return (factor * images + (1.0 - factor) * other).clamp(0.0, 1.0)


def rgb_to_hsv(images: Tensor) -> Tensor:
    """Batched RGB -> HSV on ``[..., 3, H, W]`` in [0, 1] (hue in [0, 1))."""
    r, g, b = images.unbind(dim=-3)
    maxc = images.amax(dim=-3)
    minc = images.amin(dim=-3)
    equal = maxc == minc
    chroma = maxc - minc
    ones = torch.ones_like(maxc)
    saturation = chroma / torch.where(equal, ones, maxc)
    divisor = torch.where(equal, ones, chroma)
    rc, gc, bc = (maxc - r) / divisor, (maxc - g) / divisor, (maxc - b) / divisor
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    is_b = ~is_r & ~is_g
    hue = is_r * (bc - gc) + is_g * (2.0 + rc - bc) + is_b * (4.0 + gc - rc)
    hue = torch.fmod(hue / 6.0 + 1.0, 1.0)
    return torch.stack((hue, saturation, maxc), dim=-3)


def hsv_to_rgb(images: Tensor) -> Tensor:
    """Batched HSV -> RGB on ``[..., 3, H, W]``, inverse of :func:`rgb_to_hsv`."""
    h, s, v = images.unbind(dim=-3)
    sector = torch.floor(h * 6.0)
    f = h * 6.0 - sector
    sector = sector.long() % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    # for each sector, which of (v, q, p, t) each output channel takes
    table = torch.stack(
        (
            torch.stack((v, q, p, p, t, v), dim=-3),
            torch.stack((t, v, v, q, p, p), dim=-3),
            torch.stack((p, p, t, v, v, q), dim=-3),
        ),
        dim=-4,
    )  # [..., 3, 6, H, W]
    index = sector.unsqueeze(-3).unsqueeze(-3).expand(*table.shape[:-3], 1, *table.shape[-2:])
    return table.gather(-3, index).squeeze(-3)


@CORRUPTIONS.register("color_jitter")
class ColorJitter(Sampled):
    """Colour jitter (torchvision semantics): brightness, contrast, saturation, hue in random order.

    Args:
        brightness: factor drawn from [1 - brightness, 1 + brightness] per sample; 0 disables.
        contrast: factor drawn from [1 - contrast, 1 + contrast] per sample; 0 disables.
        saturation: factor drawn from [1 - saturation, 1 + saturation] per sample; 0 disables.
        hue: hue shift drawn from [-hue, hue] (a fraction of the colour wheel, at most 0.5).
    """

    OPS = ("brightness", "contrast", "saturation", "hue")

    def __init__(
        self,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.4,
        hue: float = 0.1,
    ) -> None:
        for name, value in (
            ("brightness", brightness),
            ("contrast", contrast),
            ("saturation", saturation),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"hue must be within [0, 0.5], got {hue}")
        self.brightness = float(brightness)
        self.contrast = float(contrast)
        self.saturation = float(saturation)
        self.hue = float(hue)

    def sample(self, shape: torch.Size | tuple[int, ...], generator: torch.Generator) -> Params:
        batch = shape[0]
        order = _rand(generator, batch, len(self.OPS)).argsort(dim=1)
        params = {"order": order}
        for name in ("brightness", "contrast", "saturation"):
            strength = getattr(self, name)
            params[name] = _uniform(generator, batch, max(0.0, 1.0 - strength), 1.0 + strength)
        params["hue"] = _uniform(generator, batch, -self.hue, self.hue)
        return params

    def _op(self, index: int, x: Tensor, factor: Tensor) -> Tensor:
        f = factor[:, None, None, None]
        if index == 0:
            return _blend(x, torch.zeros_like(x), f)
        if index == 1:
            mean = _grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
            return _blend(x, mean, f)
        if index == 2:
            return _blend(x, _grayscale(x), f)
        hsv = rgb_to_hsv(x)
        hue = torch.remainder(hsv[:, 0] + factor[:, None, None], 1.0)
        return hsv_to_rgb(torch.stack((hue, hsv[:, 1], hsv[:, 2]), dim=1))

    def apply(self, images: Tensor, params: Params) -> Tensor:
        dtype = work_dtype(images)
        x = images.to(dtype)
        enabled = [getattr(self, name) > 0 for name in self.OPS]  # strength 0 skips the op
        for step in range(len(self.OPS)):
            which = params["order"][:, step]
            out = x.clone()
            for index, name in enumerate(self.OPS):
                selected = which == index
                if not enabled[index] or not bool(selected.any()):
                    continue
                out[selected] = self._op(index, x[selected], params[name][selected].to(dtype))
            x = out
        return x.to(images.dtype)


# -- composition ------------------------------------------------------------------------------


@CORRUPTIONS.register("compose")
class Compose:
    """Several corruptions applied in order, each step given as {name, **params}.

    Args:
        steps: the corruptions in order, each a mapping ``{name: ..., **params}`` like a recipe's
            ``corruption:`` section; every step draws from the same generator.
    """

    def __init__(self, steps: list[dict[str, Any]] = []) -> None:  # noqa: B006 (never mutated)
        built = []
        for i, step in enumerate(steps):
            try:
                built.append(build_corruption(step))
            except UsageError as exc:
                raise UsageError(f"steps[{i}]: {exc}") from None
        self.steps = built
        names = [_spec_name(step) for step in steps]
        #: (what, source) of each third-party step, whose errors are a PluginError naming it
        self._third_party = [CORRUPTIONS.third_party(name) if name else None for name in names]
        #: the composition reads the boxes when a step does; it hands them to those steps only
        self.uses_boxes = any(reads_boxes(step) for step in built)

    def __call__(
        self, images: Tensor, generator: torch.Generator, boxes: Boxes | None = None
    ) -> Tensor:
        for step, blamed in zip(self.steps, self._third_party, strict=True):
            images = apply_corruption(step, images, generator, boxes, blamed)
        return images

    def __repr__(self) -> str:
        return f"Compose({self.steps!r})"


def _spec_name(spec: Any) -> str | None:
    if isinstance(spec, str):
        return spec
    name = spec.get("name") if isinstance(spec, Mapping) else getattr(spec, "name", None)
    return name if isinstance(name, str) else None


def build_corruption(spec: Mapping[str, Any] | str | Any) -> Corruption:
    """Build a corruption from its recipe form ``{name: ..., **params}`` (or just a name).

    Also accepts a :class:`~crystalkit.config.schema.ComponentSpec`. Unknown names and invalid
    parameters raise :class:`~crystalkit.errors.UsageError` with a one-line message.
    """
    if isinstance(spec, str):
        name, params = spec, {}
    elif isinstance(spec, Mapping):
        params = dict(spec)
        name = params.pop("name", None)
        if not isinstance(name, str) or not name:
            raise UsageError(f"corruption spec needs a 'name' (one of {', '.join(CORRUPTIONS)})")
    elif isinstance(getattr(spec, "name", None), str) and hasattr(spec, "params"):
        name, params = spec.name, dict(spec.params)
    else:
        raise UsageError(f"corruption spec must be a name or a mapping, got {spec!r}")
    return build_component(CORRUPTIONS, name, params)
