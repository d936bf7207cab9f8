"""Run ``python -m crystalkit`` as a real subprocess (started early, collected later, so several
commands can pay their torch import in parallel)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_UNSET = ("CRYSTALKIT_DISABLE_PLUGINS", "FORCE_COLOR", "PY_COLORS", "PYTHONPATH")


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start the CLI with a clean environment plus ``env``; wide columns keep table rows whole."""
    environ = {k: v for k, v in os.environ.items() if k not in _UNSET}
    environ["COLUMNS"] = "250"
    environ.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-m", "crystalkit", *args],
        cwd=ROOT,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: float = 120) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
