"""A run evaluates from its directory alone: commands build only the components they use, and a
missing one is named together with what to install (recorded in RUN_DIR/components.json)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from test_component_paths import CORRUPTION, OBJECTIVE

from crystalkit.errors import UsageError
from crystalkit.evaluation.saved import evaluate_run_dir
from crystalkit.provenance import code_hash, install_hint
from crystalkit.runs.files import SOURCES_FILE
from crystalkit.training.trainer import train


@pytest.fixture
def plugged_run(tiny_recipe, tmp_path: Path) -> tuple[Path, Path, Path]:
    """A finished crystal run whose corruption and objective come from files, and the files."""
    corruption, objective = tmp_path / "darken.py", tmp_path / "l2.py"
    corruption.write_text(CORRUPTION)
    objective.write_text(OBJECTIVE)
    recipe = tiny_recipe(
        "method=crystal",
        "latents.schedule.k=2",
        "train.steps=2",
        "eval.max_samples=8",
        f"corruption={{name: '{corruption}:Darken'}}",
        "~objectives",
        f"objectives={{l2: {{name: '{objective}:LogitL2'}}}}",
    )
    return train(recipe).run_dir, corruption, objective


def test_components_and_their_sources_are_recorded(plugged_run):
    run_dir, corruption, objective = plugged_run
    sources = json.loads((run_dir / SOURCES_FILE).read_text())
    assert sources["corruption"] == {
        "kind": "corruptions",
        "name": f"{corruption}:Darken",
        "source": f"file {corruption}",
        "code": code_hash(corruption),
    }
    assert sources["objectives.l2"]["source"] == f"file {objective}"
    assert sources["backbone"]["source"] == "built-in" and sources["backbone"]["version"]


def test_a_run_evaluates_after_its_training_only_plugins_are_gone(plugged_run):
    run_dir, corruption, objective = plugged_run
    before = evaluate_run_dir(run_dir, "test", max_samples=8)
    corruption.unlink()
    objective.unlink()
    after = evaluate_run_dir(run_dir, "test", max_samples=8)
    assert after.predictions == before.predictions
    with pytest.raises(UsageError) as info:  # this one needs the corruption
        evaluate_run_dir(run_dir, "test", max_samples=8, corrupted=True)
    message = str(info.value)
    assert f"restore the file {corruption}" in message and "\n" not in message


@pytest.mark.parametrize(
    ("record", "hint"),
    [
        (
            {"source": "plugin package crystalkit-quantize 0.2.0", "version": "0.2.0"},
            "pip install crystalkit-quantize==0.2.0",
        ),
        (
            {"source": "plugin package q 0.2.0", "version": "0.2.0", "origin": "/src/q"},
            "(this run was trained with 0.2.0): pip install /src/q",
        ),
        (
            {"source": "plugin package q 1.0", "origin": "git+https://x.org/q.git@ab12"},
            "pip install git+https://x.org/q.git@ab12",
        ),
        ({"source": "file /x/q.py"}, "restore the file /x/q.py"),
        ({"source": "module lab.corruptions"}, "make the module lab.corruptions importable"),
    ],
)
def test_install_hints(record: dict[str, str], hint: str):
    assert hint in install_hint(record)


def test_eval_and_resume_warn_when_a_plugins_code_changed(tiny_recipe, tmp_path: Path):
    """Editing a file plugin after training: evaluating the run and resuming it each warn once,
    naming the component and both hashes; the unchanged code warns about nothing."""
    from crystalkit.errors import ProvenanceWarning

    corruption = tmp_path / "darken.py"
    corruption.write_text(CORRUPTION)
    recipe = tiny_recipe(
        "method=crystal",
        "latents.schedule.k=2",
        "train.steps=3",
        "eval.max_samples=8",
        f"corruption={{name: '{corruption}:Darken'}}",
    )
    run_dir = train(recipe, stop_after=2).run_dir
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProvenanceWarning)  # unchanged: nothing to say
        evaluate_run_dir(run_dir, "test", max_samples=8)
    before = code_hash(corruption)
    corruption.write_text(CORRUPTION + "\n# tuned\n")
    with pytest.warns(ProvenanceWarning) as caught:
        evaluate_run_dir(run_dir, "test", max_samples=8)
    (message,) = [str(w.message) for w in caught if w.category is ProvenanceWarning]
    assert f"corruption: corruption '{corruption}:Darken' (file {corruption}) changed" in message
    assert f"code {before} -> {code_hash(corruption)}" in message
    with pytest.warns(ProvenanceWarning, match="changed since the run was trained"):
        train(recipe, resume=True)
