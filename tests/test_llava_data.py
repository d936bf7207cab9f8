"""The ``llava_json`` dataset: LLaVA conversation records -> open-ended samples, bad records by index."""

from __future__ import annotations

import json
import math
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from cli_process import assert_one_error_line, invoke
from conftest import ROOT, TINY
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from crystalkit.config.loader import load_recipe
from crystalkit.crystal.layout import Packer
from crystalkit.data.llava import IMAGE_PLACEHOLDER, LlavaJson, RecordError, first_turn
from crystalkit.data.prompt import format_question
from crystalkit.data.sample import Sample
from crystalkit.data.splits import SPLITS
from crystalkit.errors import DataWarning, RecipeError, UsageError
from crystalkit.evaluation import accuracy
from crystalkit.evaluation.accuracy import normalise_answer
from crystalkit.runs.build import build_backbone, build_dataset

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def _record(i: int, colour: str) -> dict:
    return {
        "id": f"r{i}",
        "image": f"images/{colour}.png",
        "conversations": [
            {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\nwhat colour is image {i} ?"},
            {"from": "gpt", "value": colour},
            {"from": "human", "value": "and later turns ?"},
            {"from": "gpt", "value": "are ignored"},
        ],
    }


def _records(n: int = 9) -> list[dict]:
    return [_record(i, list(COLOURS)[i % 3]) for i in range(n)]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """Three flat-colour PNGs of odd sizes (RGB, RGBA and palette modes) and the same nine
    records as ``data.json`` and ``data.jsonl``."""
    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 30), COLOURS["red"]).save(tmp_path / "images" / "red.png")
    Image.new("RGBA", (17, 50), (*COLOURS["green"], 255)).save(tmp_path / "images" / "green.png")
    Image.new("RGB", (64, 64), COLOURS["blue"]).convert("P").save(tmp_path / "images" / "blue.png")
    (tmp_path / "data.json").write_text(json.dumps(_records()))
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()))
    return tmp_path


def _dataset(train: Path, **params) -> LlavaJson:
    return LlavaJson(LlavaJson.Config(train=str(train), **{"holdout": 2, **params}))


def test_first_turn_question_without_placeholder_and_open_ended_samples(data_dir: Path):
    dataset = _dataset(data_dir / "data.json", val=str(data_dir / "data.json"), image_size=24)
    sample = dataset.split("val")[4]
    assert sample.question == "what colour is image 4 ?"  # placeholder and newline gone
    assert (sample.options, sample.answer, sample.answer_text) == ([], "green", "green")
    assert sample.meta["id"] == "r4" and sample.meta["image"].endswith("green.png")
    assert format_question(sample.question, sample.options) == sample.question
    # a later turn never leaks in; the JSONL file gives the same samples
    assert not any("later" in text or "ignored" in text for text in dataset.corpus())
    jsonl = _dataset(data_dir / "data.jsonl", val=str(data_dir / "data.jsonl"), image_size=24)
    again = jsonl.split("val")[4]
    assert (again.question, again.answer) == (sample.question, sample.answer)
    assert torch.equal(again.image, sample.image)
    # multiple choice keeps its options in the question; the answer is what gpt wrote
    listed = "Which colour?\nA. red\nB. blue\nAnswer with the option's letter."
    turns = [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{listed}"}]
    assert first_turn([*turns, {"from": "gpt", "value": "B"}]) == (listed, "B")


def test_images_are_resized_rgb_squares(data_dir: Path):
    split = _dataset(data_dir / "data.json", val=str(data_dir / "data.json"), image_size=24)
    for i, colour in enumerate(COLOURS):  # RGB, RGBA and palette PNGs of three sizes
        image = split.split("val")[i].image
        assert image.dtype == torch.uint8 and image.shape == (3, 24, 24)
        assert image.flatten(1).T.unique(dim=0).tolist() == [list(COLOURS[colour])]


def test_image_size_null_keeps_each_images_native_size(data_dir: Path):
    split = _dataset(data_dir / "data.json", val=str(data_dir / "data.json"), image_size=None)
    for i, (colour, size) in enumerate(zip(COLOURS, [(30, 40), (50, 17), (64, 64)], strict=True)):
        image = split.split("val")[i].image
        assert image.dtype == torch.uint8 and image.shape == (3, *size)
        assert image.flatten(1).T.unique(dim=0).tolist() == [list(COLOURS[colour])]


def test_images_are_decoded_on_access_only(data_dir: Path, monkeypatch):
    from crystalkit.data import llava

    opened: list[Path] = []
    original = llava.open_rgb
    monkeypatch.setattr(llava, "open_rgb", lambda path: opened.append(path) or original(path))
    dataset = _dataset(data_dir / "data.json")
    assert opened == [] and len(dataset.split("train")) == 5
    dataset.split("train")[1]
    assert len(opened) == 1
    # so a corrupt image is only found (and named, with its record) when it is needed
    (data_dir / "images" / "red.png").write_bytes(b"not a png")
    train = _dataset(data_dir / "data.json").split("train")
    first_red = next(i for i, r in enumerate(train.records) if r.image.endswith("red.png"))
    with pytest.raises(UsageError) as info:
        train[first_red]
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert str(data_dir / "data.json") in message and "not a readable image" in message
    assert train.records[first_red].where in message


def test_holdout_is_deterministic_disjoint_and_leaves_files_alone(data_dir: Path):
    def ids(dataset: LlavaJson, split: str) -> list[str]:
        return [r.id for r in dataset.split(split).records]

    a, b = _dataset(data_dir / "data.json"), _dataset(data_dir / "data.json")
    parts = [ids(a, s) for s in ("train", "val", "test")]
    assert parts == [ids(b, s) for s in ("train", "val", "test")]
    assert [len(p) for p in parts] == [5, 2, 2]
    assert sorted(i for part in parts for i in part) == sorted(f"r{i}" for i in range(9))
    assert all(p == sorted(p) for p in parts)  # file order kept inside each part
    other = _dataset(data_dir / "data.json", seed=1)
    assert [ids(other, s) for s in ("val", "test")] != parts[1:]
    fraction = _dataset(data_dir / "data.json", holdout=0.25)  # round(0.25 * 9) = 2 each
    assert [len(fraction.split(s)) for s in ("train", "val", "test")] == [5, 2, 2]
    # a split with its own file is not carved; max_samples caps every split
    files = _dataset(data_dir / "data.json", test=str(data_dir / "data.jsonl"), max_samples=4)
    assert [len(files.split(s)) for s in ("train", "val", "test")] == [4, 2, 4]
    assert ids(files, "test") == ["r0", "r1", "r2", "r3"]
    with pytest.raises(UsageError, match="leaving none to train on"):
        _dataset(data_dir / "data.json", holdout=5)
    with pytest.raises(UsageError, match=r"no split 'valid'.*did you mean 'val'"):
        a.split("valid")


def _good_turns(question: str = f"{IMAGE_PLACEHOLDER} q ?", answer: str = "a") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


BAD_RECORDS = {
    "not an object": (["image"], "is a list (expected an object with 'image'"),
    "no image": ({"conversations": _good_turns()}, "'image' is missing (expected one image path"),
    "two images": (
        {"image": ["a.png", "b.png"], "conversations": _good_turns()},
        "'image' is a list (expected one image path",
    ),
    "no conversations": ({"image": "images/red.png"}, "'conversations' is missing"),
    "empty conversations": (
        {"image": "images/red.png", "conversations": []},
        "'conversations' is empty (expected a non-empty list of turns)",
    ),
    "turn not an object": (
        {"image": "images/red.png", "conversations": ["hi"]},
        "conversations[0] is a string without string 'from' and 'value'",
    ),
    "no human turn": (
        {"image": "images/red.png", "conversations": [{"from": "gpt", "value": "x"}]},
        "no human turn",
    ),
    "no gpt turn": (
        {"image": "images/red.png", "conversations": _good_turns()[:1]},
        "not followed by a gpt turn",
    ),
    "placeholder absent": (
        {"image": "images/red.png", "conversations": _good_turns("q ?")},
        "has 0 '<image>' placeholders (expected exactly one)",
    ),
    "placeholder repeated": (
        {"image": "images/red.png", "conversations": _good_turns("<image> q <image>")},
        "has 2 '<image>' placeholders (expected exactly one)",
    ),
    "only a placeholder": (
        {"image": "images/red.png", "conversations": _good_turns(" <image>\n")},
        "the question is empty",
    ),
    "empty answer": (
        {"image": "images/red.png", "conversations": _good_turns(answer="  ")},
        "the gpt answer is empty",
    ),
    "missing image file": (
        {"id": 7, "image": "images/purple.png", "conversations": _good_turns()},
        "images/purple.png not found",
    ),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_record_is_skipped_with_a_count_or_fails_as_one_line(data_dir: Path, case: str):
    bad, expected = BAD_RECORDS[case]
    path = data_dir / "mixed.json"
    path.write_text(json.dumps([*_records(4)[:1], bad, *_records(4)[1:]]))
    with pytest.warns(DataWarning) as caught:
        dataset = _dataset(path, holdout=1)
    (warning,) = caught
    assert f"{path}: skipped 1 of 5 records: record 1" in str(warning.message)
    assert sum(len(dataset.split(s)) for s in ("train", "val", "test")) == 4
    assert len(dataset.skipped) == 1 and expected in dataset.skipped[0]
    with pytest.raises(UsageError) as info:
        _dataset(path, on_bad_record="fail")
    message = str(info.value)
    assert len(message.splitlines()) == 1 and message.startswith(f"{path}: record 1")
    assert expected in message
    if case == "missing image file":
        assert message.startswith(f"{path}: record 1 (id 7): image file ")


def test_file_level_errors_are_one_line(data_dir: Path):
    broken = data_dir / "broken.json"
    broken.write_text('[{"image": "images/red.png",\n  "conversations": [}]')
    with pytest.raises(UsageError, match=rf"^{broken}:2:21: invalid JSON: .*expected a JSON list"):
        _dataset(broken)
    broken.write_text(json.dumps({"data": _records()}))
    with pytest.raises(UsageError, match=r"holds an object \(expected a JSON list of records"):
        _dataset(broken)
    with pytest.raises(UsageError, match="file not found"):
        _dataset(data_dir / "nope.json")
    lines = data_dir / "lines.jsonl"
    good = [json.dumps(r) for r in _records(3)]
    lines.write_text("\n".join([good[0], "", "{oops", *good[1:]]) + "\n")
    with pytest.warns(DataWarning, match=r"skipped 1 of 4 records: line 3: is not valid JSON"):
        assert len(_dataset(lines, holdout=0.3).split("train")) == 1
    for text, why in (("[]", "it is empty"), (json.dumps([{"image": "x"}] * 5), "all 5 skipped")):
        broken.write_text(text)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DataWarning)
            with pytest.raises(UsageError, match=rf"no usable record \({why}"):
                _dataset(broken)


def test_config_requires_eval_splits_and_makes_paths_absolute(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = LlavaJson.Config(train="d/train.json", val="v.json", test="~/t.json")
    assert config.train == str(tmp_path / "d" / "train.json")
    assert config.test == str(Path.home() / "t.json")
    base = [*TINY, "dataset.name=llava_json", "dataset.train=train.json"]
    with pytest.raises(RecipeError, match="no val or test file: set val and test, or holdout"):
        load_recipe(ROOT / "recipes" / "direct_finetune.yaml", base)
    for holdout in ("0", "1.5", "-2"):
        with pytest.raises(RecipeError, match="holdout must be a count >= 1 or a fraction"):
            load_recipe(
                ROOT / "recipes" / "direct_finetune.yaml", [*base, f"dataset.holdout={holdout}"]
            )


texts = st.text(st.characters(codec="utf-8", exclude_characters="<"), max_size=30)


@settings(max_examples=150, deadline=None)
@given(texts, texts, texts)
def test_question_is_the_text_around_the_placeholder(before: str, after: str, answer: str):
    turns = [{"from": "human", "value": before + IMAGE_PLACEHOLDER + after}]
    turns.append({"from": "gpt", "value": answer})
    question = (before + after).strip()
    if not question or not answer.strip():
        with pytest.raises(RecordError, match="empty"):
            first_turn(turns)
        return
    assert first_turn(turns) == (question, answer.strip())
    # the first human turn counts, wherever it is, and only the turn right after it answers
    system = {"from": "system", "value": "be brief"}
    later = [{"from": "human", "value": "<image> other"}, {"from": "gpt", "value": "x"}]
    assert first_turn([system, *turns, *later]) == (question, answer.strip())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
TEXTS = ["<image> q ?", "q <image>", "<image>", "<image> q <image>", "q", "", " ", "a"]


@st.composite
def records(draw: st.DrawFn) -> object:
    """A well-formed record with one part (possibly) broken: removed, or replaced by a random
    JSON value or a plausible string; or a random JSON value instead of the whole record."""
    record: dict = {
        "id": "x",
        "image": "images/red.png",
        "conversations": [{"from": "human", "value": "<image> q ?"}, {"from": "gpt", "value": "a"}],
    }
    part = draw(st.sampled_from(["record", "id", "image", "conversations", "from", "value", None]))
    value = draw(json_values | st.sampled_from(["human", "gpt", "user", "images/no.png", *TEXTS]))
    if part == "record":
        return value
    owner, key = record, part
    if part in ("from", "value"):
        owner = record["conversations"][draw(st.integers(0, 1))]
    if part is not None and draw(st.booleans()):
        del owner[key]
    elif part is not None:
        owner[key] = value
    return record


@settings(max_examples=120, deadline=None)
@given(st.integers(0, 3), records())
def test_any_record_loads_or_fails_as_one_line_naming_it(position: int, record: object):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        for colour in COLOURS:
            Image.new("RGB", (4, 4)).save(root / "images" / f"{colour}.png")
        records = _records(4)
        records.insert(position, record)
        path = root / "train.json"
        path.write_text(json.dumps(records))
        try:
            dataset = _dataset(path, holdout=1, on_bad_record="fail", image_size=8)
        except UsageError as exc:
            message = str(exc)
            assert len(message.splitlines()) == 1
            assert message.startswith(f"{path}: record {position}")
            assert "expected" in message
        else:  # it was a usable record after all
            assert sum(len(dataset.split(s)) for s in ("train", "val", "test")) == 5
            sample = dataset.split("train")[0]
            assert sample.question and IMAGE_PLACEHOLDER not in sample.question


def test_open_ended_answers_train_on_their_text_and_score_by_normalised_match(tiny_recipe):
    recipe = tiny_recipe()
    dataset = build_dataset(recipe)
    backbone = build_backbone(recipe, dataset)
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    open_ended = Sample(0, image, "what colour is the cross ?", [], "red")
    choice = dataset.split("val")[0]
    tok = backbone.tokenizer
    for mode in ("letter", "text"):
        layout = Packer(backbone, answer=mode)([open_ended, choice])
        targets = [t for t in layout.answer_targets()[0].tolist() if t != -100]
        assert targets == [*tok.encode("red", add_special_tokens=False), tok.eos_token_id]
    assert (
        normalise_answer("  Two, RED cats.") == normalise_answer("two red cats") == "two red cats"
    )


def test_open_ended_predictions_are_scored_by_normalised_exact_match(tiny_recipe, monkeypatch):
    from crystalkit.crystal.method import Method
    from crystalkit.evaluation.generation import Generation

    recipe = tiny_recipe()
    dataset = build_dataset(recipe)
    backbone = build_backbone(recipe, dataset)
    method = Method(recipe, backbone)
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    samples = [
        Sample(0, image, "what colour is the cross ?", [], "Red."),
        Sample(1, image, "what colour is the cross ?", [], "blue"),
        Sample(2, image, "where is the red cross ?", ["top left", "top right"], "B"),
    ]
    written = ["red", "red", "B"]
    tok = backbone.tokenizer
    rows = [tok.encode(w, add_special_tokens=False) for w in written]
    monkeypatch.setattr(
        accuracy,
        "generate_answers",
        lambda *args, **kwargs: Generation(torch.tensor(rows), torch.zeros(3, 1)),
    )
    result = accuracy.evaluate(backbone, samples, method, recipe.eval)
    assert [p["correct"] for p in result.predictions] == [True, False, True]
    assert [p["prediction"] for p in result.predictions] == ["red", "red", "B"]
    assert result.chance == pytest.approx((0 + 0 + 1 / 2) / 3)


def _llava_overrides(data_dir: Path, *extra: str) -> list[str]:
    return [
        "dataset.name=llava_json",
        f"dataset.train={data_dir / 'data.jsonl'}",
        "dataset.holdout=2",
        "dataset.image_size=32",
        *extra,
    ]


def test_tiny_recipe_trains_on_llava_data_end_to_end(data_dir: Path, tiny_recipe):
    from crystalkit.training.trainer import train

    recipe = tiny_recipe(*_llava_overrides(data_dir, "train.steps=3", "latents.schedule.k=2"))
    assert recipe.dataset.name == "llava_json" and "tasks" not in recipe.dataset.params
    result = train(recipe)
    predictions = [
        json.loads(line)
        for line in (result.run_dir / "predictions_test.jsonl").read_text().splitlines()
    ]
    assert len(predictions) == 2 and result.final.chance == 0.0
    for p in predictions:  # open-ended: the text itself is compared, normalised
        assert p["num_options"] == 0 and p["answer"] in COLOURS
        assert p["correct"] == (normalise_answer(p["raw"]) == p["answer"])
    vocab = json.loads((result.run_dir / "tokenizer.json").read_text())["model"]["vocab"]
    assert {"colour", "image", *COLOURS} <= set(vocab)


def test_crystal_trains_and_evaluates_on_native_size_images(data_dir: Path, tmp_path: Path):
    """CrystaL on images of three sizes kept native (``image_size: null``): batches of mixed
    sizes are corrupted image by image, resized by the backbone, trained on and evaluated, and the
    saved run evaluates them at their native size again."""
    from crystalkit.runs.load import load_run, run_image_size
    from crystalkit.training.trainer import train

    overrides = _llava_overrides(data_dir, "dataset.image_size=null", "train.steps=2")
    recipe = load_recipe(
        ROOT / "recipes" / "crystal_scratch.yaml",
        [*TINY, f"output_dir={tmp_path / 'runs'}", "latents.schedule.k=2", *overrides],
    )
    assert recipe.dataset.params["image_size"] is None
    dataset = LlavaJson(LlavaJson.Config(**recipe.dataset.params))
    shapes = {tuple(dataset.split("train")[i].image.shape) for i in range(5)}
    assert len(shapes) > 1  # the premise: a batch holds images of different sizes
    result = train(recipe)
    rows = (result.run_dir / "predictions_test.jsonl").read_text().splitlines()
    assert len(rows) == 2
    metrics = [
        json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    corrupted = [m["loss/ce_corrupted"] for m in metrics if "loss/ce_corrupted" in m]
    assert corrupted and all(math.isfinite(value) for value in corrupted)
    _, dataset, backbone, _, _ = load_run(result.run_dir)
    assert run_image_size(dataset, backbone) is None


def test_cli_train_fails_in_one_line_without_usable_records(data_dir: Path, tmp_path: Path):
    (data_dir / "data.jsonl").write_text(json.dumps({"image": "images/red.png"}) + "\n")
    result = invoke(
        "train",
        ROOT / "recipes" / "direct_finetune.yaml",
        *TINY,
        f"output_dir={tmp_path / 'runs'}",
        *_llava_overrides(data_dir),
    )
    line = assert_one_error_line(result)
    assert f"{data_dir / 'data.jsonl'}: no usable record (all 1 skipped, the first: line 1" in line
    assert "'conversations' is missing" in line


def _texts(question: str, answer: str, i: int) -> dict:
    turns = [
        {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{question}"},
        {"from": "gpt", "value": answer},
    ]
    return {"id": f"t{i}", "image": "images/red.png", "conversations": turns}


#: (question, answer) in whitespace words: one token each for the word-level tokenizer
LENGTHS = [
    ("what colour is this ?", "red"),  # 5 + 1 tokens: fits a bound of 6
    ("what colour ?", "a b c d e f g h"),  # 3 + 8: the answer can be cut to 3 words
    ("q1 q2 q3 q4 q5 q6 q7 q8", "blue"),  # 8 + 1: the question alone is over the bound
]


@pytest.mark.parametrize("mode", ["skip", "truncate"])
def test_long_records_are_skipped_or_truncated_with_a_count(data_dir: Path, mode: str):
    from crystalkit.models.tokenizer import build_word_tokenizer

    path = data_dir / "long.json"
    path.write_text(json.dumps([_texts(q, a, i) for i, (q, a) in enumerate(LENGTHS)]))
    files = {"val": str(path), "test": str(path), "max_text_tokens": 6, "on_long_record": mode}
    dataset = _dataset(path, holdout=None, **files)
    tokenizer = build_word_tokenizer(dataset.corpus())
    assert all(len(dataset.split(s)) == 3 for s in ("train", "val", "test"))  # bound not yet
    with pytest.warns(DataWarning) as caught:
        dataset.bind_tokenizer(tokenizer)
    (warning,) = caught
    cut = 1 if mode == "truncate" else 0
    assert str(warning.message) == (
        f"dataset.max_text_tokens 6: skipped {3 * (2 - cut)} and truncated the answers of "
        f'{3 * cut} of 9 records (the first: {path}: record 1 (id "t1"): 3 + 8 tokens)'
    )
    for name in ("train", "val", "test"):
        split = dataset.split(name)
        answers = [split[i].answer for i in range(len(split))]
        assert answers == (["red", "a b c"] if cut else ["red"])
        for i in range(len(split)):
            question = tokenizer.encode(split[i].question, add_special_tokens=False)
            answer = tokenizer.encode(split[i].answer, add_special_tokens=False)
            assert len(question) + len(answer) <= 6
    assert len(dataset.skipped) == 3 * (2 - cut) and len(dataset.truncated) == 3 * cut
    assert all("over max_text_tokens 6" in line for line in dataset.skipped)


def test_a_bound_that_leaves_no_record_is_one_line(data_dir: Path):
    from crystalkit.models.tokenizer import build_word_tokenizer

    dataset = _dataset(data_dir / "data.json", max_text_tokens=3)
    with pytest.raises(UsageError) as info:
        dataset.bind_tokenizer(build_word_tokenizer(dataset.corpus()))
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert message.startswith("dataset.max_text_tokens: 3 leaves no train record (all 5 are")


def test_build_model_bounds_the_records_with_the_backbones_tokenizer(data_dir: Path, tiny_recipe):
    from crystalkit.runs.build import build_model

    long = _texts("what colour is image 9 ? " + "please " * 20, "red", 9)
    (data_dir / "data.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in [*_records(6), long])
    )
    recipe = tiny_recipe(*_llava_overrides(data_dir, "dataset.max_text_tokens=12"))
    dataset = build_dataset(recipe)
    assert sum(len(dataset.split(s)) for s in SPLITS) == 7
    with pytest.warns(DataWarning, match="skipped 1 and truncated the answers of 0 of 7"):
        build_model(recipe, dataset)
    kept = [split[i] for split in map(dataset.split, SPLITS) for i in range(len(split))]
    assert len(kept) == 6 and "please" not in " ".join(s.question for s in kept)
