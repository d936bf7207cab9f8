"""The corruption contract, checked wherever crystalkit meets a corruption it did not write.

A **corruption** ``(images, generator) -> images`` takes a float batch ``[B, 3, H, W]`` in
``[0, 1]`` and returns a tensor of the same shape, dtype and device, finite and within ``[0, 1]``;
it leaves its input unchanged and draws all randomness from ``generator`` (the same seed gives the
same output).

A corruption that declares ``uses_boxes = True`` (a class attribute, or a property where only some
configurations read them) is called ``corruption(images, generator, boxes)`` instead: ``boxes``
holds one list per image of the question's evidence boxes ``(x0, y0, x1, y1)`` in the pixels of
the images it receives (:mod:`crystalkit.corruptions.boxes`), so that it can remove exactly what
the answer depends on. One that declares nothing is called with two arguments, as always.

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

from crystalkit.corruptions.boxes import Boxes
from crystalkit.errors import ContractError, PluginError, call_plugin, defined_at, one_line

_KEEP = "a corruption must keep shape, dtype and device"


@runtime_checkable
class Corruption(Protocol):
    """``(images [B, 3, H, W] in [0, 1], generator) -> images`` of the same shape, dtype, device."""

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor: ...


def reads_boxes(corruption: object) -> bool:
    """Whether ``corruption`` declares that it reads the evidence boxes (``uses_boxes = True``)."""
    return getattr(corruption, "uses_boxes", False) is True


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


def dummy_boxes(images: torch.Tensor) -> Boxes:
    """Evidence boxes for a batch like :func:`dummy_images`: every image gets a box around its
    centre half, every second one also a box in its top-left corner (two counted objects)."""
    _, _, height, width = images.shape
    centre = (width // 4, height // 4, max(3 * width // 4, width // 4 + 1),
              max(3 * height // 4, height // 4 + 1))  # fmt: skip
    corner = (0, 0, max(width // 4, 1), max(height // 4, 1))
    return [[centre, corner] if i % 2 else [centre] for i in range(images.shape[0])]


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
    corruption: Callable[..., torch.Tensor],
    images: torch.Tensor | None = None,
    seed: int = 0,
    boxes: Boxes | None = None,
) -> torch.Tensor:
    """Call ``corruption`` on ``images`` (default: :func:`dummy_images`, ``[2, 3, 16, 16]``) with a
    generator seeded ``seed`` and check its contract; returns the corrupted batch. A corruption
    that reads boxes also gets ``boxes`` (default: :func:`dummy_boxes`).

    Raises :class:`ContractError` if it declares ``uses_boxes`` as something else than a bool, if
    it raises, returns something else than a tensor of the same shape, dtype and device, returns
    values outside [0, 1] (or not finite), modifies its input in place, or returns something else
    when called again with a fresh generator of the same seed.
    """
    if not callable(corruption):
        raise ContractError(
            f"is a {type(corruption).__name__}, not callable; a corruption is called with the "
            "images and a generator and returns the corrupted images (define __call__)"
        )
    declared = getattr(corruption, "uses_boxes", False)
    if not isinstance(declared, bool):
        raise ContractError(
            f"declares uses_boxes={declared!r}; expected True (it is called with the evidence "
            "boxes as a third argument) or False"
        )
    images = dummy_images() if images is None else images
    original = images.clone()
    described = f"images {_shape(images)} {str(images.dtype).removeprefix('torch.')}"
    extra: tuple[Boxes, ...] = ()
    if declared:
        extra = (dummy_boxes(images) if boxes is None else boxes,)
        described += f", {sum(map(len, extra[0]))} evidence boxes"

    def call() -> Any:
        generator = torch.Generator(device=images.device).manual_seed(seed)
        try:
            return corruption(images, generator, *extra)
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
    corruption: Corruption,
    images: torch.Tensor,
    generator: torch.Generator,
    what: str,
    source: str,
    boxes: Boxes | None = None,
) -> torch.Tensor:
    """Call a third-party corruption (with ``boxes`` when it reads them): an exception it raises,
    or a result of another shape, dtype or device than ``images``, or with values outside [0, 1],
    becomes a one-line :class:`~crystalkit.errors.PluginError` naming ``what`` (``"corruption
    'NAME'"``), its ``source`` and the place in its code. Every training step runs these checks
    (they cost one pass over the batch); the recipe loader's :func:`check_corruption` also checks
    determinism and that the input is left unchanged, on a tiny batch."""
    out = call_plugin(what, source, corruption, *_arguments(corruption, images, generator, boxes))
    breach = output_breach(images, out)
    if breach is not None:
        where = defined_at(corruption)
        raise PluginError(f"{what} ({source}) {breach}{f' (defined at {where})' if where else ''}")
    return out


def apply_corruption(
    corruption: Corruption,
    images: torch.Tensor,
    generator: torch.Generator,
    boxes: Boxes | None = None,
    blame: tuple[str, str] | None = None,
) -> torch.Tensor:
    """Call ``corruption`` as its declaration asks (``boxes`` only when it reads them); with
    ``blame`` (``(what, source)`` of third-party code) through :func:`call_corruption`."""
    if blame is not None:
        return call_corruption(corruption, images, generator, *blame, boxes=boxes)
    return corruption(*_arguments(corruption, images, generator, boxes))


def _arguments(
    corruption: Corruption, images: torch.Tensor, generator: torch.Generator, boxes: Boxes | None
) -> tuple[Any, ...]:
    if not reads_boxes(corruption):
        return images, generator
    if boxes is None:
        raise ValueError(
            f"{type(corruption).__name__} reads the evidence boxes (uses_boxes) and was called "
            "without them"
        )
    return images, generator, boxes
