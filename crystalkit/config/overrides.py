"""Command-line overrides: ``key.sub=value`` sets, ``~key.sub`` removes (restores the default).

Values are parsed as YAML scalars/flow collections (``lr=3e-4``, ``tasks=[colour,shape]``,
``grad_clip=null``), then validated with the rest of the recipe, so an override can never smuggle in
a value that the same key in a file would reject. A mapping set over a mapping is merged into it
key by key, as ``inherit`` merges files (the loader passes the merge): ``train={steps: 5}`` keeps
``train.lr``. To replace a section whole, remove it first: ``~train 'train={steps: 5}'``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from crystalkit.errors import RecipeError
from crystalkit.io import load_yaml, yaml_problem

_SEGMENT = r"[A-Za-z_][A-Za-z0-9_\-]*|\d+"
_KEY_RE = re.compile(rf"^(?:{_SEGMENT})(?:\.(?:{_SEGMENT}))*$")


@dataclass(frozen=True)
class Override:
    """One parsed override. ``value`` is ignored when ``delete`` is set."""

    path: tuple[str, ...]
    value: Any = None
    delete: bool = False

    @property
    def key(self) -> str:
        return ".".join(self.path)


def parse_override(text: str) -> Override:
    """Parse ``a.b=value`` or ``~a.b``."""
    if text.startswith("~"):
        key, value, delete = text[1:], None, True
        if "=" in key:
            raise RecipeError(f"override {text!r}: '~KEY' removes a key and takes no '=VALUE'")
    else:
        key, sep, raw = text.partition("=")
        if not sep:
            raise RecipeError(f"override {text!r}: expected KEY=VALUE (e.g. train.lr=3e-4) or ~KEY")
        delete = False
        try:
            value = load_yaml(raw) if raw.strip() else None
        except Exception as exc:  # PyYAML also raises ValueError, KeyError, ... (e.g. 2020-13-45)
            problem = getattr(exc, "problem", None) or yaml_problem(exc)
            raise RecipeError(f"override {text!r}: value is not valid YAML ({problem})") from None
    key = key.strip()
    if not _KEY_RE.match(key):
        raise RecipeError(
            f"override {text!r}: key {key!r} is not a dotted path like 'train.lr' or 'objectives.0.weight'"
        )
    return Override(tuple(key.split(".")), value, delete)


#: how a mapping value combines with the mapping it is set over: ``merge(old, new) -> value``
Merge = Callable[[dict, dict], dict]


def apply_override(tree: dict[str, Any], override: Override, merge: Merge | None = None) -> None:
    """Apply ``override`` to a nested dict/list tree in place, creating missing dicts. With
    ``merge``, a mapping set where a mapping is becomes ``merge(old, new)``."""
    node: Any = tree
    for depth, segment in enumerate(override.path[:-1]):
        node = _child(node, segment, override, depth, create=not override.delete)
        if node is None:  # deleting below a key that is not there: nothing to do
            return
    last = override.path[-1]

    def combined(old: Any) -> Any:
        if merge is not None and isinstance(old, dict) and isinstance(override.value, dict):
            return merge(old, override.value)
        return override.value

    if isinstance(node, list):
        index = _index(node, last, override, len(override.path) - 1)
        if override.delete:
            del node[index]
        else:
            node[index] = combined(node[index])
    elif isinstance(node, dict):
        if override.delete:
            node.pop(last, None)
        else:
            node[last] = combined(node.get(last))
    else:
        _not_container(node, override, len(override.path) - 1)


def _child(node: Any, segment: str, override: Override, depth: int, create: bool) -> Any:
    if isinstance(node, list):
        return node[_index(node, segment, override, depth)]
    if not isinstance(node, dict):
        _not_container(node, override, depth)
    if segment not in node or node[segment] is None:
        if not create:
            return None
        node[segment] = {}
    return node[segment]


def _index(node: list, segment: str, override: Override, depth: int) -> int:
    """A list position: a number, or the ``name`` of a mapping in the list (``stages.crystal``)."""
    where = ".".join(override.path[:depth]) or "<root>"
    if not segment.isdigit():
        names = [item.get("name") for item in node if isinstance(item, dict)]
        if segment in names:
            return names.index(segment)
        hint = f" or one of the names {', '.join(map(str, names))}" if any(names) else ""
        raise RecipeError(
            f"override {override.key!r}: {where} is a list; use an index{hint}, not {segment!r}"
        )
    index = int(segment)
    if index >= len(node):
        raise RecipeError(
            f"override {override.key!r}: index {index} is out of range for {where} (length {len(node)})"
        )
    return index


def _not_container(node: Any, override: Override, depth: int) -> None:
    where = ".".join(override.path[:depth])
    raise RecipeError(
        f"override {override.key!r}: {where} is {node!r}, not a mapping, so it has no key "
        f"{override.path[depth]!r}"
    )
