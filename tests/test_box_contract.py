"""Boxes reach the corruptions that declare them: ``uses_boxes`` is checked like the rest of the
contract, a declaring plugin gets each sample's evidence in training and in ``eval --corrupted``
(resized with the image under ``corrupt_at: model_input``), one that declares nothing is called
with two arguments as before, and data without boxes is one clear line."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import strategies as st
from test_evidence import touched_box

from crystalkit.crystal.method import Method
from crystalkit.errors import PluginError, UsageError
from crystalkit.evaluation.saved import evaluate_run_dir
from crystalkit.runs.build import build_backbone, build_dataset
from crystalkit.testing import (
    ContractError,
    assert_corruption_contract,
    check_corruption,
    dummy_images,
)
from crystalkit.training.trainer import train

PLUGIN = '''\
import os

import torch


class Recorder:
    """Reads the evidence: occludes it, and keeps (or saves to ``log``) what it was given."""

    uses_boxes = True

    def __init__(self, log: str = ""):
        self.log = log
        self.seen = []

    def __call__(self, images, generator, boxes):
        self.seen.append((images.clone(), boxes))
        if self.log:
            records = torch.load(self.log) if os.path.exists(self.log) else []
            torch.save([*records, (images.clone(), boxes)], self.log)
        out = images.clone()
        for i, image_boxes in enumerate(boxes):
            for x0, y0, x1, y1 in image_boxes:
                out[i, :, y0:y1, x0:x1] = 0.5
        return out


class TwoArguments:
    """Declares nothing: crystalkit calls it as it always did."""

    def __init__(self):
        self.calls = []

    def __call__(self, *args):
        self.calls.append(len(args))
        return args[0].clone()


class NotABool:
    uses_boxes = "yes"

    def __call__(self, images, generator, boxes=None):
        return images.clone()


class DeclaresButTakesTwo:
    uses_boxes = True

    def __call__(self, images, generator):
        return images.clone()


class BorderFails:
    """Marks each box's right edge, one past the box: fine until a box touches the border."""

    uses_boxes = True

    def __call__(self, images, generator, boxes):
        out = images.clone()
        for i, image_boxes in enumerate(boxes):
            for x0, y0, x1, y1 in image_boxes:
                out[i, :, y0, x1] = 0.0
        return out
'''

#: count questions: several evidence boxes per sample
COUNT = ["dataset.tasks=[count, colour]", "dataset.num_distractors=[0, 0]"]


@pytest.fixture
def plugin(tmp_path: Path) -> Path:
    path = tmp_path / "box_plugin.py"
    path.write_text(PLUGIN)
    return path


def _by_image(samples) -> dict[bytes, object]:
    return {s.image.numpy().tobytes(): s for s in samples}


def _sample_of(image: torch.Tensor, samples: dict[bytes, object]):
    return samples[(image * 255).round().to(torch.uint8).numpy().tobytes()]


def _plugin_class(path: Path, name: str):
    from crystalkit.registries import CORRUPTIONS

    return CORRUPTIONS.get(f"{path}:{name}")


# -- the declaration is part of the contract ---------------------------------------------------


def test_the_declaration_and_the_three_argument_call_are_checked(plugin: Path):
    check_corruption(_plugin_class(plugin, "Recorder")())
    with pytest.raises(ContractError, match=r"declares uses_boxes='yes'; expected True"):
        check_corruption(_plugin_class(plugin, "NotABool")())
    with pytest.raises(ContractError) as info:
        check_corruption(_plugin_class(plugin, "DeclaresButTakesTwo")())
    assert "raised TypeError" in str(info.value) and "3 evidence boxes" in str(info.value)
    border = _plugin_class(plugin, "BorderFails")
    check_corruption(border())  # the dummy boxes stay clear of the border
    with pytest.raises(ContractError, match="raised IndexError"):
        assert_corruption_contract(border, params=st.just({}), max_examples=30)


def test_the_recipe_loader_checks_a_box_reading_corruption_with_boxes(tiny_recipe, plugin: Path):
    tiny_recipe("method=crystal", f"corruption.name={plugin}:Recorder")
    with pytest.raises(PluginError) as info:
        tiny_recipe("method=crystal", f"corruption.name={plugin}:DeclaresButTakesTwo")
    assert "breaks the corruption contract: raised TypeError" in str(info.value)


# -- the evidence reaches the corruption -------------------------------------------------------


def test_a_box_reading_plugin_gets_each_samples_evidence_in_training_and_eval_corrupted(
    tiny_recipe, plugin: Path, tmp_path: Path
):
    log = tmp_path / "seen.pt"
    recipe = tiny_recipe(
        "method=crystal",
        "latents.schedule.k=2",
        "train.steps=2",
        *COUNT,
        f"corruption={{name: {plugin}:Recorder, log: {log}}}",
    )
    run_dir = train(recipe).run_dir
    dataset = build_dataset(recipe)
    batches = [r for r in torch.load(log) if r[0].shape[0] == recipe.train.batch_size]
    assert len(batches) == 2  # one corrupted batch per step
    train_samples = _by_image(dataset.split("train")[i] for i in range(256))
    for images, boxes in batches:
        for image, image_boxes in zip(images, boxes, strict=True):
            assert image_boxes == _sample_of(image, train_samples).evidence
    assert any(len(b) > 1 for _, boxes in batches for b in boxes)  # counted objects, each

    log.unlink()
    evaluate_run_dir(run_dir, "test", max_samples=8, corrupted=True)  # crystalkit eval --corrupted
    (images, boxes), *_ = torch.load(log)
    test_samples = _by_image(dataset.split("test")[i] for i in range(8))
    assert len(images) == 8
    for image, image_boxes in zip(images, boxes, strict=True):
        assert image_boxes == _sample_of(image, test_samples).evidence


def test_model_input_hands_over_the_boxes_resized_with_the_image(tiny_recipe, plugin: Path):
    recipe = tiny_recipe(
        "method=crystal",
        "latents.schedule.k=2",
        "dataset.image_size=48",  # the vision tower sees 32 x 32
        "crystal.corrupt_at=model_input",
        *COUNT,
        f"corruption.name={plugin}:Recorder",
    )
    dataset = build_dataset(recipe)
    method = Method(recipe, build_backbone(recipe, dataset))
    samples = [dataset.split("train")[i] for i in range(4)]
    method.layout(samples, step=0)
    ((images, boxes),) = method.corruption.seen
    assert images.shape == (4, 3, 32, 32)
    for sample, image_boxes in zip(samples, boxes, strict=True):
        assert len(image_boxes) == len(sample.evidence)
        for box, original in zip(image_boxes, sample.evidence, strict=True):
            reference = touched_box(original, (48, 48), (32, 32), "bilinear")
            assert box[:2] <= reference[:2] and box[2:] >= reference[2:], (box, reference)
            assert max(abs(a - b) for a, b in zip(box, reference, strict=True)) <= 1


def test_a_corruption_that_declares_nothing_is_called_with_two_arguments(tiny_recipe, plugin: Path):
    recipe = tiny_recipe("method=crystal", f"corruption.name={plugin}:TwoArguments")
    dataset = build_dataset(recipe)
    method = Method(recipe, build_backbone(recipe, dataset))
    method.corrupt([dataset.split("train")[i] for i in range(3)], seed=0)  # samples with boxes
    assert method.corruption.calls == [2]
    corruption = _plugin_class(plugin, "TwoArguments")()
    check_corruption(corruption, dummy_images())
    assert corruption.calls == [2, 2]


# -- data without boxes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec", ["{name: evidence}", "{name: blur, relative_to: evidence, radius: [0.5, 1.0]}"]
)
def test_a_box_reading_corruption_on_data_without_boxes_is_one_clear_line(tiny_recipe, spec):
    recipe = tiny_recipe("method=crystal", f"corruption={spec}")
    dataset = build_dataset(recipe)
    method = Method(recipe, build_backbone(recipe, dataset))
    samples = [dataset.split("train")[i] for i in range(2)]
    method.corrupt(samples, seed=0)
    unmarked = [samples[0], replace(samples[1], boxes=[], box=None)]
    name = recipe.corruption.name
    with pytest.raises(UsageError) as info:
        method.corrupt(unmarked, seed=0)
    assert str(info.value) == (
        f"corruption {name!r} reads each sample's evidence boxes, but sample "
        f"{samples[1].index} has none (Sample.boxes and Sample.box are empty); use it on data "
        "that marks its evidence (synthetic_shapes does), or a corruption that reads no boxes"
    )
    outside = [replace(samples[0], boxes=[(30, 4, 40, 9)])]
    with pytest.raises(UsageError, match=r"evidence box \(30, 4, 40, 9\) is empty or outside"):
        method.corrupt(outside, seed=0)
