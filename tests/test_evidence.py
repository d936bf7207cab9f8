"""Corruptions that remove the evidence: the ``evidence`` corruption (erase, blur, occlude exactly
the question's boxes), ``blur`` relative to the evidence, and the box geometry under them (resize
with ``corrupt_at: model_input``, margins)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from crystalkit.corruptions import build_corruption
from crystalkit.corruptions.basic import GaussianBlur
from crystalkit.corruptions.boxes import evidence_size, resized_box, widened_box
from crystalkit.corruptions.evidence import EvidenceCorruption
from crystalkit.data.synthetic import SyntheticShapes
from crystalkit.testing import assert_corruption_contract, box_lists, check_corruption

MODES = ["erase", "blur", "occlude"]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- boxes after the resize of corrupt_at: model_input ---------------------------------------


def touched_box(box, size, new_size, mode) -> tuple[int, int, int, int]:
    """Slow reference: resize the box's indicator image as Method._model_input resizes an image
    and take the bounding box of what is not zero."""
    (height, width), (x0, y0, x1, y1) = size, box
    indicator = torch.zeros(1, 1, height, width)
    indicator[..., y0:y1, x0:x1] = 1.0
    out = F.interpolate(indicator, size=new_size, mode=mode, antialias=True, align_corners=False)
    rows, cols = out[0, 0].ne(0).any(1).nonzero(), out[0, 0].ne(0).any(0).nonzero()
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


@settings(max_examples=150, deadline=None)
@given(
    size=st.tuples(st.integers(2, 96), st.integers(2, 96)),
    new_size=st.tuples(st.integers(2, 96), st.integers(2, 96)),
    mode=st.sampled_from(["bilinear", "bicubic"]),
    data=st.data(),
)
def test_resized_box_covers_every_pixel_the_resize_carries_the_box_to(size, new_size, mode, data):
    box = data.draw(box_lists((1, 3, *size), max_boxes=1))[0][0]
    got = resized_box(box, size, new_size, mode)
    if size == new_size:
        assert got == box
        return
    ref = touched_box(box, size, new_size, mode)
    assert got[:2] <= ref[:2] and got[2] >= ref[2] and got[3] >= ref[3], (ref, got)
    # at most the filter's exact zeros beyond it: its edge (1 px), or the cubic's zero at 1 (2 px)
    slack = 1 if mode == "bilinear" else 2
    assert max(ref[0] - got[0], ref[1] - got[1], got[2] - ref[2], got[3] - ref[3]) <= slack


def test_resized_box_is_tight_on_a_plain_downscale():
    assert resized_box((8, 16, 16, 24), (64, 64), (32, 32), "bilinear") == (3, 7, 9, 13)
    assert touched_box((8, 16, 16, 24), (64, 64), (32, 32), "bilinear") == (3, 7, 9, 13)


# -- the evidence corruption: what it changes and what it leaves -----------------------------


def widened_mask(boxes, margin: float, height: int, width: int) -> torch.Tensor:
    """Slow reference: the pixels ``[x, x + 1)`` that overlap a box grown by ``margin`` times its
    side (continuous coordinates), one pixel at a time."""
    mask = torch.zeros(height, width, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes:
        dx, dy = margin * (x1 - x0), margin * (y1 - y0)
        for y in range(height):
            for x in range(width):
                if x0 - dx < x + 1 and x < x1 + dx and y0 - dy < y + 1 and y < y1 + dy:
                    mask[y, x] = True
    return mask


@settings(max_examples=40, deadline=None)
@given(
    mode=st.sampled_from(MODES),
    margin=st.sampled_from([0.0, 0.15, 0.5]),
    shape=st.tuples(st.integers(1, 3), st.integers(4, 24), st.integers(4, 24)),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_evidence_changes_exactly_the_widened_boxes(mode, margin, shape, dtype, seed, data):
    batch, height, width = shape
    boxes = data.draw(box_lists((batch, 3, height, width)))
    corruption = build_corruption({"name": "evidence", "mode": mode, "margin": margin})
    images = torch.rand(batch, 3, height, width, generator=gen(seed)).to(dtype)
    out = check_corruption(corruption, images, seed, boxes)  # shape, dtype, range, determinism
    assert torch.equal(out, corruption(images, gen(seed), boxes))
    for i, image_boxes in enumerate(boxes):
        inside = widened_mask(image_boxes, margin, height, width)
        assert torch.equal(out[i][:, ~inside], images[i][:, ~inside])
        changed = out[i][:, inside] != images[i][:, inside]
        if mode == "occlude":
            assert bool((out[i][:, inside] == 0.5).all())
        else:  # a random image: every box's pixels are replaced by something else
            assert changed.float().mean() > 0.5


@pytest.mark.parametrize("factory", [EvidenceCorruption, GaussianBlur])
def test_drawn_parameters_images_and_boxes_keep_the_contract(factory):
    """Every mode, margin and ``relative_to`` (drawn from the signature) on drawn boxes."""
    assert_corruption_contract(factory, max_examples=25)


def test_evidence_without_boxes_for_every_image_is_refused():
    corruption = build_corruption("evidence")
    images = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"one list of evidence boxes per image \(2\), got 1"):
        corruption(images, gen(0), [[(0, 0, 2, 2)]])
    assert torch.equal(corruption(images, gen(0), [[], []]), images)  # nothing to remove


def test_occlude_pastes_the_value_and_blur_uses_sigma_times_the_evidence_size():
    images = torch.rand(2, 3, 32, 32, generator=gen(1))
    boxes = [[(4, 4, 12, 8)], [(0, 0, 4, 4), (10, 10, 22, 22)]]
    occlude = build_corruption({"name": "evidence", "mode": "occlude", "value": 0.0})
    assert float(occlude(images, gen(0), boxes)[1, :, 10:22, 10:22].abs().max()) == 0.0
    blur = build_corruption({"name": "evidence", "mode": "blur", "sigma": 1.5})
    sigma = blur.sample(images.shape, gen(0), boxes)["sigma"]
    assert sigma.tolist() == pytest.approx([1.5 * 6.0, 1.5 * (4.0 + 12.0) / 2])


def erase_reference(images, boxes, noise, margin=0.0):
    """Slow reference of erase, box by box: the ring around the box (as far as its larger side, at
    least 4 px) outside every evidence box, its per-channel median and median absolute deviation,
    and the box filled with ``median + 1.4826 * deviation * noise``."""
    out = images.clone()
    for i, image_boxes in enumerate(boxes):
        height, width = images.shape[-2:]
        wide = [widened_box(box, margin, height, width) for box in image_boxes]
        evidence = torch.zeros(height, width, dtype=torch.bool)
        for x0, y0, x1, y1 in wide:
            evidence[y0:y1, x0:x1] = True
        for x0, y0, x1, y1 in wide:
            reach = max(x1 - x0, y1 - y0, 4)
            ring = torch.zeros(height, width, dtype=torch.bool)
            ring[max(y0 - reach, 0) : y1 + reach, max(x0 - reach, 0) : x1 + reach] = True
            ring &= ~evidence
            if int(ring.sum()) < 16:
                ring = ~evidence if bool((~evidence).any()) else torch.ones_like(ring)
            pixels = images[i][:, ring]
            median = pixels.median(dim=1).values
            spread = (pixels - median[:, None]).abs().median(dim=1).values * 1.4826
            fill = median[:, None, None] + spread[:, None, None] * noise[i, :, y0:y1, x0:x1]
            out[i, :, y0:y1, x0:x1] = fill.clamp(0, 1)
    return out


@settings(max_examples=30, deadline=None)
@given(
    margin=st.sampled_from([0.0, 0.3]),
    shape=st.tuples(st.integers(1, 3), st.integers(2, 40), st.integers(2, 40)),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_erase_matches_the_box_by_box_reference(margin, shape, seed, data):
    batch, height, width = shape
    boxes = data.draw(box_lists((batch, 3, height, width), max_boxes=4))
    images = torch.rand(batch, 3, height, width, generator=gen(seed))
    erase = build_corruption({"name": "evidence", "margin": margin})
    noise = erase.sample(images.shape, gen(seed), boxes)["noise"]
    expected = erase_reference(images, boxes, noise, margin)
    torch.testing.assert_close(erase(images, gen(seed), boxes), expected, rtol=0, atol=1e-6)


# -- on the synthetic testbed: erased boxes look like background ----------------------------


def _scenes(n: int, **config) -> list:
    split = SyntheticShapes(SyntheticShapes.Config(test_size=n, **config)).split("test")
    return [split[i] for i in range(n)]


def _region_features(image: torch.Tensor, box) -> torch.Tensor:
    """What a linear detector of a filled patch would look at: per channel, the mean, the spread,
    the mean step to the next pixel (texture) and the mean's distance to the ring around it."""
    x0, y0, x1, y1 = box
    patch = image[:, y0:y1, x0:x1]
    ring = image[:, max(y0 - 3, 0) : y1 + 3, max(x0 - 3, 0) : x1 + 3]
    step = (patch[:, :, 1:] - patch[:, :, :-1]).abs().flatten(1).mean(1)
    return torch.cat(
        [patch.mean((1, 2)), patch.std((1, 2)), step, patch.mean((1, 2)) - ring.mean((1, 2))]
    )


def _background_box(objects, side: tuple[int, int], size: int, rng: np.random.Generator):
    """A box of ``side`` (w, h) that overlaps no object, or None."""
    w, h = side
    for _ in range(50):
        x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
        if all(x0 >= b[2] or x0 + w <= b[0] or y0 >= b[3] or y0 + h <= b[1] for b in objects):
            return x0, y0, x0 + w, y0 + h
    return None


def _detector_accuracy(filled: list[torch.Tensor], background: list[torch.Tensor]) -> float:
    """Held-out accuracy of a least-squares linear classifier telling filled from background."""
    features = torch.stack([*filled, *background]).double()
    labels = torch.cat([torch.ones(len(filled)), -torch.ones(len(background))]).double()
    order = torch.randperm(len(labels), generator=gen(0))
    features, labels = features[order], labels[order]
    features = (features - features.mean(0)) / features.std(0).clamp_min(1e-9)
    design = torch.cat([features, torch.ones(len(labels), 1, dtype=torch.float64)], dim=1)
    half = len(labels) // 2
    weights = torch.linalg.lstsq(design[:half], labels[:half, None]).solution
    predicted = (design[half:] @ weights).squeeze(1).sign()
    return float((predicted == labels[half:]).double().mean())


def test_erased_evidence_cannot_be_told_from_background_by_a_linear_detector():
    """Flat grey in the box (what a naive erase does) is found at once; the matched-noise fill is
    not, and its statistics are the background's."""
    samples = _scenes(160)
    images = torch.stack([s.image.float() / 255 for s in samples])
    boxes = [s.evidence for s in samples]
    erased = build_corruption("evidence")(images, gen(0), boxes)
    rng = np.random.default_rng(0)
    filled, flat, background = [], [], []
    for i, sample in enumerate(samples):
        objects = [o["box"] for o in sample.meta["objects"]]
        for box in boxes[i]:
            other = _background_box(objects, (box[2] - box[0], box[3] - box[1]), 64, rng)
            if other is None:
                continue
            filled.append(_region_features(erased[i], box))
            grey = images[i].clone()
            grey[:, box[1] : box[3], box[0] : box[2]] = 0.5
            flat.append(_region_features(grey, box))
            background.append(_region_features(erased[i], other))
    assert len(filled) > 150
    assert _detector_accuracy(flat, background) > 0.95  # the detector can find a fill
    assert _detector_accuracy(filled, background) < 0.65
    fill, bg = torch.stack(filled), torch.stack(background)
    assert (fill[:, :3].mean(0) - bg[:, :3].mean(0)).abs().max() < 0.01  # mean per channel
    assert ((fill[:, 3:6].mean(0) / bg[:, 3:6].mean(0)) - 1).abs().max() < 0.1  # spread


def test_erase_removes_every_counted_object_and_blur_leaves_a_faint_tint():
    """On a clean background: erase puts background back in every box of a count question (all
    the counted objects); blur leaves at most a faint tint of the object's colour."""
    samples = _scenes(24, tasks=["count"], background_noise=0.0)
    images = torch.stack([s.image.float() / 255 for s in samples])
    boxes = [s.evidence for s in samples]
    background = float(images[0, 0, 0, 0])
    erased = build_corruption("evidence")(images, gen(0), boxes)
    blurred = build_corruption({"name": "evidence", "mode": "blur"})(images, gen(0), boxes)
    for i, image_boxes in enumerate(boxes):
        assert len(image_boxes) == len(samples[i].meta["targets"])
        for x0, y0, x1, y1 in image_boxes:
            region = (slice(None), slice(y0, y1), slice(x0, x1))
            assert float((images[i][region] - background).abs().max()) > 0.2  # an object
            assert float((erased[i][region] - background).abs().max()) == 0.0
            assert float((blurred[i][region] - background).abs().max()) < 0.1


# -- blur relative to the evidence -----------------------------------------------------------


def test_blur_relative_to_evidence_scales_sigma_with_the_evidence_and_reads_boxes():
    image_blur = build_corruption({"name": "blur", "radius": [1.0, 2.0]})
    relative = build_corruption({"name": "blur", "radius": [1.0, 2.0], "relative_to": "evidence"})
    assert image_blur.uses_boxes is False and relative.uses_boxes is True
    small, large = [[(0, 0, 4, 4)], [(0, 0, 6, 2)]], [[(0, 0, 8, 8)], [(0, 0, 12, 4)]]
    drawn = image_blur.sample((2, 3, 448, 448), gen(3))["sigma"]  # radius in 448-px pixels
    sigma_small = relative.sample((2, 3, 32, 32), gen(3), small)["sigma"]
    sigma_large = relative.sample((2, 3, 32, 32), gen(3), large)["sigma"]
    sizes = torch.tensor([evidence_size(b) for b in small])
    assert torch.allclose(sigma_small, drawn * sizes) and torch.allclose(
        sigma_large, 2 * sigma_small
    )
    check_corruption(relative)
    with pytest.raises(ValueError, match="relative_to: evidence needs one list of evidence boxes"):
        relative.sample((2, 3, 32, 32), gen(3))


def test_a_composition_reads_boxes_when_a_step_does_and_hands_them_to_it():
    steps = [{"name": "noise", "std": [0.0, 0.0]}, {"name": "evidence", "mode": "occlude"}]
    composed = build_corruption({"name": "compose", "steps": steps})
    assert composed.uses_boxes is True
    assert build_corruption({"name": "compose", "steps": steps[:1]}).uses_boxes is False
    images, boxes = torch.rand(2, 3, 16, 16), [[(1, 1, 5, 5)], [(2, 3, 9, 9)]]
    expected = build_corruption(steps[1])(images, gen(0), boxes)
    assert torch.equal(composed(images, gen(0), boxes), expected)
    assert math.isclose(float(expected[1, 0, 3, 2]), 0.5)


@pytest.mark.parametrize("tasks", [["count"], ["colour", "shape", "position"]])
def test_scope_objects_leaves_nothing_but_background(tiny_recipe, tasks):
    """``scope: objects`` erases every object of the scene and its occluder bar, so nothing is
    left to answer by elimination; ``scope: evidence`` leaves the distractors (the premise)."""
    from crystalkit.runs.build import build_dataset, build_model

    dials = (
        ["dataset.occlusion=0.4", "dataset.num_distractors=[0, 0]"] if tasks == ["count"] else []
    )
    base = [f"dataset.tasks={tasks}", "dataset.background_noise=0.0", "method=crystal", *dials]
    recipe = tiny_recipe(*base, "corruption={name: evidence, scope: objects}")
    dataset = build_dataset(recipe)
    samples = [dataset.split("train")[i] for i in range(16)]
    method = build_model(recipe, dataset).method
    erased = torch.stack(list(method.corrupt(samples, 0)))
    background = float(samples[0].image[0, 0, 0]) / 255
    assert float((erased - background).abs().max()) == 0.0
    kept = build_model(tiny_recipe(*base, "corruption={name: evidence}"), dataset).method.corrupt(
        samples, 0
    )
    assert float((torch.stack(list(kept)) - background).abs().max()) > 0.2
