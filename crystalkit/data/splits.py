"""The splits every built-in dataset offers, and the lookup that names them when one is missing."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from crystalkit.errors import UsageError, did_you_mean

SPLITS: tuple[str, ...] = ("train", "val", "test")

T = TypeVar("T")


def named_split(dataset: str, splits: Mapping[str, T], name: str) -> T:
    """``splits[name]``; otherwise one line naming ``dataset``, the closest split name and the
    valid ones (a recipe's or the CLI's typo, not a crash)."""
    if name not in splits:
        raise UsageError(
            f"{dataset} has no split {name!r}{did_you_mean(name, SPLITS)}; "
            f"valid splits: {', '.join(SPLITS)}"
        )
    return splits[name]
