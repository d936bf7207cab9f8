"""Reading user files with one-line errors, and atomic writes: a crash or Ctrl-C never leaves a
half-written file that a later run would trust."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from crystalkit.errors import UsageError, one_line


def json_problem(exc: BaseException) -> str:
    """Why ``json.loads`` refused a line, in a few words (it also raises ``ValueError`` for
    numbers of thousands of digits and ``RecursionError`` for deep nesting)."""
    if isinstance(exc, json.JSONDecodeError):
        return exc.msg
    if isinstance(exc, RecursionError):
        return "nested too deep"
    return str(exc).split(";")[0]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then ``os.replace`` into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_user_file(path: Path, data: bytes, option: str) -> None:
    """:func:`atomic_write_bytes` to a path the user chose (``option`` names it): a folder or a
    place that cannot be written is one line, not an ``OSError`` traceback."""
    if path.is_dir():
        raise UsageError(f"{option}: {path} is a folder (expected a file path)")
    try:
        atomic_write_bytes(path, data)
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        raise UsageError(
            f"{option}: cannot write {path} ({getattr(exc, 'strerror', None) or exc})"
        ) from None


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def fsync_dir(path: Path) -> None:
    """Persist a rename inside ``path`` (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: most nodes a user's YAML document may expand to, aliases counted at every use: recipes, grids and
#: overrides hold hundreds; an "alias bomb" (anchors nesting anchors) holds billions
MAX_YAML_NODES = 100_000


class _StrictLoader(yaml.SafeLoader):
    """``SafeLoader`` that rejects duplicate keys (YAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [child for pair in node.value for child in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _check_expanded_size(root: yaml.Node) -> None:
    """Refuse a document that refers to itself or expands (aliases copied out) past
    :data:`MAX_YAML_NODES`: every later walk over the loaded data would loop or take hours.
    Iterative and linear in the distinct nodes, so it is itself bounded."""
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            size[key] = min(1 + sum(size[id(c)] for c in _children(node)), MAX_YAML_NODES + 1)
            if size[key] > MAX_YAML_NODES:
                raise yaml.MarkedYAMLError(
                    problem=f"expands to more than {MAX_YAML_NODES:,} values (anchors and "
                    "aliases nested too deep)"
                )
            continue
        if key in size:
            continue
        if key in on_path:
            mark = node.start_mark
            raise yaml.MarkedYAMLError(
                problem="an alias refers to the collection that contains it", problem_mark=mark
            )
        on_path.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in size)


def load_yaml(text: str) -> Any:
    """Parse one YAML document safely: no arbitrary objects, no duplicate keys, no alias bombs or
    self-referring aliases (:func:`_check_expanded_size`). Raises PyYAML's errors (and the odd
    ``ValueError`` of its scalar constructors, e.g. for ``2020-13-45``)."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded_size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path: Path, error: type[UsageError] = UsageError) -> Any:
    """Safely load a user's YAML file (:func:`load_yaml`); I/O and syntax problems become
    one-line ``error`` s naming the file (and line:column where YAML knows it)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder, expected a YAML file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        return load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or one_line(exc) or "invalid YAML"
        raise error(f"{path}{where}: invalid YAML: {problem}") from None
    except Exception as exc:  # PyYAML also raises ValueError, KeyError, ... (e.g. 2020-13-45)
        raise error(f"{path}: invalid YAML: {yaml_problem(exc)}") from None


def yaml_problem(exc: BaseException) -> str:
    """The first line of an unexpected PyYAML exception, with its type."""
    if isinstance(exc, RecursionError):  # PyYAML composes and constructs recursively
        return "nested too deep"
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
