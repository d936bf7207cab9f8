"""User-facing errors.

Anything a user controls (recipes, grid files, images, checkpoints, CLI arguments) fails with a
:class:`UsageError`: the CLI prints its message as one line and exits with status 2, no traceback.
Messages name the file, the key or row, what was wrong and what was expected.

Code that is not crystalkit's (plugin packages, ``file.py:attr`` and ``module:attr`` components)
fails with a :class:`PluginError` instead: one line naming the component, where it comes from and
the file:line inside its code that raised (CLI exit code 3). Errors raised by crystalkit's own code
are bugs and keep their traceback.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import os
import sys
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class UsageError(Exception):
    """A mistake in user input, reported as a single line (CLI exit code 2)."""

    def __str__(self) -> str:  # one line even where a message quotes a library's several
        return _single_line(super().__str__())


class RecipeError(UsageError):
    """A recipe (or a CLI override of it) that does not validate."""


class CheckpointError(UsageError):
    """A run directory or checkpoint that cannot be used."""


class PluginError(Exception):
    """An error raised by, or a contract broken by, third-party component code (a plugin package,
    a ``file.py:attr`` or ``module:attr`` component), reported as a single line naming the
    component, its source and the place in its code (CLI exit code 3). Not a :class:`UsageError`:
    the fix belongs in the component, not in the recipe."""

    def __str__(self) -> str:
        return _single_line(super().__str__())


class ContractError(PluginError, AssertionError):
    """A component that breaks its contract (a failed assertion in pytest, a plugin error in the
    CLI). The message is one line: what was wrong and what was expected."""


class DataWarning(UserWarning):
    """Unusable records skipped in a user's data file (the CLI prints one ``warning:`` line)."""


class ProvenanceWarning(UserWarning):
    """A component's code differs from the code a run recorded (the CLI prints one ``warning:``
    line): results computed now may not be the run's."""


class PerformanceWarning(UserWarning):
    """A run much slower than it should be, and why (the CLI prints one ``warning:`` line)."""


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (``""`` for none): libraries often put the gist there
    and details below."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""


def _single_line(text: str) -> str:
    """``text`` as it is, or :func:`one_line` when it spans several lines."""
    return one_line(text) if len(text.splitlines()) > 1 else text


def is_builtin(obj: Any) -> bool:
    """Whether ``obj`` (a component class, function or instance) is defined by crystalkit."""
    module = _module_name(obj)
    return module == "crystalkit" or module.startswith("crystalkit.")


def _module_name(obj: Any) -> str:
    name = getattr(obj, "__module__", None)
    if not isinstance(name, str):
        name = type(obj).__module__
    return name


def code_root(module_name: str) -> Path | None:
    """Where a module's distribution keeps its code: the top-level package's folder, or the file of
    a top-level single-file module (a ``file.py`` component is one). ``None`` if unknown."""
    top = module_name.partition(".")[0]
    module = sys.modules.get(top)
    origin, locations = getattr(module, "__file__", None), list(getattr(module, "__path__", []))
    if module is None:
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            spec = None
        if spec is not None:
            origin, locations = spec.origin, list(spec.submodule_search_locations or [])
    if locations:  # a package (also a namespace package, which has no __init__.py)
        return Path(os.path.realpath(locations[0]))
    if origin and os.path.isfile(origin):
        return Path(os.path.realpath(origin))
    return None


def blame(
    exc: BaseException,
    obj: Any = None,
    *,
    module: str | None = None,
    root: str | Path | None = None,
    fallback: bool = True,
) -> str:
    """``path:line`` of the innermost traceback frame of ``exc`` inside the code of ``obj`` (or of
    ``module``, or under the file or folder ``root``): the file of a ``file.py`` component, the
    top-level package of a plugin. Falls back to the innermost frame (``fallback``); a
    ``SyntaxError`` names its own location. ``""`` when no frame qualifies."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}:{exc.lineno}"
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    if root is not None:
        root = Path(os.path.realpath(root))
    else:
        name = module or (_module_name(obj) if obj is not None else None)
        root = code_root(name) if name else None
    if root is not None:
        for frame in reversed(frames):
            path = Path(os.path.realpath(frame.filename))
            if path == root or root in path.parents:
                return f"{frame.filename}:{frame.lineno}"
    return f"{frames[-1].filename}:{frames[-1].lineno}" if fallback else ""


def defined_at(obj: Any) -> str:
    """``path:line`` where ``obj``'s class (or ``obj``, a function or class) is defined, or ``""``."""
    target = obj if inspect.isfunction(obj) or inspect.isclass(obj) else type(obj)
    try:
        return f"{inspect.getsourcefile(target)}:{inspect.getsourcelines(target)[1]}"
    except (OSError, TypeError):
        return ""


def call_plugin(what: str, source: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` for third-party code ``what`` from ``source``: any exception it
    raises becomes a one-line :class:`PluginError` (:func:`plugin_error`)."""
    try:
        return fn(*args, **kwargs)
    except PluginError:
        raise
    except Exception as exc:
        raise plugin_error(what, source, exc, fn) from exc


def plugin_error(what: str, source: str, exc: BaseException, obj: Any = None) -> PluginError:
    """A :class:`PluginError` for ``exc`` raised inside ``what`` (``"corruption 'quantize'"``) from
    ``source`` (``"plugin package NAME VERSION"``, ``"file PATH"``): one line with the exception and
    where in the component's code it was raised."""
    where = blame(exc, obj)
    at = f" at {where}" if where else ""
    message = one_line(exc)
    return PluginError(
        f"{what} ({source}) raised {type(exc).__name__}{': ' + message if message else ''}{at}"
    )
