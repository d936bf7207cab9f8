"""Entry-point plugins, end to end: two real distributions are installed into a temporary folder and
real ``python -m crystalkit`` processes see them (or, for the broken one, warn and carry on)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_process import finish
from cli_process import start as start_cli

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
INSTALL_BUDGET_S = 15.0

TINY_BACKBONE = '''
class TinyBackbone:
    """A stand-in backbone."""

    def __init__(self, width: int = 8):
        self.width = width
'''


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding ``crystalkit-demo-plugin`` and ``crystalkit-broken-plugin``, installed."""
    work = tmp_path_factory.mktemp("plugins")
    sources = []
    for name in ("plugin_good", "plugin_broken"):
        # build from a copy: setuptools writes build/ and *.egg-info next to the sources
        sources.append(shutil.copytree(FIXTURES / name, work / "src" / name))
    target = work / "site"
    begin = time.perf_counter()
    subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
            "--no-deps", "--no-build-isolation", "--no-index", "--target", str(target),
            *map(str, sources),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )  # fmt: skip
    elapsed = time.perf_counter() - begin
    assert elapsed < INSTALL_BUDGET_S, f"installing the plugin fixtures took {elapsed:.1f}s"
    assert (target / "crystalkit_demo_plugin" / "invert.py").is_file()
    assert (target / "crystalkit_broken_plugin" / "broken.py").is_file()
    return target


def start(*args: str, site: Path, disable: bool = False) -> subprocess.Popen:
    """Start ``python -m crystalkit ARGS`` with ``site`` on the path."""
    env = {"PYTHONPATH": str(site)}
    if disable:
        env["CRYSTALKIT_DISABLE_PLUGINS"] = "1"
    return start_cli(*args, env=env)


def rows(stdout: str) -> dict[str, list[str]]:
    """Table rows of ``crystalkit list`` keyed by name: name -> [source, description]."""
    out = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) == 3:
            out[cells[0]] = cells[1:]
    return out


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A recipe whose backbone comes from a file, so the command loads the dataset registry (and
    its plugins) but not the heavy built-in backbone."""
    folder = tmp_path_factory.mktemp("recipe")
    backbone = folder / "tiny_backbone.py"
    backbone.write_text(TINY_BACKBONE)
    recipe = folder / "plugged.yaml"
    recipe.write_text(f"backbone: {{name: '{backbone}:TinyBackbone', width: 4}}\n")
    (folder / "breach.yaml").write_text("inherit: plugged.yaml\ncorruption: {name: demo_gray}\n")
    return recipe


@pytest.fixture(scope="module")
def runs(site: Path, recipe_file: Path) -> dict[str, subprocess.CompletedProcess]:
    """The commands under test, started together (each one spends seconds importing torch)."""
    processes = {
        "list": start("list", "corruptions", site=site),
        "disabled": start("list", "corruptions", site=site, disable=True),
        "recipe": start("recipe", "validate", str(recipe_file), site=site),
        "one": start("list", "corruption", "demo_posterize", site=site),
        "breach": start("recipe", "validate", str(recipe_file.parent / "breach.yaml"), site=site),
    }
    return {name: finish(process) for name, process in processes.items()}


def test_plugins_are_listed_with_description_and_distribution(runs):
    listed = runs["list"]
    assert listed.returncode == 0, listed.stderr
    table = rows(listed.stdout)
    assert table["demo_invert"] == [
        "plugin package crystalkit-demo-plugin 0.1.0",
        "Demo plugin: invert every pixel (1 - x).",
    ]  # a module entry point that registers with the decorator
    assert table["demo_posterize"] == [
        "plugin package crystalkit-demo-plugin 0.1.0",
        "Demo plugin: quantise each channel to a few levels.",
    ]  # an object entry point, registered under the entry point's name
    assert table["none"][0] == "built-in"


def test_broken_plugin_is_one_warning_line_and_the_rest_still_works(runs):
    listed = runs["list"]
    assert listed.returncode == 0
    mentions = [line for line in listed.stderr.splitlines() if "crystalkit_broken_plugin" in line]
    assert len(mentions) == 1, listed.stderr
    warning = mentions[0]
    assert warning.startswith("warning: ")
    assert "'demo_broken'" in warning
    assert "crystalkit-broken-plugin" in warning
    assert "ImportError" in warning and "definitely_not_installed" in warning
    assert "CRYSTALKIT_DISABLE_PLUGINS=1" in warning
    assert "Traceback" not in listed.stderr
    assert "demo_broken" not in rows(listed.stdout)
    assert {"demo_invert", "demo_posterize", "none"} <= set(rows(listed.stdout))


def test_disabling_plugins_hides_all_of_them(runs):
    result = runs["disabled"]
    assert result.returncode == 0, result.stderr
    from crystalkit.registries import CORRUPTIONS  # built-ins only: plugins load in subprocesses

    assert set(rows(result.stdout)) == {
        e.name for e in CORRUPTIONS.entries() if e.source == "builtin"
    }
    assert "demo_" not in result.stdout
    assert "warning" not in result.stderr


def test_recipe_commands_are_unaffected_by_the_broken_plugin(runs, recipe_file: Path):
    result = runs["recipe"]
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"ok {recipe_file} (plugged)"
    # each of the broken distribution's entry points the recipe looks up is skipped with one
    # warning (datasets and corruptions: the recipe resolves a dataset and a corruption)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2, result.stderr
    assert "'demo_broken_dataset'" in warnings[0] and "crystalkit.datasets" in warnings[0]
    assert "'demo_broken'" in warnings[1] and "crystalkit.corruptions" in warnings[1]
    assert "error" not in result.stderr


def test_one_plugin_component_shows_its_package_and_parameters(runs):
    result = runs["one"]
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "corruption demo_posterize (plugin package crystalkit-demo-plugin 0.1.0)" in text
    assert "levels │ int │ 4" in text
    assert "grey levels per channel (2 = black and white)." in text


def test_a_contract_breach_is_one_line_naming_the_plugin(runs):
    result = runs["breach"]
    assert result.returncode == 3, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    line = lines[0]
    assert "corruption.name" in line or "corruption" in line
    assert "'demo_gray'" in line and "crystalkit-demo-plugin" in line
    assert "[2, 1, " in line  # the shape it returned
