"""Where a component's code comes from, and which code it is.

A run records, per component, its source (built-in, a plugin package, a file, a module), the
version of the distribution that ships it, for a plugin package where it was installed from (PEP
610's ``direct_url.json``: a local folder, a VCS URL or an archive), and for third-party code a
hash of the code itself: the ``file.py`` of a file component, the ``.py`` files of the top-level
package (or module file) of a plugin package or module component. Editing a plugin in place, or
installing another version, changes the hash; crystalkit's own components record crystalkit's
version (its code is the run's code).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from crystalkit.errors import code_root, is_builtin
from crystalkit.registry import Entry, source_text

#: hex digits of a code hash kept in a record (collisions among one's own plugins: none in practice)
HASH_DIGITS = 16


def code_record(entry: Entry[Any]) -> dict[str, str]:
    """``{source, version, origin?, code?}`` of a registered or resolved component."""
    record = {"source": source_text(entry)}
    dist = entry.source.removeprefix("plugin:") if entry.source.startswith("plugin:") else None
    if is_builtin(entry.obj):
        record["version"] = _version("crystalkit")
        return record
    if dist is not None:
        record["version"] = entry.version or _version(dist)
        origin = install_origin(dist)
        if origin:
            record["origin"] = origin
    root = _code_path(entry)
    if root is not None:
        record["code"] = code_hash(root)
    return record


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _code_path(entry: Entry[Any]) -> Path | None:
    """The file of a ``file.py`` component, else the folder (or file) of its top-level package."""
    if entry.source == "path" and entry.name.rpartition(":")[0].endswith(".py"):
        return Path(entry.name.rpartition(":")[0]).expanduser().resolve()
    module = getattr(entry.obj, "__module__", None) or type(entry.obj).__module__
    return code_root(module) if isinstance(module, str) else None


def code_hash(path: Path) -> str:
    """SHA-256 (first :data:`HASH_DIGITS` hex digits) of a ``.py`` file, or of every ``.py`` file
    under a folder with its relative path (so a renamed or added module changes it too). Files
    are re-read only when their size or modification time changed."""
    files = [path] if path.is_file() else sorted(path.rglob("*.py"))
    stamped = []
    for file in files:
        if "__pycache__" in file.parts:
            continue
        stat = file.stat()
        name = str(file.relative_to(path)) if path.is_dir() else file.name
        stamped.append((str(file), name, stat.st_size, stat.st_mtime_ns))
    return _hash(tuple(stamped))


@functools.lru_cache(maxsize=256)
def _hash(files: tuple[tuple[str, str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for file, name, _, _ in files:
        digest.update(name.encode() + b"\0" + Path(file).read_bytes() + b"\0")
    return digest.hexdigest()[:HASH_DIGITS]


def install_origin(dist: str) -> str:
    """What ``pip install`` takes to reinstall ``dist`` from where it came (its ``direct_url.json``):
    ``-e FOLDER`` for an editable install, a folder, ``git+URL@COMMIT`` or an archive URL; ``""``
    for a package from an index."""
    try:
        text = importlib.metadata.distribution(dist).read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return ""
    try:
        record = json.loads(text) if text else None
    except ValueError:
        return ""
    url = record.get("url") if isinstance(record, dict) else None
    if not isinstance(url, str):
        return ""
    vcs = record.get("vcs_info")
    if isinstance(vcs, dict) and isinstance(vcs.get("vcs"), str):
        commit = vcs.get("commit_id") or vcs.get("requested_revision")
        return f"{vcs['vcs']}+{url}" + (f"@{commit}" if commit else "")
    parsed = urlparse(url)
    if parsed.scheme == "file":
        folder = unquote(parsed.path)
        dir_info = record.get("dir_info")
        editable = isinstance(dir_info, dict) and dir_info.get("editable")
        return f"-e {folder}" if editable else folder
    return url


def install_hint(record: dict[str, str]) -> str:
    """What to do to get a component back, from its record (:func:`code_record`)."""
    source = record.get("source", "")
    if source.startswith("plugin package "):
        dist = source.removeprefix("plugin package ").partition(" ")[0]
        version = record.get("version") or source.removeprefix("plugin package ").partition(" ")[2]
        trained = f" (this run was trained with {version})" if version else ""
        origin = record.get("origin")
        target = origin or (f"{dist}=={version}" if version else dist)
        return f"install the plugin package {dist}{trained}: pip install {target}"
    if source.startswith("file "):
        return f"restore the file {source.removeprefix('file ')}"
    if source.startswith("module "):
        return f"make the module {source.removeprefix('module ')} importable"
    return "reinstall crystalkit"


def code_change(recorded: dict[str, str], current: dict[str, str]) -> str:
    """How a third-party component's code differs from what a run recorded (``""``: it does not,
    or the run recorded no hash)."""
    if recorded.get("source") == "built-in":
        return ""
    changes = []
    if recorded.get("version") and recorded.get("version") != current.get("version"):
        changes.append(f"version {recorded['version']} -> {current.get('version') or '?'}")
    if recorded.get("code") and recorded.get("code") != current.get("code"):
        changes.append(f"code {recorded['code']} -> {current.get('code') or '?'}")
    return ", ".join(changes)
