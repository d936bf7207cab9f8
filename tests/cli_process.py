"""Run the CLI in-process (:func:`invoke`) or as a real subprocess (:func:`start`, started early
and collected later, so several commands can pay their torch import in parallel)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from crystalkit.cli import app

ROOT = Path(__file__).resolve().parents[1]
_UNSET = ("CRYSTALKIT_DISABLE_PLUGINS", "FORCE_COLOR", "PY_COLORS", "PYTHONPATH")


def start(
    *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT, module: str = "crystalkit"
) -> subprocess.Popen:
    """Start ``python -m MODULE ARGS`` (the CLI by default) in ``cwd`` with a clean environment
    plus ``env``; wide columns keep table rows whole."""
    environ = {k: v for k, v in os.environ.items() if k not in _UNSET}
    environ["COLUMNS"] = "250"
    environ.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
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


def invoke(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output
    if result.exception is not None:  # only the deliberate exit, never a crash
        assert isinstance(result.exception, SystemExit), result.exception
    return result


def stderr_of(result) -> str:
    try:
        return result.stderr
    except ValueError:  # older click: stderr mixed into output
        return result.output


def assert_one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = stderr_of(result).strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]
