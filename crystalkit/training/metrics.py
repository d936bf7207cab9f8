"""Metrics as JSON lines, one record per log event, safe to resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from crystalkit.io import atomic_write_text


class MetricsLog:
    """Appends records to ``metrics.jsonl``; flushed per record so a crash loses at most one."""

    def __init__(self, path: Path):
        self.path = path

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (written after the checkpoint a resumed run restarts from),
        and any torn last line, so the resumed log has no duplicates."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):  # a torn or hand-edited line
                continue
            written_at = record.get("step", 0) if isinstance(record, dict) else None
            if isinstance(written_at, int | float) and written_at <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines()]
