"""User-facing errors.

Anything a user controls (recipes, grid files, images, checkpoints, CLI arguments) fails with a
:class:`UsageError`: the CLI prints its message as one line and exits with status 2, no traceback.
Messages name the file, the key or row, what was wrong and what was expected.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UsageError(Exception):
    """A mistake in user input, reported as a single line (CLI exit code 2)."""


class RecipeError(UsageError):
    """A recipe (or a CLI override of it) that does not validate."""


class CheckpointError(UsageError):
    """A run directory or checkpoint that cannot be used."""


class DataWarning(UserWarning):
    """Unusable records skipped in a user's data file (the CLI prints one ``warning:`` line)."""


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""
