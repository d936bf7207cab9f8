"""``RUN_DIR/components.json``: where each component of a run came from and which code it was
(:mod:`crystalkit.config.sources`, :mod:`crystalkit.provenance`), written when the run starts and
read by every later command: to name what to install when a component is missing, and to warn
when a third-party component's code changed since."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path

from crystalkit.config.schema import Recipe
from crystalkit.config.sources import Sources, record_sources
from crystalkit.errors import ProvenanceWarning, UsageError
from crystalkit.io import atomic_write_json
from crystalkit.provenance import code_change, code_record
from crystalkit.registries import ALL
from crystalkit.registry import Registry
from crystalkit.runs.files import SOURCES_FILE


def write_sources(run_dir: Path, recipe: Recipe) -> None:
    atomic_write_json(run_dir / SOURCES_FILE, record_sources(recipe))


def read_sources(run_dir: Path) -> Sources:
    """The recorded sources (empty for runs made before they were recorded, or unreadable)."""
    try:
        data = json.loads((run_dir / SOURCES_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {  # a hand-edited file keeps its well-formed entries
        key: entry
        for key, entry in data.items()
        if isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())
    }


def code_changes(sources: Sources, registries: Mapping[str, Registry] = ALL) -> list[str]:
    """One line per recorded third-party component whose code differs here from the recorded
    one (its version or its code hash); components missing here are left to the lookup that
    needs them. ``registries``: kind -> registry (default: crystalkit's)."""
    lines = []
    for key, record in sources.items():
        registry = registries.get(record.get("kind", ""))
        name = record.get("name")
        if registry is None or not name or record.get("source") == "built-in":
            continue
        try:
            current = code_record(registry.entry(name))
        except UsageError:
            continue
        change = code_change(record, current)
        if change:
            lines.append(
                f"{key}: {registry.singular} {name!r} ({record.get('source')}) changed since the "
                f"run was trained ({change}); its results may differ from the run's"
            )
    return lines


def warn_code_changes(
    run_dir: Path, sources: Sources, registries: Mapping[str, Registry] = ALL
) -> None:
    """A :class:`~crystalkit.errors.ProvenanceWarning` (one line) per changed component."""
    for line in code_changes(sources, registries):
        warnings.warn(f"{run_dir / SOURCES_FILE}: {line}", ProvenanceWarning, stacklevel=2)
