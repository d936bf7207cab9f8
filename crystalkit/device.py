"""The torch device a recipe names, checked against this machine before anything runs."""

from __future__ import annotations

import torch

from crystalkit.errors import UsageError


def check_device(name: str, where: str = "device") -> None:
    """A one-line :class:`UsageError` (``where`` names the key) unless this machine has the torch
    device ``name``: torch would only fail at the first tensor moved there, deep in a traceback.
    Device kinds torch offers no availability check for are left to torch."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(
            f"{where}: {name!r} is not a torch device (expected e.g. cpu, cuda, cuda:1 or mps)"
        ) from None
    backend = getattr(torch, device.type, None) if device.type != "cpu" else None
    is_available = getattr(backend, "is_available", None)
    device_count = getattr(backend, "device_count", None)
    if is_available is None or device_count is None:
        return
    if not is_available():
        raise UsageError(
            f"{where}: {name!r} is not available on this machine (torch finds no "
            f"{device.type} device); use device=cpu or a device it has"
        )
    count = device_count()
    if device.index is not None and device.index >= count:
        has = f"{device.type}:0" + (f" to {device.type}:{count - 1}" if count > 1 else "")
        raise UsageError(
            f"{where}: {name!r} is not available on this machine: it has {count} {device.type} "
            f"device{'s' if count != 1 else ''} ({has})"
        )
