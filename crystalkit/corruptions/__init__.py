"""Image corruptions for the corrupted path (registry: ``CORRUPTIONS``)."""

from crystalkit.corruptions.basic import Corruption, build_corruption

__all__ = ["Corruption", "build_corruption"]
