"""Plugins as installed distributions (a ``*.dist-info`` folder on ``sys.path``, as pip leaves it):
a name claimed twice is an error naming both owners, a plugin that failed to import is reported as
such where its name is looked up, the missing-plugin hint reinstalls from where the package came
from, and a run warns when a component's code changed since it was trained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from crystalkit.config.sources import recorded_entry, resolve_or_explain
from crystalkit.errors import ProvenanceWarning, UsageError
from crystalkit.provenance import code_hash, code_record, install_hint, install_origin
from crystalkit.registry import Registry
from crystalkit.runs.sources import code_changes

GROUP = "crystalkit.test_widgets"


def install(site: Path, dist: str, module: str, code: str, entry_points: dict[str, str],
            direct_url: dict | None = None) -> Path:  # fmt: skip
    """Write ``module.py`` and a ``dist``-0.1.0.dist-info with its entry points into ``site``."""
    (site / f"{module}.py").write_text(code)
    info = site / f"{dist.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
    lines = [f"[{GROUP}]", *(f"{k} = {v}" for k, v in entry_points.items())]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    if direct_url is not None:
        (info / "direct_url.json").write_text(json.dumps(direct_url))
    return site / f"{module}.py"


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    for name in [m for m in sys.modules if m.startswith("widgets_")]:
        del sys.modules[name]


class Builtin:
    """The built-in widget."""


def registry() -> Registry:
    widgets = Registry("widgets", entry_point_group=GROUP)
    widgets.add("blur", Builtin)  # registered as crystalkit's built-ins are, before plugins
    return widgets


def test_a_plugin_claiming_a_builtin_name_fails_that_lookup_naming_both_owners(site: Path):
    install(site, "widgets-a", "widgets_a", "class Blur:\n    pass\n", {"blur": "widgets_a:Blur"})
    install(
        site, "widgets-b", "widgets_b", "class Other:\n    pass\n", {"other": "widgets_b:Other"}
    )
    widgets = registry()
    with pytest.raises(UsageError) as info:
        widgets.get("blur")
    message = str(info.value)
    assert f"module {__name__} ({__name__}:Builtin)" in message
    assert "plugin package widgets-a 0.1.0 (widgets_a:Blur)" in message
    assert widgets.get("other").__name__ == "Other"  # the other names keep working
    assert [e.source for e in widgets.clash("blur")] == ["builtin", "plugin:widgets-a"]


def test_two_plugins_claiming_one_name_is_an_error_not_first_come_first_served(site: Path):
    install(site, "widgets-a", "widgets_a", "class X:\n    pass\n", {"x": "widgets_a:X"})
    install(site, "widgets-b", "widgets_b", "class X:\n    pass\n", {"x": "widgets_b:X"})
    widgets = registry()
    assert "x" in widgets
    with pytest.raises(UsageError, match=r"'x' is claimed twice: by plugin package widgets-"):
        widgets.get("x")
    with pytest.raises(UsageError, match="claimed twice"):  # also where a run names it
        resolve_or_explain(widgets, "x", {}, "run: corruption")


MODULE_CLASH = """
from test_plugin_provenance import WIDGETS

@WIDGETS.register("blur")
class Blur:
    pass
"""

WIDGETS = registry()


def test_a_module_plugin_registering_a_taken_name_is_a_clash_too(site: Path):
    install(site, "widgets-m", "widgets_m", MODULE_CLASH, {"module": "widgets_m"})
    with pytest.raises(
        UsageError, match=r"claimed twice: by module .* and plugin package widgets-m"
    ):
        WIDGETS.get("blur")


def test_a_plugin_that_failed_to_import_is_named_as_such_at_lookup(site: Path):
    broken = install(
        site, "widgets-p", "widgets_p", "import no_such_module\n", {"pixelate": "widgets_p:P"}
    )
    widgets = registry()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = widgets.names()
    assert "pixelate" not in names and any(
        "skipped plugin 'pixelate'" in str(w.message) for w in caught
    )
    with pytest.raises(UsageError) as info:
        widgets.get("pixelate")
    message = str(info.value)
    assert message.startswith("widget 'pixelate' is registered by the plugin package widgets-p")
    assert "failed to import: ModuleNotFoundError: No module named 'no_such_module'" in message
    assert f"at {broken}:1" in message and "unknown" not in message
    with pytest.raises(UsageError, match="failed to import") as info:
        resolve_or_explain(widgets, "pixelate", {"c": {"kind": "widgets", "name": "pixelate",
                                                     "source": "plugin package widgets-p 0.1.0"}},
                           "run: corruption")  # fmt: skip
    assert "pip install" not in str(info.value)


@pytest.mark.parametrize(
    ("direct_url", "origin"),
    [
        ({"url": "file:///src/widgets%20q", "dir_info": {}}, "/src/widgets q"),
        ({"url": "file:///src/q", "dir_info": {"editable": True}}, "-e /src/q"),
        (
            {"url": "https://x.org/q.git", "vcs_info": {"vcs": "git", "commit_id": "ab12"}},
            "git+https://x.org/q.git@ab12",
        ),
        (
            {"url": "https://x.org/q-0.1.0.tar.gz", "archive_info": {}},
            "https://x.org/q-0.1.0.tar.gz",
        ),
        (None, ""),
    ],
)
def test_the_install_hint_reinstalls_from_where_the_package_came(site, direct_url, origin):
    install(
        site, "widgets-q", "widgets_q", "class Q:\n    pass\n", {"q": "widgets_q:Q"}, direct_url
    )
    assert install_origin("widgets-q") == origin
    record = code_record(registry().entry("q"))
    assert record["version"] == "0.1.0" and record.get("origin", "") == origin
    hint = install_hint(record)
    assert hint.endswith(f"pip install {origin or 'widgets-q==0.1.0'}")


def test_a_changed_plugin_file_shows_in_its_hash_and_in_the_runs_check(site: Path):
    module = install(site, "widgets-c", "widgets_c", "class C:\n    pass\n", {"c": "widgets_c:C"})
    widgets = registry()
    sources = {"corruption": {"kind": "widgets", "name": "c", **code_record(widgets.entry("c"))}}
    assert sources["corruption"]["code"] == code_hash(module)
    lookup = {"widgets": widgets}
    assert code_changes(sources, lookup) == []
    module.write_text("class C:\n    scale = 2\n")
    changed = code_changes(sources, lookup)
    assert len(changed) == 1 and changed[0].startswith("corruption: widget 'c' (plugin package")
    assert f"code {sources['corruption']['code']} -> {code_hash(module)}" in changed[0]
    assert recorded_entry(sources, widgets, "c") is sources["corruption"]


def test_the_warning_is_one_line_of_its_own_category(site: Path, tmp_path: Path):
    from crystalkit.runs.sources import warn_code_changes

    module = install(site, "widgets-w", "widgets_w", "class W:\n    pass\n", {"w": "widgets_w:W"})
    widgets = registry()
    sources = {"dataset": {"kind": "widgets", "name": "w", **code_record(widgets.entry("w"))}}
    module.write_text("class W:\n    pass  # edited\n")
    with pytest.warns(ProvenanceWarning) as caught:
        warn_code_changes(tmp_path, sources, {"widgets": widgets})
    assert len(caught) == 1 and "\n" not in str(caught[0].message)


def test_crystalkit_list_shows_a_clash(site: Path):
    install(site, "widgets-z", "widgets_z", "class Blur:\n    pass\n", {"blur": "widgets_z:Blur"})
    entry = site / "crystalkit_clash-0.1.0.dist-info"
    entry.mkdir()
    (entry / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: crystalkit-clash\nVersion: 0.1.0\n"
    )
    (entry / "entry_points.txt").write_text("[crystalkit.corruptions]\nblur = widgets_z:Blur\n")
    listed = subprocess.run(
        [sys.executable, "-m", "crystalkit", "list", "corruptions"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(site), "COLUMNS": "200"},
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.strip().startswith("blur"))
    assert "claimed twice: built-in and plugin package crystalkit-clash 0.1.0" in row
    used = subprocess.run(
        [sys.executable, "-m", "crystalkit", "list", "corruption", "blur"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(site)},
        check=False,
    )
    assert used.returncode == 2 and "is claimed twice" in used.stderr
