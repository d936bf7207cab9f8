"""Component names that are file paths resolve like ``inherit``: against the file naming them.

A relative ``path/to/file.py:attr`` in a recipe resolves against the recipe's folder (in a grid
file, the grid's folder; on the command line, the working directory), and the resolved recipe
stores it absolute, so a run's saved recipe works from any directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

_FILE_NAME = re.compile(r"^(?P<file>.+\.py):(?P<attr>[A-Za-z_][\w.]*)$")


def anchor_name(name: str, base: Path) -> str:
    """A ``path/to/file.py:attr`` name with a relative path made absolute against ``base`` (the
    folder of the file that names it, as ``inherit`` resolves); any other name is unchanged."""
    match = _FILE_NAME.match(name)
    if match is None or Path(match["file"]).expanduser().is_absolute():
        return name
    path = os.path.normpath(base.absolute() / Path(match["file"]).expanduser())
    return f"{path}:{match['attr']}"


def anchor_names(tree: Any, base: Path) -> Any:
    """``tree`` with every component ``name`` (and every ``objectives:`` key that names its
    objective) anchored at ``base``; see :func:`anchor_name`."""
    if isinstance(tree, list):
        return [anchor_names(item, base) for item in tree]
    if not isinstance(tree, dict):
        return tree
    out = {}
    for key, value in tree.items():
        if key == "name" and isinstance(value, str):
            out[key] = anchor_name(value, base)
        elif key == "objectives" and isinstance(value, dict):
            out[key] = {
                k: _named_objective(k, anchor_names(v, base), base) for k, v in value.items()
            }
        else:
            out[key] = anchor_names(value, base)
    return out


def _named_objective(key: Any, spec: Any, base: Path) -> Any:
    """An objective keyed by a relative ``file.py:attr`` gets that name, anchored."""
    if isinstance(key, str) and isinstance(spec, dict) and spec.get("name") is None:
        anchored = anchor_name(key, base)
        if anchored != key:
            return {**spec, "name": anchored}
    return spec
