"""The corruption contract, checked wherever crystalkit meets a corruption it did not write.

A **corruption** ``(images, generator) -> images`` takes a float batch ``[B, 3, H, W]`` in
``[0, 1]`` and returns a tensor of the same shape, dtype and device, finite and within ``[0, 1]``;
it leaves its input unchanged and draws all randomness from ``generator`` (the same seed gives the
same output).

A corruption that breaks it rarely fails where it is wrong: one returning one channel fails deep
in batch assembly, one that ignores its generator makes runs unreproducible without failing at
all. So the recipe loader runs :func:`check_corruption` on every corruption a recipe names (on
tiny inputs, :mod:`crystalkit.config.contracts`), and every training step checks a third-party
corruption's output (:func:`call_corruption`). Plugin authors run the same checks, and
property-based ones, from :mod:`crystalkit.testing`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

from crystalkit.errors import ContractError, PluginError, call_plugin, defined_at, one_line

_KEEP = "a corruption must keep shape, dtype and device"


@runtime_checkable
class Corruption(Protocol):
    """``(images [B, 3, H, W] in [0, 1], generator) -> images`` of the same shape, dtype, device."""

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor: ...


def _shape(tensor: torch.Tensor) -> str:
    return f"[{', '.join(str(s) for s in tensor.shape)}]"


def _number(value: float) -> str:
    return f"{value:.4g}"


def dummy_images(
    batch: int = 2, height: int = 16, width: int = 16, seed: int = 0, dtype=torch.float32
) -> torch.Tensor:
    """A float batch ``[batch, 3, height, width]`` in ``[0, 1]`` on the CPU, with some pixels at
    exactly 0 and 1."""
    images = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))
    flat = images.view(-1)
    flat[:: max(1, flat.numel() // 7)] = 0.0
    flat[3 :: max(1, flat.numel() // 5)] = 1.0
    return images.to(dtype)


def output_breach(images: torch.Tensor, out: Any) -> str | None:
    """Why ``out`` is not a valid corruption of ``images`` (one line), or ``None``: it must be a
    tensor of the images' shape, dtype and device, finite and within [0, 1]."""
    if not isinstance(out, torch.Tensor):
        return f"returned {type(out).__name__}, not a tensor; a corruption returns the image batch"
    if out.shape != images.shape:
        return f"returned shape {_shape(out)} for images {_shape(images)}; {_KEEP}"
    if out.dtype != images.dtype:
        return f"returned dtype {out.dtype} for images of dtype {images.dtype}; {_KEEP}"
    if out.device != images.device:
        return f"returned a tensor on {out.device} for images on {images.device}; {_KEEP}"
    if out.numel() == 0:
        return None
    if not bool(torch.isfinite(out).all()):
        return "returned non-finite values (NaN or inf); a corruption must return values in [0, 1]"
    low, high = float(out.min()), float(out.max())
    if low < 0.0 or high > 1.0:
        return (
            f"returned values in [{_number(low)}, {_number(high)}] for images in [0, 1]; a "
            "corruption must return values within [0, 1] (clamp them)"
        )
    return None


def check_corruption(
    corruption: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    images: torch.Tensor | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Call ``corruption`` on ``images`` (default: :func:`dummy_images`, ``[2, 3, 16, 16]``) with a
    generator seeded ``seed`` and check its contract; returns the corrupted batch.

    Raises :class:`ContractError` if it raises, returns something else than a tensor of the same
    shape, dtype and device, returns values outside [0, 1] (or not finite), modifies its input in
    place, or returns something else when called again with a fresh generator of the same seed.
    """
    if not callable(corruption):
        raise ContractError(
            f"is a {type(corruption).__name__}, not callable; a corruption is called with the "
            "images and a generator and returns the corrupted images (define __call__)"
        )
    images = dummy_images() if images is None else images
    original = images.clone()
    described = f"images {_shape(images)} {str(images.dtype).removeprefix('torch.')}"

    def call() -> Any:
        generator = torch.Generator(device=images.device).manual_seed(seed)
        try:
            return corruption(images, generator)
        except Exception as exc:
            raise ContractError(
                f"raised {type(exc).__name__}: {one_line(exc)} (on {described}, seed {seed})"
            ) from exc

    out = call()
    breach = output_breach(images, out)
    if breach:
        raise ContractError(f"{breach} (on {described}, seed {seed})")
    if not torch.equal(images, original):
        raise ContractError(
            f"modified its input images in place (on {described}); a corruption must leave its "
            "input unchanged and return a new tensor"
        )
    first = out.detach().clone()
    again = call()
    if output_breach(images, again) or not torch.allclose(first, again, rtol=0.0, atol=1e-6):
        raise ContractError(
            f"returned different images for two generators seeded {seed} (on {described}); a "
            "corruption must draw all its randomness from the generator it is given"
        )
    return out


def call_corruption(
    corruption: Corruption, images: torch.Tensor, generator: torch.Generator, what: str, source: str
) -> torch.Tensor:
    """Call a third-party corruption: an exception it raises, or a result of another shape, dtype
    or device than ``images``, or with values outside [0, 1], becomes a one-line
    :class:`~crystalkit.errors.PluginError` naming ``what`` (``"corruption 'NAME'"``), its
    ``source`` and the place in its code. Every training step runs these checks (they cost one
    pass over the batch); the recipe loader's :func:`check_corruption` also checks determinism
    and that the input is left unchanged, on a tiny batch."""
    out = call_plugin(what, source, corruption, images, generator)
    breach = output_breach(images, out)
    if breach is not None:
        where = defined_at(corruption)
        raise PluginError(f"{what} ({source}) {breach}{f' (defined at {where})' if where else ''}")
    return out
