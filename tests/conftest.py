"""Shared fixtures: tiny recipes that train in seconds on a few CPU threads.

The suite runs with ``CRYSTALKIT_TEST_THREADS`` torch threads (default: ``OMP_NUM_THREADS``, else
2). Floating-point trajectories differ between thread counts, so no test may depend on where
training lands; run the suite with 1 and with 2 threads before relying on it::

    CRYSTALKIT_TEST_THREADS=1 pytest
    CRYSTALKIT_TEST_THREADS=2 pytest
"""

from __future__ import annotations

import os
from pathlib import Path

# the tests never reach the hub: a hub id must fail at once (huggingface_hub reads this on import)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from crystalkit.config.loader import load_recipe
from crystalkit.config.schema import Recipe

ROOT = Path(__file__).resolve().parents[1]
#: torch threads of the test process and of the runs it trains
THREADS = int(os.environ.get("CRYSTALKIT_TEST_THREADS") or os.environ.get("OMP_NUM_THREADS") or 2)

#: overrides that shrink the default recipe to a model and data set that train in seconds
TINY = [
    "backbone.image_size=32",
    "backbone.encoder_kwargs={channels: [8, 16, 32, 64]}",
    "backbone.hidden_size=32",
    "backbone.num_layers=2",
    "backbone.num_heads=2",
    "backbone.intermediate_size=64",
    "dataset.image_size=32",
    "dataset.object_size=[6, 7]",
    "dataset.num_distractors=[1, 2]",
    "dataset.tasks=[colour, position]",
    "dataset.train_size=256",
    "dataset.val_size=32",
    "dataset.test_size=32",
    "train.steps=8",
    "train.batch_size=8",
    "train.log_every=2",
    "train.eval_every=0",
    "train.save_every=0",
    f"train.num_threads={THREADS}",
    "eval.batch_size=32",
]


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(THREADS)


@pytest.fixture
def tiny_recipe(tmp_path: Path):
    """``tiny_recipe(*overrides)`` -> a validated tiny :class:`Recipe` writing under ``tmp_path``."""

    def make(*overrides: str) -> Recipe:
        return load_recipe(
            ROOT / "recipes" / "direct_finetune.yaml",
            [*TINY, f"output_dir={tmp_path / 'runs'}", *overrides],
        )

    return make
