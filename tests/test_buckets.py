"""Difficulty buckets by the evidence's area: the bucketing against pixel-counting and linear-scan
references, the edges' validation, and per-bucket accuracy in an evaluation's files and the eval
table, recomputed from the predictions file and the dataset's scenes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from cli_process import invoke
from hypothesis import given
from hypothesis import strategies as st

from crystalkit.data.sample import Sample
from crystalkit.errors import RecipeError
from crystalkit.evaluation.buckets import (
    area_bucket,
    box_area,
    bucket_accuracy,
    bucket_labels,
    evidence_area,
)
from crystalkit.runs.build import build_dataset

edges_lists = st.lists(
    st.floats(min_value=1e-6, max_value=0.999999), min_size=1, max_size=5, unique=True
).map(sorted)
coordinates = st.integers(min_value=-8, max_value=80)
boxes = st.tuples(coordinates, coordinates, coordinates, coordinates)
sides = st.integers(min_value=1, max_value=64)


def _pixel_area(box: tuple[int, int, int, int], height: int, width: int) -> float:
    """The reference: the box's pixels counted on the image grid."""
    x0, y0, x1, y1 = box
    covered = torch.zeros(height, width, dtype=torch.bool)
    covered[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = True
    return int(covered.sum()) / (height * width)


def _scan(area: float, edges: list[float]) -> int:
    """The reference: the index of the first bucket whose upper edge lies above ``area``."""
    for i, edge in enumerate(edges):
        if area < edge:
            return i
    return len(edges)


@given(boxes, sides, sides)
def test_box_area_counts_the_boxs_pixels_inside_the_image(box, height, width):
    area = box_area(box, height, width)
    assert area == _pixel_area(box, height, width)
    assert 0.0 <= area <= 1.0


@given(edges_lists, st.floats(min_value=0.0, max_value=1.0), st.floats(0.0, 1.0))
def test_every_area_falls_in_exactly_one_bucket_monotonely(edges, area, other):
    labels = bucket_labels(edges)
    assert len(set(labels)) == len(edges) + 1  # distinct however close the edges
    bucket = area_bucket(area, edges)
    assert labels.count(bucket) == 1 and labels.index(bucket) == _scan(area, edges)
    low, high = sorted((area, other))
    assert labels.index(area_bucket(low, edges)) <= labels.index(area_bucket(high, edges))


@given(edges_lists, st.data())
def test_an_area_on_an_edge_belongs_to_the_bucket_above_it(edges, data):
    i = data.draw(st.integers(0, len(edges) - 1))
    labels = bucket_labels(edges)
    assert area_bucket(edges[i], edges) == labels[i + 1]
    assert area_bucket(math.nextafter(edges[i], 0.0), edges) == labels[i]


def test_labels_read_as_percentages():
    assert bucket_labels([0.005, 0.05]) == ["<0.5%", "0.5-5%", ">=5%"]
    assert bucket_labels([0.1]) == ["<10%", ">=10%"]
    assert bucket_labels([1e-5, 0.007]) == ["<0.001%", "0.001-0.7%", ">=0.7%"]
    assert bucket_labels([]) == [] and area_bucket(0.3, []) is None


def _sample(boxes: list, box=None, size: tuple[int, int] = (20, 10)) -> Sample:
    image = torch.zeros(3, *size, dtype=torch.uint8)
    return Sample(0, image, "q", ["a", "b"], "A", box=box, boxes=boxes)


def test_the_smallest_evidence_box_decides():
    two = _sample([(0, 0, 10, 10), (0, 0, 2, 5)], box=(0, 0, 10, 10))  # 100 and 10 of 200 px
    assert evidence_area(two) == 10 / 200
    assert evidence_area(_sample([], box=(0, 0, 5, 4))) == 20 / 200  # only the enclosing box
    assert evidence_area(_sample([])) is None  # no evidence: no bucket
    assert area_bucket(evidence_area(_sample([])), [0.01]) is None


def test_bucket_accuracy_leaves_out_rows_without_a_bucket_and_orders_by_area():
    rows = [
        {"bucket": ">=5%", "evidence_area": 0.2, "correct": True},
        {"bucket": "<0.5%", "evidence_area": 0.001, "correct": False},
        {"bucket": "<0.5%", "evidence_area": 0.003, "correct": True},
        {"bucket": None, "evidence_area": None, "correct": True},
        {"correct": False},  # a row written before buckets
    ]
    accuracy, samples = bucket_accuracy(rows)
    assert list(accuracy.items()) == [("<0.5%", 0.5), (">=5%", 1.0)]
    assert samples == {"<0.5%": 2, ">=5%": 1}


@pytest.mark.parametrize(
    "edges", ["[0.05, 0.005]", "[0.01, 0.01]", "[0, 0.5]", "[0.5, 1]", "[-0.1]"]
)
def test_edges_must_be_increasing_fractions(tiny_recipe, edges):
    with pytest.raises(RecipeError) as error:
        tiny_recipe(f"eval.area_buckets={edges}")
    message = str(error.value)
    assert "eval.area_buckets" in message and "increasing fractions" in message
    assert "\n" not in message


def _recomputed(run_dir: Path, recipe, split: str) -> tuple[dict, dict]:
    """Per-bucket accuracy and counts from the predictions file, each row's bucket found again
    from the dataset's scene (the targets' boxes, pixels counted) by a linear scan."""
    data = build_dataset(recipe).split(split)
    edges = recipe.eval.area_buckets
    labels = bucket_labels(edges)
    rows = [json.loads(line) for line in (run_dir / f"predictions_{split}.jsonl").open()]
    by_bucket: dict[str, list[bool]] = {label: [] for label in labels}
    for row in rows:
        sample = data[row["index"]]
        scene = sample.meta
        size = sample.image.shape[-2:]
        area = min(_pixel_area(scene["objects"][t]["box"], *size) for t in scene["targets"])
        assert row["bucket"] == labels[_scan(area, edges)]
        by_bucket[labels[_scan(area, edges)]].append(row["correct"])
    kept = {label: rows for label, rows in by_bucket.items() if rows}
    return (
        {label: sum(rows) / len(rows) for label, rows in kept.items()},
        {label: len(rows) for label, rows in kept.items()},
    )


def test_evaluation_reports_per_bucket_as_recomputed_from_its_predictions(tiny_recipe):
    from crystalkit.training.trainer import train

    # 6-7 px objects in 48 px images cover 1.6-2.1 %: an edge at 2 % splits them; count
    # questions have several boxes, the smallest decides
    recipe = tiny_recipe(
        "name=buckets",
        "train.steps=2",
        "dataset.image_size=48",
        "dataset.tasks=[colour, count]",
        "eval.area_buckets=[0.02]",
    )
    run_dir = train(recipe).run_dir
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["per_bucket"]) == {"<2%", ">=2%"}  # the premise: both buckets hold samples

    result = invoke("eval", run_dir, "--split", "val")
    assert result.exit_code == 0, result.output
    accuracy, samples = _recomputed(run_dir, recipe, "val")
    summary = json.loads((run_dir / "eval_val.json").read_text())
    assert list(summary["per_bucket"].items()) == list(accuracy.items())  # smallest first
    assert summary["per_bucket_samples"] == samples and sum(samples.values()) == 32
    lines = result.output.splitlines()
    header = next(i for i, line in enumerate(lines) if "evidence area" in line)
    for offset, (label, value) in enumerate(accuracy.items(), start=2):
        cells = [cell for cell in lines[header + offset].split() if cell != "│"]
        assert cells == [label, f"{value:.1%}", str(samples[label])]

    result = invoke("eval", run_dir, "--bench", "synthetic")  # the harness's summary too
    assert result.exit_code == 0, result.output
    bench = json.loads((run_dir / "bench_synthetic.json").read_text())
    assert bench["per_bucket"].keys() == accuracy.keys() and "evidence area" in result.output


def test_no_edges_report_no_buckets_and_no_table(tiny_recipe):
    from crystalkit.training.trainer import train

    run_dir = train(tiny_recipe("name=none", "train.steps=2", "eval.area_buckets=[]")).run_dir
    results = json.loads((run_dir / "results.json").read_text())
    assert results["per_bucket"] == {} and results["per_bucket_samples"] == {}
    rows = [json.loads(line) for line in (run_dir / "predictions_test.jsonl").open()]
    assert {row["bucket"] for row in rows} == {None} and rows[0]["evidence_area"] > 0
    result = invoke("eval", run_dir, "--max-samples", "4")
    assert result.exit_code == 0 and "evidence area" not in result.output
