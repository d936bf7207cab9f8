"""docs/plugins.md, followed to the letter: its code blocks are written out as files, the plugin
package is built and installed with pip, and the page's commands behave as the page says (the
package's own tests pass, its parameters are listed, a grid plans it, a run trained with it
evaluates once it is uninstalled, and a command that needs it names the package)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_process import finish, start
from conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "plugins.md"
BLOCK = re.compile(r'^```\w+ title="(?P<path>[^"]+)"\n(?P<code>.*?)^```$', re.MULTILINE | re.DOTALL)


def page_files() -> dict[str, str]:
    return {m["path"]: m["code"] for m in BLOCK.finditer(PAGE.read_text(encoding="utf-8"))}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The page's files in a project folder beside the shipped recipes, the package installed
    into ``site/`` (a pip ``--target``: removing it from the path is uninstalling)."""
    folder = tmp_path_factory.mktemp("tutorial")
    shutil.copytree(ROOT / "recipes", folder / "recipes")
    for path, code in page_files().items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(code, encoding="utf-8")
    subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
            "--no-deps", "--no-build-isolation", "--no-index", "--target", str(folder / "site"),
            str(folder / "crystalkit-quantize"),
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )  # fmt: skip
    return folder


def test_the_page_holds_the_whole_package():
    assert set(page_files()) == {
        "crystalkit-quantize/pyproject.toml",
        "crystalkit-quantize/src/crystalkit_quantize/__init__.py",
        "crystalkit-quantize/src/crystalkit_quantize/quantize.py",
        "crystalkit-quantize/tests/test_quantize.py",
        "recipes/crystal_quantize.yaml",
        "ablations/quantize.yaml",
    }


def test_the_tutorial_end_to_end(project: Path):
    site = {"PYTHONPATH": str(project / "site")}
    steps = {  # started together: each pays its torch import in parallel
        "list": start("list", "corruption", "quantize", env=site, cwd=project),
        "tests": start(
            "-q", "-p", "no:cacheprovider", "crystalkit-quantize/tests",
            env=site, cwd=project, module="pytest",
        ),
        "plan": start("ablate", "--grid", "ablations/quantize.yaml", "--dry-run", env=site, cwd=project),
        "train": start(
            "train", "recipes/crystal_quantize.yaml", *TINY,
            "train.steps=2", "eval.max_samples=8", "train.num_threads=1",
            env=site, cwd=project,
        ),
    }  # fmt: skip
    done = {name: finish(process, timeout=300) for name, process in steps.items()}

    listed = done["list"]
    assert listed.returncode == 0, listed.stderr
    text = " ".join(listed.stdout.split())
    assert "corruption quantize (plugin package crystalkit-quantize 0.1.0)" in text
    assert "levels │ tuple[int, int] │ [2, 6]" in text and "dither │ bool │ false" in text
    assert "range of grey levels per channel, drawn uniformly per sample" in text

    assert done["tests"].returncode == 0, done["tests"].stdout + done["tests"].stderr
    assert "2 passed" in done["tests"].stdout

    plan = done["plan"]
    assert plan.returncode == 0, plan.stderr
    assert "9 cells" in plan.stdout and plan.stdout.count('"quantize"') == 6

    trained = done["train"]
    assert trained.returncode == 0, trained.stderr
    run = project / "runs" / "crystal_quantize"
    assert "plugin package crystalkit-quantize 0.1.0" in (run / "components.json").read_text()

    # uninstalled: the package is off the path
    evaluated = finish(start("eval", "runs/crystal_quantize", "--max-samples", "8", cwd=project))
    assert evaluated.returncode == 0, evaluated.stderr
    assert "test accuracy" in evaluated.stdout
    corrupted = finish(
        start("eval", "runs/crystal_quantize", "--corrupted", "--max-samples", "8", cwd=project)
    )
    assert corrupted.returncode == 2, corrupted.stderr
    (line,) = corrupted.stderr.strip().splitlines()
    assert line.startswith("error: ") and "this run was trained with 0.1.0" in line
    # pip recorded where the package came from (direct_url.json): the hint reinstalls from there
    assert line.endswith(f"pip install {project / 'crystalkit-quantize'}")
