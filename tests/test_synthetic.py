"""The synthetic perception benchmark: determinism, correct answers (checked on the pixels), no
shortcuts from text or option sets, and strict configuration."""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
from collections import Counter, defaultdict

import pytest
import torch
from hypothesis import given, reject, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from crystalkit.data.sample import LETTERS, Sample
from crystalkit.data.synthetic import COLOURS, QUADRANTS, SHAPES, SyntheticShapes, shape_mask
from crystalkit.errors import UsageError
from crystalkit.params import config_model
from crystalkit.registries import DATASETS

N = 400  # samples per statistical check
OPTION_LETTERS = LETTERS[:4]
_REFERENCES = torch.tensor([(128, 128, 128), *COLOURS.values()], dtype=torch.float32)
_NAMES = ["background", *COLOURS]


def _labels(image: torch.Tensor) -> torch.Tensor:
    """Per-pixel index into ``_NAMES`` of the nearest reference colour."""
    pixels = image.float().permute(1, 2, 0)[..., None, :]  # [H, W, 1, 3]
    return ((pixels - _REFERENCES) ** 2).sum(-1).argmin(-1)


def _box_colour(labels: torch.Tensor, box: tuple[int, int, int, int]) -> str:
    """Majority non-background colour inside ``box`` of a ``_labels`` map."""
    x0, y0, x1, y1 = box
    inside = labels[y0:y1, x0:x1].flatten()
    return _NAMES[Counter(inside[inside > 0].tolist()).most_common(1)[0][0]]


def _box_shape(labels: torch.Tensor, box: tuple[int, int, int, int]) -> str:
    """The shape whose template best matches the box's foreground pixels (IoU)."""
    x0, y0, x1, y1 = box
    fg = labels[y0:y1, x0:x1] > 0

    def iou(shape: str) -> float:
        template = shape_mask(shape, x1 - x0)
        return ((fg & template).sum() / (fg | template).sum()).item()

    return max(SHAPES, key=iou)


def _components(mask: torch.Tensor, min_size: int) -> int:
    """Number of 4-connected components of ``mask`` with at least ``min_size`` pixels."""
    todo = {tuple(p) for p in mask.nonzero().tolist()}
    count = 0
    while todo:
        stack, size = [todo.pop()], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for nb in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if nb in todo:
                    todo.remove(nb)
                    stack.append(nb)
        count += size >= min_size
    return count


def _digest(sample: Sample) -> str:
    text = "|".join([sample.question, *sample.options, sample.answer, str(sample.box)])
    return hashlib.sha256(sample.image.numpy().tobytes() + text.encode()).hexdigest()


@pytest.fixture(scope="module")
def dataset() -> SyntheticShapes:
    return SyntheticShapes(SyntheticShapes.Config())


@pytest.fixture(scope="module")
def train(dataset: SyntheticShapes) -> list[Sample]:
    return [dataset.split("train")[i] for i in range(N)]


def test_registered_with_documented_config() -> None:
    assert DATASETS.get("synthetic_shapes") is SyntheticShapes
    entry = next(e for e in DATASETS.entries() if e.name == "synthetic_shapes")
    assert "shapes" in entry.description
    schema = config_model(SyntheticShapes).model_json_schema()
    assert all(prop.get("description") for prop in schema["properties"].values())


def test_samples_have_the_documented_form(dataset: SyntheticShapes, train: list[Sample]) -> None:
    size = dataset.config.image_size
    corpus = set(dataset.corpus())
    for i, s in enumerate(train):
        assert s.index == i
        assert s.image.shape == (3, size, size) and s.image.dtype == torch.uint8
        assert len(s.options) == 4 and len(set(s.options)) == 4
        assert s.answer in OPTION_LETTERS and s.category in dataset.config.tasks
        assert s.question == " ".join(s.question.split()) and s.question.endswith(" ?")
        assert s.question == s.question.lower()
        words = s.question.split() + [w for o in s.options for w in o.split()] + [s.answer]
        assert set(words) <= corpus
    assert {s.category for s in train} == set(dataset.config.tasks)


def test_corpus_is_small_sorted_and_stable(dataset: SyntheticShapes) -> None:
    corpus = dataset.corpus()
    assert corpus == sorted(set(corpus)) == SyntheticShapes(dataset.config).corpus()
    assert len(corpus) < 50
    count_only = SyntheticShapes(SyntheticShapes.Config(tasks=["count"]))
    assert count_only.corpus() == corpus  # the same tokenizer serves every task mix


def test_same_index_gives_the_same_sample(dataset: SyntheticShapes) -> None:
    fresh = SyntheticShapes(SyntheticShapes.Config()).split("train")
    split = dataset.split("train")
    for i in (0, 7, 19999, 7):
        a, b = split[i], fresh[i]
        assert torch.equal(a.image, b.image)
        assert (a.question, a.options, a.answer, a.box) == (b.question, b.options, b.answer, b.box)


def test_samples_are_identical_across_processes(dataset: SyntheticShapes) -> None:
    indices = (0, 3, 511)
    code = (
        "import hashlib\n"
        "from crystalkit.data.synthetic import SyntheticShapes\n"
        "split = SyntheticShapes().split('val')\n"
        f"for i in {indices}:\n"
        "    s = split[i]\n"
        "    text = '|'.join([s.question, *s.options, s.answer, str(s.box)])\n"
        "    print(hashlib.sha256(s.image.numpy().tobytes() + text.encode()).hexdigest())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # set iteration order must not matter
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    split = dataset.split("val")
    assert out.stdout.split() == [_digest(split[i]) for i in indices]


def test_splits_survive_pickling(dataset: SyntheticShapes) -> None:
    """DataLoader workers receive the split pickled; they must generate the same samples."""
    split = dataset.split("test")
    clone = pickle.loads(pickle.dumps(split))
    assert len(clone) == len(split) and _digest(clone[42]) == _digest(split[42])


def test_different_seeds_give_different_samples() -> None:
    a = SyntheticShapes(SyntheticShapes.Config(seed=0)).split("train")
    b = SyntheticShapes(SyntheticShapes.Config(seed=1)).split("train")
    assert all(not torch.equal(a[i].image, b[i].image) for i in range(20))


def test_splits_have_their_sizes_and_share_no_image() -> None:
    config = SyntheticShapes.Config(train_size=300, val_size=200, test_size=250)
    dataset = SyntheticShapes(config)
    digests = {}
    for name, size in (("train", 300), ("val", 200), ("test", 250)):
        split = dataset.split(name)
        assert len(split) == size
        digests[name] = {
            hashlib.sha256(split[i].image.numpy().tobytes()).digest() for i in range(200)
        }
        assert len(digests[name]) == 200
        with pytest.raises(IndexError):
            split[size]
    assert not digests["train"] & digests["val"]
    assert not digests["train"] & digests["test"]
    assert not digests["val"] & digests["test"]


def test_unknown_split_names_the_valid_ones(dataset: SyntheticShapes) -> None:
    with pytest.raises(UsageError, match=r"did you mean 'train'.*train, val, test"):
        dataset.split("trian")


def test_answers_are_right_on_the_pixels(dataset: SyntheticShapes, train: list[Sample]) -> None:
    half = dataset.config.image_size / 2
    min_area = dataset.config.object_size[0] ** 2 // 4
    for s in train:
        words = s.question.split()
        answer = s.answer_text
        labels = _labels(s.image)
        if s.category == "colour":
            assert _box_colour(labels, s.box) == answer
            assert _box_shape(labels, s.box) == words[-2]
        elif s.category == "shape":
            assert _box_colour(labels, s.box) == words[-3]
            assert _box_shape(labels, s.box) == answer
        elif s.category == "position":
            x0, y0, x1, y1 = s.box
            assert x1 <= half or x0 >= half, "target straddles the vertical midline"
            assert y1 <= half or y0 >= half, "target straddles the horizontal midline"
            where = f"{'top' if y1 <= half else 'bottom'} {'left' if x1 <= half else 'right'}"
            assert where == answer
            assert _box_colour(labels, s.box) == words[-3]
            assert _box_shape(labels, s.box) == words[-2]
        else:
            colour = _NAMES.index(words[2])
            assert _components(labels == colour, min_area) == int(answer)


def test_scene_descriptions_match_pixels_and_referents_are_unique(train: list[Sample]) -> None:
    for s in train:
        objects = s.meta["objects"]
        labels = _labels(s.image)
        for obj in objects:
            assert _box_colour(labels, obj["box"]) == obj["colour"]
        words = s.question.split()
        shapes = [o["shape"] for o in objects]
        colours = [o["colour"] for o in objects]
        if s.category == "colour":
            assert shapes.count(words[-2]) == 1
            assert set(s.options) <= set(colours), "every option colour is in the image"
        elif s.category == "shape":
            assert colours.count(words[-3]) == 1
            assert set(s.options) <= set(shapes), "every option shape is in the image"
        elif s.category == "position":
            assert list(zip(colours, shapes, strict=True)).count((words[-3], words[-2])) == 1
            assert colours.count(words[-3]) >= 2 and shapes.count(words[-2]) >= 2
        else:
            assert colours.count(words[2]) == int(s.answer_text) == len(s.meta["targets"])


def _chi_square(counts: Counter, n: int, k: int) -> float:
    return sum((counts[c] - n / k) ** 2 / (n / k) for c in range(k))


@pytest.mark.parametrize("shuffle", [True, False])
def test_answer_letters_are_uniform(shuffle: bool) -> None:
    split = SyntheticShapes(SyntheticShapes.Config(shuffle_options=shuffle)).split("train")
    samples = [split[i] for i in range(N)]
    letters = Counter(OPTION_LETTERS.index(s.answer) for s in samples)
    assert _chi_square(letters, N, 4) < 16.3  # p = 0.001 at 3 degrees of freedom
    if not shuffle:  # options keep the fixed canonical order
        for s in samples:
            if s.category == "position":
                assert tuple(s.options) == QUADRANTS
            elif s.category == "count":
                assert s.options == ["1", "2", "3", "4"]
            else:
                order = list(COLOURS) if s.category == "colour" else list(SHAPES)
                assert s.options == sorted(s.options, key=order.index)


def test_text_alone_does_not_reveal_the_answer() -> None:
    """A text-only learner scoring each option by how often it was right after the same question
    in 1500 training samples must stay at chance on held-out samples."""
    dataset = SyntheticShapes(SyntheticShapes.Config(val_size=800))
    right: dict[tuple[str, str], int] = defaultdict(int)
    seen: dict[tuple[str, str], int] = defaultdict(int)
    per_question: dict[str, Counter] = defaultdict(Counter)
    split = dataset.split("train")
    for i in range(1500):
        s = split[i]
        per_question[s.question][s.answer_text] += 1
        for option in s.options:
            seen[s.question, option] += 1
            right[s.question, option] += option == s.answer_text
    for question, answers in per_question.items():
        if sum(answers.values()) >= 30:
            assert answers.most_common(1)[0][1] / sum(answers.values()) < 0.5, question
    val = dataset.split("val")

    def score(question: str, option: str) -> float:
        return (right[question, option] + 1) / (seen[question, option] + 4)

    hits = 0
    for i in range(len(val)):
        s = val[i]
        guess = max(s.options, key=lambda o, q=s.question: score(q, o))
        hits += guess == s.answer_text
    assert hits / len(val) < 0.31  # chance is 0.25; 0.31 is four standard deviations above it


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"object_size": (10, 6)}, "min <= max"),
        ({"object_size": (2, 4), "tasks": ["count"]}, "3 <= min"),
        ({"num_distractors": (5, 2)}, "min <= max"),
        ({"num_distractors": (-1, 2)}, "0 <= min"),
        ({"image_size": 8}, "greater than or equal to 16"),
        ({"background_noise": 1.5}, "less than or equal to 1"),
        ({"background_noise": -0.1}, "greater than or equal to 0"),
        ({"tasks": []}, "non-empty"),
        ({"tasks": ["count", "count"]}, "without repeats"),
        ({"tasks": ["size"]}, "colour"),
        ({"train_size": -1}, "greater than or equal to 0"),
        ({"seed": -3}, "greater than or equal to 0"),
        ({"num_distractors": (10, 20)}, "holds at most 16 objects"),
        ({"image_size": 16, "object_size": (10, 12)}, "too small"),
        ({"object_size": (4, 8)}, "look identical at 4 px"),
        ({"colours": 3}, "Extra inputs are not permitted"),
    ],
)
def test_config_rejects_bad_values(overrides: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SyntheticShapes.Config(**overrides)


def test_tiny_objects_are_allowed_when_no_question_depends_on_shape() -> None:
    config = SyntheticShapes.Config(object_size=(3, 4), tasks=["count"])
    sample = SyntheticShapes(config).split("test")[0]
    assert sample.category == "count"


@st.composite
def configs(draw: st.DrawFn) -> SyntheticShapes.Config:
    """Configs drawn over sizes, clutter and task mixes; the few that cannot fit are discarded."""
    tasks = draw(
        st.lists(st.sampled_from(["colour", "shape", "position", "count"]), min_size=1, unique=True)
    )
    lo = draw(st.integers(3 if tasks == ["count"] else 6, 12))
    d_lo = draw(st.integers(0, 4))
    try:
        return SyntheticShapes.Config(
            image_size=draw(st.integers(16, 128)),
            object_size=(lo, lo + draw(st.integers(0, 4))),
            num_distractors=(d_lo, d_lo + draw(st.integers(0, 6))),
            tasks=tasks,
            background_noise=draw(st.sampled_from([0.0, 0.08, 0.3])),
            shuffle_options=draw(st.booleans()),
            seed=draw(st.integers(0, 2**32)),
        )
    except ValidationError as exc:
        assert "holds at most" in str(exc) or "too small" in str(exc)
        reject()


@settings(max_examples=40, deadline=None)
@given(config=configs(), index=st.integers(0, 49))
def test_any_valid_config_generates_well_formed_samples(
    config: SyntheticShapes.Config, index: int
) -> None:
    image_size, (lo, hi) = config.image_size, config.object_size
    dataset = SyntheticShapes(config)
    corpus = set(dataset.corpus())
    for name in ("train", "val", "test"):
        s = dataset.split(name)[index]
        assert s.image.shape == (3, image_size, image_size) and s.image.dtype == torch.uint8
        assert (
            s.answer in OPTION_LETTERS and len(set(s.options)) == 4 and s.category in config.tasks
        )
        assert set(s.question.split()) <= corpus
        x0, y0, x1, y1 = s.box
        assert 0 <= x0 < x1 <= image_size and 0 <= y0 < y1 <= image_size
        boxes = [o["box"] for o in s.meta["objects"]]
        for obj in s.meta["objects"]:
            bx0, by0, bx1, by1 = obj["box"]
            assert lo <= bx1 - bx0 == by1 - by0 <= hi
            assert min(bx0, by0) >= 0 and max(bx1, by1) <= image_size
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:  # separated by at least one pixel: never overlapping
                assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]
        if config.background_noise == 0:  # exact colours inside the boxes, grey elsewhere
            outside = torch.ones(image_size, image_size, dtype=torch.bool)
            for obj in s.meta["objects"]:
                bx0, by0, bx1, by1 = obj["box"]
                outside[by0:by1, bx0:bx1] = False
                patch = s.image[:, by0:by1, bx0:bx1].permute(1, 2, 0)
                painted = (patch == torch.tensor(COLOURS[obj["colour"]], dtype=torch.uint8)).all(-1)
                assert painted.any() and (painted | (patch == 128).all(-1)).all()
            assert (s.image.permute(1, 2, 0)[outside] == 128).all()


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 199))
def test_a_counterfactual_changes_the_answer_and_nothing_else(index):
    """Same question, options and noise; only the changed object's pixels differ."""
    split = SyntheticShapes(SyntheticShapes.Config(test_size=200)).split("test")
    original, changed = split[index], split.counterfactual(index)
    assert changed.question == original.question and changed.options == original.options
    assert changed.answer != original.answer
    before = {tuple(o["box"]): o for o in original.meta["objects"]}
    after = {tuple(o["box"]): o for o in changed.meta["objects"]}
    touched = list(before.keys() ^ after.keys())
    touched += [box for box in before.keys() & after.keys() if before[box] != after[box]]
    assert touched
    outside = torch.ones(original.image.shape[1:], dtype=torch.bool)
    for x0, y0, x1, y1 in touched:
        outside[y0:y1, x0:x1] = False
    assert torch.equal(original.image[:, outside], changed.image[:, outside])
    assert not torch.equal(original.image, changed.image)
