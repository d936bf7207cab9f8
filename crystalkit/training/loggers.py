"""Where a run's metrics go: ``metrics.jsonl`` (always), TensorBoard, Weights & Biases, plugins.

A logger is a class registered in :data:`~crystalkit.registries.LOGGERS`; its constructor's
keyword arguments are its recipe parameters (``train.loggers: [tensorboard, {name: wandb,
project: my-project}]``), validated when the recipe loads. The trainer builds the loggers on the
main process only, opens them with a :class:`LogRun` and hands every one the same records it
appends to ``metrics.jsonl`` (training records and evaluation records), the inspect figure at each
evaluation of a run with latents, and closes them when the run ends or fails.

A resumed run reopens its loggers with :attr:`LogRun.start_step` set to the checkpoint's step:
each continues its own run (the JSONL file drops the records after that step, TensorBoard purges
them, W&B resumes the same run id), so the resumed history has no duplicates.
"""

from __future__ import annotations

import importlib
import io
import json
import netrc
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from crystalkit.components import build_component
from crystalkit.config.schema import ComponentSpec
from crystalkit.errors import UsageError, call_plugin
from crystalkit.registries import LOGGERS
from crystalkit.runs.files import METRICS_FILE, WANDB_ID_FILE
from crystalkit.training.metrics import MetricsLog


@dataclass(frozen=True)
class LogRun:
    """What a logger needs to know about the run it logs."""

    run_dir: Path
    name: str
    config: dict[str, Any]  # the resolved recipe (hyper-parameters)
    start_step: int = 0  # 0: a fresh run; else the checkpoint a resumed run continues from
    group: str | None = None  # the ablation grid whose cell this run is


class MetricLogger:
    """Base class of loggers: override what the backend supports; the defaults do nothing.

    Records are those of ``metrics.jsonl``: a training record holds ``step``, ``stage``,
    ``loss``, ``loss/TERM``, ``weight/TERM``, ``k``, ``lr``, ``grad_norm`` and ``samples_per_s``;
    an evaluation record holds ``step``, ``stage``, ``split``, ``accuracy``, ``chance``,
    ``num_samples``, ``per_category``, ``per_bucket`` and ``per_bucket_samples`` (mappings: the
    accuracy per category and per area bucket of the evidence, and each bucket's number of
    samples). :func:`scalars` flattens either one."""

    #: whether :meth:`image` does anything (the trainer draws the figure only if one wants it)
    wants_images = False

    def open(self, run: LogRun) -> None:
        """Called once before the first record, on the main process."""

    def log(self, record: dict[str, Any]) -> None:
        """One record of ``metrics.jsonl``."""

    def image(self, step: int, tag: str, png: bytes) -> None:
        """A figure (PNG bytes) at ``step``."""

    def close(self) -> None:
        """Called once when the run ends, fails or is interrupted."""


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A record's numbers under flat, ``/``-separated names: training keys as they are, an
    evaluation record's under its split (``val/accuracy``, ``val/per_category/colour``,
    ``val/per_bucket/<0.5%``)."""
    prefix = f"{record['split']}/" if "split" in record else ""
    flat: dict[str, float] = {}

    def add(key: str, value: Any) -> None:
        if isinstance(value, dict):
            for sub, item in value.items():
                add(f"{key}/{sub or '(none)'}", item)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[key] = float(value)

    for key, value in record.items():
        if key not in ("step", "split"):
            add(prefix + key, value)
    return flat


def hyperparameters(config: dict[str, Any]) -> dict[str, bool | int | float | str]:
    """The resolved recipe as flat ``section.key`` values (lists and nulls as JSON text), the form
    TensorBoard's HParams dashboard takes."""
    flat: dict[str, bool | int | float | str] = {}

    def add(key: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for sub, item in value.items():
                add(f"{key}.{sub}" if key else str(sub), item)
        elif isinstance(value, bool | int | float | str):
            flat[key] = value
        else:
            flat[key] = json.dumps(value)

    add("", config)
    return flat


@LOGGERS.register("jsonl")
class JsonlLogger(MetricLogger):
    """``RUN_DIR/metrics.jsonl``, one JSON record per line; every run writes it, listed or not."""

    def open(self, run: LogRun) -> None:
        self.file = MetricsLog(run.run_dir / METRICS_FILE)
        if run.start_step:
            self.file.truncate_after(run.start_step)

    def log(self, record: dict[str, Any]) -> None:
        self.file.append(record)


@LOGGERS.register("tensorboard")
class TensorBoardLogger(MetricLogger):
    """TensorBoard event files in ``RUN_DIR/DIR``: every scalar of the JSONL, the stage as text,
    the recipe as hyper-parameters (HParams) and the inspect figure (needs ``tensorboard``).

    Args:
        dir: folder of the event files, relative to the run dir (``tensorboard --logdir`` it, or
            the grid's folder to compare cells).
    """

    wants_images = True

    def __init__(self, dir: str = "tensorboard"):
        self.dir = dir

    def open(self, run: LogRun) -> None:
        _require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        folder = run.run_dir / self.dir
        if not run.start_step:
            shutil.rmtree(folder, ignore_errors=True)  # an overwritten run's events are stale
        # purge_step: TensorBoard drops the events a crashed run wrote after its checkpoint
        self.writer = SummaryWriter(
            str(folder), purge_step=run.start_step + 1 if run.start_step else None
        )
        self.stage: str | None = None
        if not run.start_step:
            for summary in hparams(hyperparameters(run.config), {}):
                self.writer.file_writer.add_summary(summary)

    def log(self, record: dict[str, Any]) -> None:
        step = record["step"]
        stage = record.get("stage")
        if isinstance(stage, str) and stage != self.stage:
            self.writer.add_text("stage", stage, step)
            self.stage = stage
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def image(self, step: int, tag: str, png: bytes) -> None:
        import numpy as np
        from PIL import Image

        pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        self.writer.add_image(tag, pixels, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _require(package: str, logger: str) -> None:
    """A logger whose library is not installed is a usage error, named, not a traceback."""
    try:
        importlib.import_module(package)
    except ImportError:
        raise UsageError(
            f"logger {logger!r} needs the {package} package: pip install {package} "
            '(or pip install "crystalkit[loggers]")'
        ) from None


#: the W&B run id of a run dir, kept so that ``--resume`` continues the same W&B run


def wandb_credentials() -> bool:
    """Whether W&B could log in without asking: ``WANDB_API_KEY``, or the netrc entry ``wandb
    login`` writes for the ``WANDB_BASE_URL`` host. Reads no network."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or ""
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


@LOGGERS.register("wandb")
class WandbLogger(MetricLogger):
    """A Weights & Biases run in ``RUN_DIR/wandb``: every scalar of the JSONL and the stage, the
    recipe as its config, the inspect figure; a grid's cells share a group (needs ``wandb``).

    Args:
        project: W&B project (default: ``WANDB_PROJECT``, else `crystalkit`).
        entity: W&B team or user (default: your default entity).
        mode: online, offline or disabled; default: ``WANDB_MODE`` if set, else online when an API
            key is found (``WANDB_API_KEY`` or `wandb login`), else offline (`wandb sync` uploads
            the run later).
        tags: tags of the run (none by default).
    """

    wants_images = True

    def __init__(
        self,
        project: str | None = None,
        entity: str | None = None,
        mode: Literal["online", "offline", "disabled"] | None = None,
        tags: list[str] | None = None,
    ):
        self.project, self.entity, self.mode, self.tags = project, entity, mode, tags or []

    def open(self, run: LogRun) -> None:
        _require("wandb", "wandb")
        import wandb

        id_file = run.run_dir / WANDB_ID_FILE
        if not run.start_step or not id_file.is_file():  # a new W&B run
            shutil.rmtree(run.run_dir / "wandb", ignore_errors=True)  # an overwritten run's files
            id_file.write_text(uuid.uuid4().hex[:16] + "\n", encoding="utf-8")
        mode = (
            self.mode
            or os.environ.get("WANDB_MODE")
            or ("online" if wandb_credentials() else "offline")
        )
        self.run = wandb.init(
            project=self.project or os.environ.get("WANDB_PROJECT") or "crystalkit",
            entity=self.entity,
            name=run.name,
            group=run.group,
            tags=self.tags,
            config=run.config,
            dir=str(run.run_dir),
            id=id_file.read_text(encoding="utf-8").strip(),
            resume="allow",
            mode=mode,
            reinit="create_new",  # an ablation runner may train several cells in one process
        )

    def log(self, record: dict[str, Any]) -> None:
        values: dict[str, Any] = dict(scalars(record))
        if isinstance(record.get("stage"), str):
            values["stage"] = record["stage"]
        self.run.log(values, step=record["step"])

    def image(self, step: int, tag: str, png: bytes) -> None:
        import wandb
        from PIL import Image

        self.run.log({tag: wandb.Image(Image.open(io.BytesIO(png)).convert("RGB"))}, step=step)

    def close(self) -> None:
        self.run.finish()


def named_loggers(names: Sequence[str], option: str = "--logger") -> list[ComponentSpec]:
    """Loggers named on the command line, with their default parameters; an unknown name is one
    line naming ``option`` and the valid names."""
    for name in names:
        try:
            LOGGERS.entry(name)
        except UsageError as exc:
            raise UsageError(f"{option}: {exc}") from None
    return [ComponentSpec(name=name) for name in names]


class Loggers:
    """The run's loggers as one: ``metrics.jsonl`` first, then the recipe's and the command
    line's. A third-party logger's errors become one line naming it
    (:class:`~crystalkit.errors.PluginError`)."""

    def __init__(self, specs: Sequence[ComponentSpec], run: LogRun):
        built = []
        for spec in [ComponentSpec(name="jsonl"), *(s for s in specs if s.name != "jsonl")]:
            logger = build_component(LOGGERS, spec.name, spec.params)
            built.append((logger, LOGGERS.third_party(spec.name)))
        self.loggers: list[tuple[MetricLogger, tuple[str, str] | None]] = []
        try:
            for logger, blame in built:
                _call(blame, logger.open, run)
                self.loggers.append((logger, blame))  # opened: close() closes it
        except BaseException:
            self.close()
            raise
        self.wants_images = any(logger.wants_images for logger, _ in self.loggers)

    def __enter__(self) -> Loggers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log(self, record: dict[str, Any]) -> None:
        for logger, blame in self.loggers:
            _call(blame, logger.log, record)

    def image(self, step: int, tag: str, png: bytes) -> None:
        for logger, blame in self.loggers:
            _call(blame, logger.image, step, tag, png)

    def close(self) -> None:
        """Close every opened logger, even when one fails (the first error is raised)."""
        error: Exception | None = None
        for logger, blame in self.loggers:
            try:
                _call(blame, logger.close)
            except Exception as exc:
                error = error or exc
        self.loggers = []
        if error is not None:
            raise error


def _call(blame: tuple[str, str] | None, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``; for a third-party logger (``blame`` is its name and source), an
    exception becomes a one-line :class:`~crystalkit.errors.PluginError` naming it."""
    if blame is None:
        return fn(*args, **kwargs)
    return call_plugin(*blame, fn, *args, **kwargs)
