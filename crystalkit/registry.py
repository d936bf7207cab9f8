"""A small, generic name -> component registry with lazy built-ins and entry-point plugins.

Names are the API: recipes refer to components by registered name, by ``package.module:attr`` or
by ``path/to/file.py:attr``. Lookups always load the built-in modules and the installed plugins
first, so a component is never "unknown" merely because nothing imported its module yet (the most
common complaint about timm's and mmengine's registries).

Plugins are ``importlib.metadata`` entry points, one group per registry (e.g.
``crystalkit.corruptions``). An entry point may point at a module (which registers its components
with the decorator when imported) or at a single object (registered under the entry point's name).
A plugin that fails to import is reported as a warning naming it; it never breaks unrelated
commands, and a lookup of its name says that it failed to import (not that the name is unknown).
A name claimed twice (a plugin naming a built-in's name, or two plugins one name) is an error where
the name is looked up, naming both owners; the other names keep working. Set
``CRYSTALKIT_DISABLE_PLUGINS=1`` to skip plugin loading altogether.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from crystalkit.errors import UsageError, blame, did_you_mean, is_builtin, one_line

T = TypeVar("T")

DISABLE_PLUGINS_ENV = "CRYSTALKIT_DISABLE_PLUGINS"


class PluginWarning(UserWarning):
    """A third-party plugin could not be loaded; the rest of crystalkit keeps working."""


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered component."""

    name: str
    obj: T
    description: str
    source: str  # "builtin", "plugin:<dist>" or "path"
    version: str = ""  # the plugin distribution's version


_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc|ref):`~?(?:[^`<]*<)?([^`>]+)>?`")


def plain_text(text: str) -> str:
    """reStructuredText inline markup as plain text: ``:class:`~a.B``` -> ``B``, double
    backticks -> single ones (Markdown and terminals read that)."""
    text = _ROLE.sub(lambda m: f"`{m.group(1).rsplit('.', 1)[-1]}`", text)
    return text.replace("``", "`")


def summary(obj: Any) -> str:
    """The first paragraph of ``obj``'s docstring on one line, inline markup made plain."""
    doc = (inspect.getdoc(obj) or "").strip()
    first = doc.split("\n\n", 1)[0]
    return plain_text(" ".join(line.strip() for line in first.splitlines()))


def object_file(obj: Any) -> str | None:
    """The source file defining ``obj`` (``None`` for objects without one)."""
    try:
        return inspect.getsourcefile(obj)
    except TypeError:
        return None


def plugins_disabled() -> bool:
    return os.environ.get(DISABLE_PLUGINS_ENV, "").strip().lower() not in ("", "0", "false", "no")


class Registry(Generic[T]):
    """Maps names to components of one kind (backbones, corruptions, ...).

    Args:
        kind: plural noun used in messages and by ``crystalkit list KIND``.
        builtin_modules: modules imported on first use; they register the built-in components.
        entry_point_group: ``importlib.metadata`` group scanned for third-party plugins.
        factory: the classmethod that builds a component (``create`` for backbones, which load
            weights and assets); by default the registered object itself is called.
    """

    def __init__(
        self,
        kind: str,
        builtin_modules: tuple[str, ...] = (),
        entry_point_group: str = "",
        factory: str | None = None,
    ):
        self.kind = kind
        self.singular = kind.removesuffix("s")
        self.factory = factory
        self.entry_point_group = entry_point_group or f"crystalkit.{kind}"
        self._builtin_modules = builtin_modules
        self._entries: dict[str, Entry[T]] = {}
        #: names claimed by more than one owner, with every claim (the first is in _entries)
        self._clashes: dict[str, list[Entry[T]]] = {}
        #: entry point name -> why that plugin failed to import
        self._failed: dict[str, str] = {}
        self._loaded = False
        self._loading = False

    # -- registration -------------------------------------------------------------------------

    def register(
        self, name: str | None = None, *, description: str | None = None
    ) -> Callable[[T], T]:
        """Decorator: ``@CORRUPTIONS.register("blur")``. The description defaults to the docstring's
        first line, which ``crystalkit list`` prints."""

        def decorator(obj: T) -> T:
            self.add(name or getattr(obj, "__name__", None) or repr(obj), obj, description)
            return obj

        return decorator

    def add(self, name: str, obj: T, description: str | None = None, source: str = "") -> None:
        """Register ``obj`` under ``name``. Registering a different object under a taken name is an
        error; while plugins load it is recorded instead (:meth:`clash`), so that one plugin's
        clash fails only the lookups of that name."""
        if ":" in name:
            raise ValueError(
                f"{self.singular} name {name!r} may not contain ':' (reserved for paths)"
            )
        source = source or self._current_source
        version = self._current_version if source == self._current_source else ""
        entry = Entry(name, obj, description or summary(obj), source, version)
        existing = self._entries.get(name)
        if existing is not None and existing.obj is not obj:
            if source.startswith("plugin:"):
                self._clashes.setdefault(name, [existing]).append(entry)
                return
            raise ValueError(
                f"{self.singular} {name!r} is already registered (by {existing.source or 'builtin'}); "
                "choose another name"
            )
        self._entries[name] = entry

    _current_source = "builtin"
    _current_version = ""

    # -- lookup ---------------------------------------------------------------------------------

    def get(self, name: str) -> T:
        """Resolve a registered name, ``package.module:attr`` or ``path/to/file.py:attr``."""
        if ":" in name and name not in self._entries:
            return resolve_import_path(name, kind=self.singular)
        return self.entry(name).obj

    def unknown_message(self, name: str) -> str:
        valid = ", ".join(self.names()) or "none registered"
        return f"unknown {self.singular} {name!r}" + (
            f"{did_you_mean(name, self.names())}; valid: {valid}"
        )

    def entry(self, name: str) -> Entry[T]:
        """The entry of a registered name, or an ``Entry`` describing an import path."""
        if ":" in name and name not in self._entries:
            obj = resolve_import_path(name, kind=self.singular)
            return Entry(name, obj, summary(obj), "path")
        self._ensure_loaded()
        if name in self._clashes:
            raise UsageError(self.clash_message(name))
        if name not in self._entries and name in self._failed:
            raise UsageError(f"{self.singular} {name!r} {self._failed[name]}")
        try:
            return self._entries[name]
        except KeyError:
            raise UsageError(self.unknown_message(name)) from None

    def import_failure(self, name: str) -> str | None:
        """Why the plugin registering ``name`` failed to import, if it did."""
        self._ensure_loaded()
        return None if name in self._entries else self._failed.get(name)

    def clash(self, name: str) -> list[Entry[T]]:
        """Every claim on ``name`` when more than one owner registered it, else ``[]``."""
        self._ensure_loaded()
        return list(self._clashes.get(name, []))

    def clash_message(self, name: str) -> str:
        owners = self._clashes[name]
        claims = " and ".join(f"{source_text(e)} ({import_path(e.obj)})" for e in owners)
        return (
            f"{self.singular} {name!r} is claimed twice: by {claims}; uninstall one or rename its "
            "entry point, or name the one you mean by its import path"
        )

    def third_party(self, name: str) -> tuple[str, str] | None:
        """``("KIND 'NAME'", source)`` of a component whose code is not crystalkit's (a plugin
        package, a file or module): its errors become a ``PluginError`` naming it. ``None`` for
        a built-in one, whose errors are crystalkit's bugs and keep their traceback."""
        entry = self.entry(name)
        if is_builtin(entry.obj):
            return None
        return f"{self.singular} {name!r}", source_text(entry)

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return name in self._entries

    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        self._ensure_loaded()
        return [self._entries[n] for n in sorted(self._entries)]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"

    # -- loading --------------------------------------------------------------------------------

    def _ensure_loaded(self) -> None:
        if self._loaded or self._loading:
            return
        self._loading = True
        try:
            for module in self._builtin_modules:
                importlib.import_module(module)
            if not plugins_disabled():
                self._load_plugins()
            self._loaded = True
        finally:
            self._loading = False

    def _load_plugins(self) -> None:
        for ep in importlib.metadata.entry_points(group=self.entry_point_group):
            dist = ep.dist.name if ep.dist is not None else "?"
            self._current_source = f"plugin:{dist}"
            self._current_version = ep.dist.version if ep.dist is not None else ""
            try:
                obj = ep.load()
                if not inspect.ismodule(obj):
                    self.add(ep.name, obj)
            except Exception as exc:  # a broken plugin must not break unrelated commands
                where = blame(exc, module=ep.module, fallback=False)
                error = f"{type(exc).__name__}: {one_line(exc)}{f' at {where}' if where else ''}"
                self._failed[ep.name] = (
                    f"is registered by the plugin package {dist} but failed to import: {error}"
                )
                warnings.warn(
                    f"crystalkit: skipped plugin {ep.name!r} = {ep.value!r} from distribution "
                    f"{dist!r} (entry point group {self.entry_point_group!r}): {error}. "
                    f"Set {DISABLE_PLUGINS_ENV}=1 to skip all plugins.",
                    PluginWarning,
                    stacklevel=2,
                )
            finally:
                self._current_source, self._current_version = "builtin", ""


def source_text(entry: Entry[Any]) -> str:
    """``built-in``, ``plugin package DIST VERSION``, ``file PATH`` or ``module NAME``; only
    crystalkit's own code is built-in (a component another module registers with the decorator
    reads ``module NAME``)."""
    if entry.source.startswith("plugin:"):
        dist = entry.source.removeprefix("plugin:")
        return f"plugin package {dist} {entry.version}".rstrip()
    if entry.source == "builtin":
        if is_builtin(entry.obj):
            return "built-in"
        return f"module {getattr(entry.obj, '__module__', None) or type(entry.obj).__module__}"
    target = entry.name.rpartition(":")[0]
    if target.endswith(".py"):
        return f"file {Path(target).expanduser().resolve()}"
    return f"module {target}"


def import_path(obj: Any) -> str:
    """``module:qualname`` of a registered object, the path that names it in a recipe."""
    target = obj if inspect.isfunction(obj) or inspect.isclass(obj) else type(obj)
    return f"{target.__module__}:{target.__qualname__}"


def file_module_name(path: Path) -> str:
    """The module name a ``file.py`` component is imported under: its stem and a digest of its
    absolute path, the same in every process (Python's ``hash`` of a string is not), so names
    derived from it (pickles, logs, import paths in messages) are stable across runs."""
    resolved = str(path.expanduser().resolve())
    stem = re.sub(r"\W", "_", path.stem)
    return f"crystalkit_file_{stem}_{hashlib.sha1(resolved.encode()).hexdigest()[:10]}"


def resolve_import_path(spec: str, kind: str = "component") -> Any:
    """Import ``package.module:attr`` or ``path/to/file.py:attr`` (dotted attrs allowed)."""
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise UsageError(f"{kind} {spec!r}: expected 'package.module:attr' or 'file.py:attr'")
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise UsageError(f"{kind} {spec!r}: file {str(path)!r} does not exist")
        mod_name = file_module_name(path)
        module = sys.modules.get(mod_name)
        if module is None:
            module_spec = importlib.util.spec_from_file_location(mod_name, path)
            if module_spec is None or module_spec.loader is None:
                raise UsageError(f"{kind} {spec!r}: cannot import {str(path)!r}")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[mod_name] = module
            try:
                module_spec.loader.exec_module(module)
            except Exception as exc:
                del sys.modules[mod_name]
                where = blame(exc, root=path)
                raise UsageError(
                    f"{kind} {spec!r}: importing {str(path)!r} failed: {one_line(exc)} "
                    f"({type(exc).__name__} at {where or path})"
                ) from exc
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:  # the user's module may fail in any way while importing
            where = blame(exc, module=target, fallback=False)
            raise UsageError(
                f"{kind} {spec!r}: cannot import module {target!r}: {type(exc).__name__}: "
                f"{one_line(exc)}{f' at {where}' if where else ''}"
            ) from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise UsageError(
                f"{kind} {spec!r}: {target!r} has no attribute {part!r}{did_you_mean(part, names)}"
            )
        obj = getattr(obj, part)
    return obj
