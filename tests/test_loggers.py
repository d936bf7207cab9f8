"""Metric loggers: TensorBoard event files and W&B offline runs hold the very scalars of
``metrics.jsonl`` (read back with TensorBoard's own reader and from the W&B run file), a resumed
run continues them without duplicates, third-party loggers plug in, and a run without a terminal
prints plain progress lines."""

from __future__ import annotations

import io
import json
import math
import struct
import sys
import time
from pathlib import Path

import pytest
import yaml
from cli_process import assert_one_error_line, invoke
from conftest import ROOT, TINY
from rich.console import Console

from crystalkit.ablation.grid import load_grid
from crystalkit.ablation.runner import cell_dir, run_local
from crystalkit.config.loader import load_recipe
from crystalkit.errors import PluginError, UsageError
from crystalkit.evaluation.saved import evaluate_run_dir
from crystalkit.registries import LOGGERS
from crystalkit.runs.files import WANDB_ID_FILE
from crystalkit.training import trainer
from crystalkit.training.loggers import hyperparameters, scalars
from crystalkit.training.metrics import MetricsLog

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")

from tensorboard.backend.event_processing.event_accumulator import (
    EventAccumulator,
)
from tensorboard.plugins.hparams import plugin_data_pb2
from wandb.proto import wandb_internal_pb2


def _no_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No W&B credentials, so the W&B logger must choose offline mode itself: nothing is sent."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")  # no Sentry reports either


@pytest.fixture(autouse=True)
def _offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_credentials(tmp_path, monkeypatch)


def _recipe(tmp_path: Path, *overrides: str):
    return load_recipe(
        ROOT / "recipes" / "crystal_scratch.yaml",
        [*TINY, f"output_dir={tmp_path / 'runs'}", "train.log_every=1", *overrides],
    )


def _tensorboard(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    return events.Reload()


def _wandb_records(path: Path):
    """The records of a W&B run file (LevelDB log format: 32 KiB blocks of checksummed chunks)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if left < 7 or (length == 0 and kind == 0):  # block padding
            position += left
            continue
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _finished_records(path: Path, timeout: float = 60.0) -> list[wandb_internal_pb2.Record]:
    """The run file's records once it holds the exit record: W&B's service process writes the
    file's last block after ``finish()`` has returned."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(_wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"{path}: no exit record after {timeout} s"
        time.sleep(0.1)


def _wandb_runs(run_dir: Path) -> list[tuple[wandb_internal_pb2.RunRecord, dict[int, dict]]]:
    """Each offline run folder's run record and history (step -> decoded values), oldest first."""
    runs = []
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        (file,) = folder.glob("run-*.wandb")
        records = _finished_records(file)
        run, history = None, {}
        for record in records:
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = record.run
            elif kind == "history":
                row = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
                history[row["_step"]] = row
        runs.append((run, history))
    return runs


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7)  # event files store float32


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """A 4-step CrystaL run with latents, evaluated at step 2, logging to both backends."""
    tmp_path = tmp_path_factory.mktemp("logged")
    with pytest.MonkeyPatch.context() as patch:
        _no_credentials(tmp_path, patch)
        recipe = _recipe(
            tmp_path,
            "train.steps=4",
            "train.eval_every=2",
            "eval.max_samples=8",
            "train.loggers=[tensorboard, {name: wandb, project: tests, tags: [tiny]}]",
        )
        run_dir = trainer.train(recipe, log_group="grid-a").run_dir
    return run_dir, MetricsLog(run_dir / "metrics.jsonl").read()


def test_tensorboard_holds_the_jsonl_scalars_hparams_and_figures(logged):
    run_dir, records = logged
    events = _tensorboard(run_dir)
    evals = [r for r in records if "split" in r]
    assert [r["split"] for r in evals] == ["val", "test"]  # the premise: both kinds of record
    expected: dict[str, dict[int, float]] = {}
    for record in records:
        for key, value in scalars(record).items():
            expected.setdefault(key, {})[record["step"]] = value
    assert "val/per_category/colour" in expected and "weight/kl" in expected
    assert (
        expected["val/per_bucket_samples/0.5-5%"] == {2: 8.0}
        and "val/per_bucket/0.5-5%" in expected
    )
    assert set(events.Tags()["scalars"]) == set(expected)
    for key, by_step in expected.items():
        logged_values = {e.step: e.value for e in events.Scalars(key)}
        assert logged_values.keys() == by_step.keys(), key
        assert all(_close(logged_values[s], v) for s, v in by_step.items()), key
    assert [e.step for e in events.Images("inspect/val")] == [2]
    assert [e.step for e in events.Images("inspect/test")] == [4]
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert start.hparams["train.lr"].number_value == recipe["train"]["lr"]
    assert start.hparams["corruption.name"].string_value == recipe["corruption"]["name"]


def test_wandb_offline_run_holds_the_jsonl_scalars_config_group_and_figures(logged):
    run_dir, records = logged
    ((run, history),) = _wandb_runs(run_dir)  # no credentials: offline, one run
    assert run.run_id == (run_dir / WANDB_ID_FILE).read_text().strip()
    assert (run.project, run.run_group, list(run.tags)) == ("tests", "grid-a", ["tiny"])
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["train"]["steps"] == 4 and config["name"] == run_dir.name
    assert sorted(history) == [r["step"] for r in records if "split" not in r]
    for record in records:
        row = history[record["step"]]
        assert row["stage"] == record["stage"]
        for key, value in scalars(record).items():
            assert _close(row[key], value), key
    assert history[2]["inspect/val/_type"] == "image-file"
    assert history[4]["inspect/test/_type"] == "image-file"


def test_resume_continues_the_same_runs_without_duplicates(tmp_path, monkeypatch):
    """A run that logged past its checkpoint and crashed: the resumed run's TensorBoard history
    is the JSONL's (the events after the checkpoint purged) and W&B continues the same run id."""
    recipe = _recipe(
        tmp_path, "method=finetune", "train.steps=6", "train.save_every=2",
        "train.loggers=[tensorboard, wandb]",
    )  # fmt: skip
    save = trainer.save_checkpoint

    def crash_at_4(run_dir, step, *args, **kwargs):
        if step == 4:
            raise KeyboardInterrupt
        return save(run_dir, step, *args, **kwargs)

    monkeypatch.setattr(trainer, "save_checkpoint", crash_at_4)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(recipe)
    run_dir = Path(recipe.output_dir) / recipe.name
    first = _tensorboard(run_dir).Scalars("loss")
    assert [e.step for e in first] == [1, 2, 3, 4]  # the premise: steps 3, 4 logged twice
    monkeypatch.setattr(trainer, "save_checkpoint", save)
    trainer.train(recipe, resume=True)
    records = [r for r in MetricsLog(run_dir / "metrics.jsonl").read() if "split" not in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    resumed = {e.step: e.value for e in _tensorboard(run_dir).Scalars("loss")}
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert all(_close(resumed[r["step"]], r["loss"]) for r in records)
    (run_a, history_a), (run_b, history_b) = _wandb_runs(run_dir)
    assert run_a.run_id == run_b.run_id
    assert (sorted(history_a), sorted(history_b)) == ([1, 2, 3, 4], [3, 4, 5, 6])
    assert all(_close(history_b[r["step"]]["loss"], r["loss"]) for r in records[2:])


def test_loggers_from_the_command_line(tmp_path):
    common = [f"output_dir={tmp_path / 'runs'}", "train.steps=2", "eval.max_samples=4"]
    recipe = ROOT / "recipes" / "direct_finetune.yaml"
    result = invoke("train", recipe, *TINY, *common, "name=a", "--logger", "tensorboard")
    assert result.exit_code == 0, result.output
    assert [e.step for e in _tensorboard(tmp_path / "runs" / "a").Scalars("loss")] == [2]
    result = invoke("train", recipe, *TINY, *common, "name=b", "train.loggers=[wandb]")
    assert result.exit_code == 0, result.output
    ((_, history),) = _wandb_runs(tmp_path / "runs" / "b")
    assert sorted(history) == [2]
    line = assert_one_error_line(invoke("train", recipe, *common, "--logger", "tensorbord"))
    assert "--logger: unknown logger 'tensorbord' (did you mean 'tensorboard'?)" in line
    line = assert_one_error_line(invoke("train", recipe, *common, "train.loggers=[{name: wandb, projekt: x}]"))  # fmt: skip
    assert "train.loggers.0.projekt: unknown key" in line


PLUGIN = """
from crystalkit.training.loggers import MetricLogger

SEEN = []


class Recording(MetricLogger):
    def __init__(self, fail_at: int = 0):
        self.fail_at = fail_at

    def log(self, record):
        if record["step"] == self.fail_at:
            raise RuntimeError("disk full")
        SEEN.append(record)
"""


def test_a_plugin_logger_gets_the_jsonl_records_and_its_errors_name_it(tmp_path):
    plugin = tmp_path / "mylogger.py"
    plugin.write_text(PLUGIN)
    recipe = _recipe(
        tmp_path, "method=finetune", "train.steps=2", f"train.loggers=['{plugin}:Recording']"
    )
    run_dir = trainer.train(recipe).run_dir
    module = sys.modules[LOGGERS.get(f"{plugin}:Recording").__module__]
    assert MetricsLog(run_dir / "metrics.jsonl").read() == module.SEEN
    plugin.rename(tmp_path / "elsewhere.py")  # evaluating the run needs no logger
    assert evaluate_run_dir(run_dir, "test", max_samples=4).num_samples == 4
    plugin.write_text(PLUGIN)
    failing = _recipe(
        tmp_path,
        "name=failing",
        "method=finetune",
        "train.steps=2",
        f"train.loggers=[{{name: '{plugin}:Recording', fail_at: 1}}]",
    )
    with pytest.raises(PluginError, match=r"raised RuntimeError: disk full at .*mylogger.py:13$"):
        trainer.train(failing)


def test_without_a_terminal_progress_is_plain_lines(tmp_path):
    recipe = _recipe(tmp_path, "method=finetune", "train.steps=4", "train.log_every=2")
    text = io.StringIO()
    run_dir = trainer.train(recipe, console=Console(file=text, width=40)).run_dir
    lines = [line for line in text.getvalue().splitlines() if " step " in line]
    assert [line.split(" step ")[1].split()[0] for line in lines] == ["2/4", "4/4"]
    records = [r for r in MetricsLog(run_dir / "metrics.jsonl").read() if "split" not in r]
    for line, record in zip(lines, records, strict=True):
        assert f"loss {record['loss']:.4f} ce {record['loss/ce']:.3f} lr " in line
        assert "samples/s ETA 0:" in line and len(line) > 40  # whole, not cut to the width
    text = io.StringIO()
    terminal = Console(file=text, width=80, force_terminal=True)
    trainer.train(recipe, overwrite=True, console=terminal)
    assert " step 2/4 loss" not in text.getvalue()  # a terminal keeps the live bar


def test_a_grids_cells_share_a_wandb_group_and_log_plain_lines(tmp_path):
    spec = {
        "base": str(ROOT / "recipes" / "direct_finetune.yaml"),
        "overrides": [*TINY, "train.steps=2", "eval.max_samples=4", "train.loggers=[wandb]"],
        "grid": {"train.lr": [0.001, 0.003]},
        "output_dir": "out",
    }
    path = tmp_path / "lr_sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    grid = load_grid(path)
    outcome = run_local(grid, jobs=2, console=Console(file=io.StringIO()))
    assert len(outcome.done) == 2 and not outcome.failed
    for cell in grid.cells():
        ((run, history),) = _wandb_runs(cell_dir(grid, cell))
        assert (run.run_group, run.display_name) == ("lr_sweep", cell.id)
        assert sorted(history) == [2]
        log = (cell_dir(grid, cell) / "train.log").read_text()
        assert f"{cell.id} step 2/2 loss " in log  # the cell's log file gets plain lines


def test_a_missing_logger_package_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails
    recipe = _recipe(tmp_path, "method=finetune", "train.steps=2", "train.loggers=[wandb]")
    with pytest.raises(UsageError, match=r"^logger 'wandb' needs the wandb package: pip install"):
        trainer.train(recipe)
    assert not (tmp_path / "runs" / recipe.name).exists()  # the failed start left nothing


def test_hyperparameters_are_flat_values():
    flat = hyperparameters({"train": {"lr": 0.1, "betas": [0.9, 0.99]}, "eval": {"x": None}})
    assert flat == {"train.lr": 0.1, "train.betas": "[0.9, 0.99]", "eval.x": "null"}
