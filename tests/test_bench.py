"""The evaluation harness: VLMEvalKit TSV and JSONL files, scorers, bad rows reported by index."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from cli_process import assert_one_error_line, invoke
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from crystalkit.data.boxes import resize_boxes
from crystalkit.data.sample import LETTERS, OptionKeyError, ordered_options
from crystalkit.errors import UsageError
from crystalkit.evaluation.benchfiles import read_jsonl, read_tsv
from crystalkit.evaluation.harness import score


def _png(colour: tuple[int, int, int], size=(20, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _b64(colour) -> str:
    return base64.b64encode(_png(colour)).decode()


HEADER = [
    "index",
    "image",
    "question",
    "A",
    "B",
    "C",
    "D",
    "E",
    "answer",
    "hint",
    "category",
    "l2-category",
    "split",
]


def _tsv(path: Path, rows: list[list[str]], header=HEADER) -> Path:
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def tsv_file(tmp_path: Path) -> Path:
    red, blue = _b64((255, 0, 0)), _b64((0, 0, 255))
    return _tsv(
        tmp_path / "bench.tsv",
        [
            [
                "1",
                red,
                "what colour is it ?",
                "red",
                "blue",
                "",
                "",
                "",
                "A",
                "",
                "colour",
                "perception",
                "dev",
            ],
            [
                "2",
                f"['{red}', '{blue}']",
                "which is left ?",
                "red",
                "blue",
                "green",
                "",
                "",
                "A",
                "nan",
                "colour",
                "",
                "",
            ],
            [
                "3",
                "1",
                "same image as row 1 ?",
                "yes",
                "no",
                "",
                "",
                "",
                "yes",
                "a hint",
                "reuse",
                "",
                "",
            ],
            ["4", "not-base64!!", "broken image", "a", "b", "", "", "", "A", "", "x", "", ""],
            ["5", blue, "answer not an option", "a", "b", "", "", "", "C", "", "x", "", ""],
            ["6", blue, "", "a", "b", "", "", "", "A", "", "x", "", ""],
        ],
    )


def test_tsv_rows_decode_including_image_lists_and_index_references(tsv_file):
    samples, bad = read_tsv(tsv_file, image_size=16)
    assert [s.question for s in samples] == [
        "what colour is it ?",
        "which is left ?",
        "a hint same image as row 1 ?",
    ]
    assert all(s.image.shape == (3, 16, 16) for s in samples)
    red = samples[0].image
    assert red[0].float().mean() > 250 and red[2].float().mean() < 5
    tiled = samples[1].image  # red | blue side by side
    assert tiled[0, :, :6].float().mean() > 200 and tiled[2, :, -6:].float().mean() > 200
    assert np.array_equal(samples[2].image.numpy(), red.numpy())  # "1" refers to row 1's image
    assert samples[1].options == ["red", "blue", "green"] and samples[2].answer == "A"
    assert samples[0].meta["l2-category"] == "perception"
    assert {b.index: b.reason.split(" ")[0] for b in bad} == {
        "4": "image",
        "5": "answer",
        "6": "empty",
    }


def test_tsv_missing_columns_is_one_line(tmp_path: Path):
    bad = _tsv(tmp_path / "bad.tsv", [["1", "q"]], header=["index", "question"])
    with pytest.raises(UsageError, match=r"missing column\(s\) answer, A, B, image or image_path"):
        read_tsv(bad, 16)


def test_jsonl_rows_with_image_root(tmp_path: Path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(_png((0, 255, 0)))
    (tmp_path / "imgs" / "b.png").write_bytes(_png((0, 0, 255)))
    lines = [
        {
            "id": "q1",
            "image": "a.png",
            "question": "colour ?",
            "options": ["green", "red"],
            "answer": "green",
            "category": "c",
        },
        {
            "id": "q2",
            "images": ["a.png", "b.png"],
            "question": "two ?",
            "options": ["x", "y"],
            "answer": "B",
        },
        {"id": "q3", "image": "missing.png", "question": "?", "options": ["x", "y"], "answer": "A"},
        {"id": "q4", "image": "a.png", "question": "?", "options": ["x"], "answer": "A"},
    ]
    path = tmp_path / "bench.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    samples, bad = read_jsonl(path, tmp_path / "imgs", 8)
    assert [s.answer for s in samples] == ["A", "B"]
    assert [b.index for b in bad] == ["q3", "q4", "line 5"]
    assert "not found" in bad[0].reason


def test_evidence_boxes_are_read_checked_and_resized_with_the_image(tmp_path: Path):
    (tmp_path / "a.png").write_bytes(_png((0, 255, 0)))  # 20 x 12
    row = {"image": "a.png", "question": "where ?", "options": ["x", "y"], "answer": "A"}
    lines = [
        {**row, "id": "one", "boxes": [[2, 3, 10, 6]]},
        {**row, "id": "two", "boxes": [[0, 0, 5, 5], [12.5, 6, 20, 12]]},
        {**row, "id": "none"},
        {**row, "id": "outside", "boxes": [[0, 0, 21, 5]]},
        {**row, "id": "flat", "boxes": [[0, 0, 4]]},
        {**row, "id": "empty", "boxes": [[3, 0, 3, 5]]},
        {**row, "id": "huge", "boxes": [[0, 0, 10**400, 5]]},
        {**row, "id": "bool", "boxes": [[False, 0, True, 5]]},
    ]
    path = tmp_path / "bench.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    samples, bad = read_jsonl(path, tmp_path, 8)
    assert [s.boxes for s in samples] == [[(0, 2, 4, 4)], [(0, 0, 2, 4), (4, 4, 8, 8)], []]
    assert [s.box for s in samples] == [(0, 2, 4, 4), (0, 0, 8, 8), None]
    assert [b.index for b in bad] == ["outside", "flat", "empty", "huge", "bool"]
    assert all(b.reason.startswith("'boxes' must be a list of [x0, y0, x1, y1]") for b in bad)
    assert "inside the 20 x 12 image" in bad[0].reason
    native, _ = read_jsonl(path, tmp_path, None)
    assert native[1].boxes == [(0, 0, 5, 5), (12, 6, 20, 12)]
    tsv = _tsv(
        tmp_path / "bench.tsv",
        [
            ["1", _b64((255, 0, 0)), "q", "a", "b", "A", "[[2, 3, 10, 6]]"],
            ["2", "1", "q", "a", "b", "A", ""],
            ["3", "1", "q", "a", "b", "A", "[[2, 3"],
        ],
        header=["index", "image", "question", "A", "B", "answer", "boxes"],
    )
    samples, bad = read_tsv(tsv, 8)
    assert [s.boxes for s in samples] == [[(0, 2, 4, 4)], []]
    assert [(b.index, b.reason.split(" (")[0]) for b in bad] == [("3", "'boxes' is not JSON")]


@given(
    st.integers(1, 300),
    st.integers(1, 300),
    st.integers(1, 64),
    st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)),
)
def test_resized_boxes_hold_every_pixel_whose_footprint_meets_the_box(width, height, size, f):
    """Against a reference that walks the output pixels: pixel j covers [j, j + 1) * native /
    size of the native image, and is in the box when that span meets it."""
    x0, x1 = sorted((int(f[0] * width), int(f[1] * width)))
    y0, y1 = sorted((int(f[2] * height), int(f[3] * height)))
    (box,) = resize_boxes([(x0, y0, x0 + 1 + x1 - x0, y1 + 1)], width + 1, height + 1, size)

    def span(lo: int, hi: int, native: int) -> tuple[int, int]:
        inside = [j for j in range(size) if j * native < hi * size and lo * size < (j + 1) * native]
        return inside[0], inside[-1] + 1

    assert box[::2] == span(x0, x1 + 1, width + 1)
    assert box[1::2] == span(y0, y1 + 1, height + 1)


@given(st.lists(st.text(min_size=1), min_size=1, max_size=len(LETTERS)), st.randoms())
def test_options_mapping_in_any_key_order_is_the_list_in_letter_order(texts, random):
    keys = list(LETTERS[: len(texts)])
    random.shuffle(keys)
    mapping = {key: texts[LETTERS.index(key)] for key in keys}
    assert ordered_options(mapping) == texts
    assert ordered_options(texts) is texts  # a list is taken as it is


@given(
    st.dictionaries(st.sampled_from(LETTERS), st.text(), min_size=1),
    st.text(min_size=1).filter(lambda key: key not in LETTERS or len(key) != 1),
)
def test_options_mapping_with_another_key_or_a_gap_is_refused(mapping, key):
    with pytest.raises(OptionKeyError, match=f"'options' key {re.escape(repr(key))} is not"):
        ordered_options({**mapping, key: "x"})
    missing = [letter for letter in LETTERS[: len(mapping)] if letter not in mapping]
    if missing:  # letters, but not A, B, ... without a gap
        with pytest.raises(OptionKeyError, match=f"skip {missing[0]} "):
            ordered_options(mapping)
    else:
        assert ordered_options(mapping) == [mapping[k] for k in sorted(mapping)]


def test_jsonl_options_as_a_mapping(tmp_path: Path):
    (tmp_path / "a.png").write_bytes(_png((255, 0, 0)))
    row = {"id": "q1", "image": "a.png", "question": "colour ?", "answer": "B"}
    listed = {**row, "options": ["blue", "red", "green"]}
    keyed = {**row, "id": "q2", "options": {"C": "green", "A": "blue", "B": "red"}}
    path = tmp_path / "bench.jsonl"
    path.write_text(f"{json.dumps(listed)}\n{json.dumps(keyed)}\n")
    (first, second), bad = read_jsonl(path, tmp_path, 8)
    assert not bad
    assert second.options == first.options == ["blue", "red", "green"]
    assert second.answer_text == "red"
    wrong = {**row, "id": "q3", "options": {"A": "blue", "b": "red"}}
    path.write_text(f"{json.dumps(listed)}\n{json.dumps(wrong)}\n")
    with pytest.raises(UsageError) as error:
        read_jsonl(path, tmp_path, 8)
    assert str(error.value).startswith(f"{path}: line 2 (id q3): 'options' key 'b' is not")
    assert "\n" not in str(error.value)


def _pred(correct: bool, category="", raw="", answer_text=""):
    return {"correct": correct, "category": category, "raw": raw, "answer_text": answer_text}


def test_scorers():
    preds = [
        _pred(True, "single"),
        _pred(True, "single"),
        _pred(True, "cross"),
        _pred(False, "cross"),
    ]
    assert score(preds, "multiple_choice")["score"] == 0.75
    assert score(preds, "mmvp_pairs")["pair_accuracy"] == 0.5  # (T,T) right, (T,F) wrong
    hr = score(preds, "hrbench")
    assert hr["single_accuracy"] == 1.0 and hr["cross_accuracy"] == 0.5 and hr["score"] == 0.75
    exact = score(
        [
            _pred(False, raw="Top Left.", answer_text="top left"),
            _pred(True, raw="no", answer_text="yes"),
        ],
        "exact_match",
    )
    assert exact["score"] == 0.5


def test_eval_bench_writes_per_sample_output(tsv_file, tiny_recipe):
    from crystalkit.training.trainer import train

    run_dir = train(tiny_recipe("name=bench", "train.steps=2", "latents.schedule.k=2")).run_dir
    result = invoke("eval", run_dir, "--bench", tsv_file)
    assert result.exit_code == 0, result.output
    summary = json.loads((run_dir / "bench_bench.json").read_text())
    assert summary["num_samples"] == 3 and summary["scorer"] == "multiple_choice"
    assert [s["index"] for s in summary["skipped"]] == ["4", "5", "6"]
    assert len(summary["recipe_sha1"]) == 12
    predictions = [
        json.loads(x) for x in (run_dir / "bench_bench_predictions.jsonl").read_text().splitlines()
    ]
    assert len(predictions) == 3
    assert {"question", "raw", "prediction", "correct"} <= predictions[0].keys()
    assert summary["accuracy"] == sum(p["correct"] for p in predictions) / 3

    analysed = invoke("analyze", run_dir, "--bench", tsv_file)
    assert analysed.exit_code == 0, analysed.output
    report = json.loads((run_dir / "analysis_bench_bench.json").read_text())
    assert report["num_samples"] == 3 and "answer_changed" not in report["x_to_z"]
    assert "benchmark file" in report["notes"][0] and set(report["probing"]) <= {"answer"}
    line = assert_one_error_line(invoke("eval", run_dir, "--bench", "nope.tsv"))
    assert "neither 'synthetic' nor an existing" in line
    line = assert_one_error_line(invoke("eval", run_dir, "--bench", tsv_file, "--corrupted"))
    assert "--corrupted and --bench are separate evaluations" in line

    # a JSONL benchmark declared in YAML, scored by exact match of the option text
    root = tsv_file.parent
    (root / "img.png").write_bytes(_png((255, 0, 0)))
    rows = [
        {
            "id": f"q{i}",
            "image": "img.png",
            "question": "what colour is it ?",
            "options": ["red", "blue"],
            "answer": "red",
        }
        for i in range(3)
    ]
    (root / "colours.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "colours.yaml").write_text(
        "name: colours\nformat: jsonl\npath: colours.jsonl\nscorer: exact_match\n"
    )
    assert invoke("eval", run_dir, "--bench", root / "colours.yaml").exit_code == 0
    summary = json.loads((run_dir / "bench_colours.json").read_text())
    predictions = [
        json.loads(x)
        for x in (run_dir / "bench_colours_predictions.jsonl").read_text().splitlines()
    ]
    assert (
        summary["scorer"] == "exact_match"
        and summary["num_samples"] == 3
        and not summary["skipped"]
    )
    assert summary["score"] == sum(p["raw"].strip().lower() == "red" for p in predictions) / 3
