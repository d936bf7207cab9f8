"""Image corruptions for the corrupted path (registry: ``CORRUPTIONS``)."""

from crystalkit.corruptions.basic import build_corruption
from crystalkit.corruptions.contract import Corruption

__all__ = ["Corruption", "build_corruption"]
