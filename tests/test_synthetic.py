"""The synthetic perception benchmark: determinism, correct answers (checked on the pixels), no
shortcuts from text or option sets, and strict configuration."""

from __future__ import annotations

import hashlib
import math
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

from crystalkit.data.backgrounds import PHOTO_CONTRAST, photos
from crystalkit.data.sample import LETTERS, Sample
from crystalkit.data.scenes import DISTRACTOR_TASKS
from crystalkit.data.shapes import ALL_SHAPES, DETAIL_PAIRS, ambiguous_shapes, partner
from crystalkit.data.synthetic import (
    COLOURS,
    OCCLUDER,
    QUADRANTS,
    SHAPES,
    SyntheticShapes,
    area_sides,
    quadrant,
    shape_mask,
)
from crystalkit.errors import UsageError
from crystalkit.params import config_model
from crystalkit.registries import DATASETS

N = 400  # samples per statistical check
OPTION_LETTERS = LETTERS[:4]
_REFERENCES = torch.tensor([(128, 128, 128), *COLOURS.values(), OCCLUDER], dtype=torch.float32)
_NAMES = ["background", *COLOURS, "occluder"]
#: the V* / HR-Bench relative-area buckets: < 0.5 %, 0.5-5 %, >= 5 %
_BUCKET_EDGES = (0.005, 0.05)


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


#: every dial away from its default, for the checks that a dial keeps a property of the defaults
_DIALS = {
    "image_size": 96,
    "object_size": None,
    "target_area": (0.004, 0.02),
    "distractors": "detail",
    "occlusion": 0.5,
    "background": "photo",
}


def test_samples_are_identical_across_processes(dataset: SyntheticShapes) -> None:
    indices = (0, 3, 511)
    code = (
        "import hashlib\n"
        "from crystalkit.data.synthetic import SyntheticShapes\n"
        f"for config in (SyntheticShapes.Config(), SyntheticShapes.Config(**{_DIALS!r})):\n"
        "    split = SyntheticShapes(config).split('val')\n"
        f"    for i in {indices}:\n"
        "        s = split[i]\n"
        "        text = '|'.join([s.question, *s.options, s.answer, str(s.box)])\n"
        "        print(hashlib.sha256(s.image.numpy().tobytes() + text.encode()).hexdigest())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # set iteration order must not matter
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    dials = SyntheticShapes(SyntheticShapes.Config(**_DIALS)).split("val")
    expected = [_digest(split[i]) for split in (dataset.split("val"), dials) for i in indices]
    assert out.stdout.split() == expected


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
        ({"target_area": (0.01, 0.02)}, r"so object_size must be null \(it is \(6, 10\)\)"),
        ({"object_size": None}, "object_size is null but target_area is not set"),
        ({"object_size": None, "target_area": (0.02, 0.01)}, "0 < min <= max < 1"),
        ({"object_size": None, "target_area": (0, 0.01)}, "0 < min <= max < 1"),
        ({"object_size": None, "target_area": (0.01, 1.0)}, "0 < min <= max < 1"),
        ({"object_size": None, "target_area": (0.0011, 0.0012)}, "holds no whole-pixel side"),
        (
            {"object_size": None, "target_area": (0.0001, 0.01), "tasks": ["count"]},
            "sides of 1 px on a 64 px image, below the least 3 px; raise its min to at least 0.0022",
        ),
        ({"object_size": None, "target_area": (0.01, 0.2)}, r"target_area \(0.01, 0.2\)\) holds"),
        ({"object_size": None, "target_area": (0.002, 0.01)}, "target_area .* look identical"),
        ({"object_size": (5, 8), "distractors": "detail"}, "look identical at 5 px"),
        ({"distractors": "same_colour", "tasks": ["count", "colour"]}, "position questions only"),
        ({"distractors": "detail", "tasks": ["count"]}, "colour/position/shape questions only"),
        ({"distractors": "similar"}, "different"),
        ({"occlusion": 0.3, "tasks": ["colour"]}, "count questions only"),
        ({"occlusion": 0.8}, "less than or equal to 0.75"),
        ({"background": "image"}, "noise"),
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


# --- difficulty dials -------------------------------------------------------------------------

#: sha256 prefixes of samples and their counterfactuals as the code before the dials (07bdab4)
#: generated them: the dials' defaults must keep the benchmark, pixel for pixel
_OLD_RECIPE = {
    "image_size": 128,
    "object_size": (6, 12),
    "num_distractors": (0, 10),
    "background_noise": 0.0,
    "shuffle_options": False,
    "seed": 3,
}
_PINNED = [
    ({}, "train", 0, "f8a84afa793f2a49", "2aa078eb27dad0e6"),  # count
    ({}, "train", 1, "c4bd95e2f54f027c", "279401022f0bac4f"),  # count
    ({}, "train", 2, "8b9cc2e944d164fa", "16ef962a53c1e78a"),  # colour
    ({}, "train", 3, "87185e90a9ab74ab", "a31646f60de5266d"),  # position
    ({}, "val", 5, "f42b373ccf71fb64", "dcf16e4c836b50dd"),  # count
    ({}, "test", 17, "e271a7880e6a2d7d", "eabdce65a5c042bd"),  # colour
    ({}, "train", 19999, "78b3c85ec6680cb8", "6357cb3d73ea5ac7"),  # colour
    (_OLD_RECIPE, "test", 0, "f7f9c5be5d9bb3e8", "a39affae071f04dc"),  # count
    (_OLD_RECIPE, "test", 1, "396a4ed2241f4964", "67f573a9a4154f58"),  # position
    (_OLD_RECIPE, "test", 2, "5d858918ddfeacc8", "b7bd81d51b652ef4"),  # shape
    (_OLD_RECIPE, "test", 3, "8c74ca42bde6c39a", "950ea20ff07321d1"),  # count
]


def _pin(sample: Sample) -> str:
    objects, targets = sample.meta["objects"], sample.meta["targets"]
    fields = [*sample.options, sample.answer, str(sample.box), str(sample.boxes)]
    text = "|".join([sample.question, *fields, str(objects), str(targets)])
    return hashlib.sha256(sample.image.numpy().tobytes() + text.encode()).hexdigest()[:16]


@pytest.mark.parametrize(("overrides", "split", "index", "sample", "counterfactual"), _PINNED)
def test_default_dials_reproduce_the_original_samples(
    overrides: dict, split: str, index: int, sample: str, counterfactual: str
) -> None:
    data = SyntheticShapes(SyntheticShapes.Config(**overrides)).split(split)
    assert (_pin(data[index]), _pin(data.counterfactual(index))) == (sample, counterfactual)


def test_default_dials_reproduce_the_first_64_training_samples(
    dataset: SyntheticShapes,
) -> None:
    """Every task and every counterfactual edit, against the original code's digest."""
    split, digest = dataset.split("train"), hashlib.sha256()
    for i in range(64):
        digest.update(_pin(split[i]).encode() + _pin(split.counterfactual(i)).encode())
    assert digest.hexdigest()[:16] == "2442434e226d487c"


def test_default_corpus_is_unchanged_and_detail_adds_its_words(dataset: SyntheticShapes) -> None:
    """A default run's tokenizer must not change; detail scenes add the variants' words."""
    corpus = dataset.corpus()
    assert hashlib.sha256(" ".join(corpus).encode()).hexdigest()[:16] == "542b8fe7c3d59d04"
    detail = SyntheticShapes(SyntheticShapes.Config(distractors="detail")).corpus()
    assert set(detail) - set(corpus) == {"notched", "ring"}


def _bucket(area: float) -> int:
    return sum(area >= edge for edge in _BUCKET_EDGES)


def _question_referent(sample: Sample) -> tuple[str | None, str | None]:
    """(colour, shape) the question names; shapes may be two words ('notched square')."""
    q = sample.question
    if sample.category == "colour":
        return None, q.removeprefix("what colour is the ").removesuffix(" ?")
    if sample.category == "shape":
        return q.split()[4], None
    if sample.category == "position":
        words = q.removeprefix("where is the ").removesuffix(" ?").split(" ", 1)
        return words[0], words[1]
    return q.split()[2], None


@st.composite
def dial_configs(draw: st.DrawFn) -> SyntheticShapes.Config:
    """Configs over every dial (clean backgrounds, so pixels can be checked exactly); the few
    that cannot fit are discarded."""
    tasks = draw(
        st.lists(st.sampled_from(["colour", "shape", "position", "count"]), min_size=1, unique=True)
    )
    modes = [m for m, changed in DISTRACTOR_TASKS.items() if changed.intersection(tasks)]
    shape_tasks = tasks != ["count"]
    if draw(st.booleans()):
        lo = draw(st.floats(0.002 if shape_tasks else 0.0005, 0.03))
        sizes = {"object_size": None, "target_area": (lo, lo * draw(st.floats(1, 20)))}
    else:
        lo = draw(st.integers(6 if shape_tasks else 3, 14))
        sizes = {"object_size": (lo, lo + draw(st.integers(0, 6)))}
    d_lo = draw(st.integers(0, 4))
    try:
        return SyntheticShapes.Config(
            image_size=draw(st.sampled_from([48, 64, 96, 128])),
            **sizes,
            num_distractors=(d_lo, d_lo + draw(st.integers(0, 6))),
            distractors=draw(st.sampled_from(modes)),
            tasks=tasks,
            occlusion=draw(st.sampled_from([0.0, 0.25, 0.5, 0.75])) if "count" in tasks else 0.0,
            background=draw(st.sampled_from(["noise", "photo"])),
            background_noise=0.0,
            shuffle_options=draw(st.booleans()),
            seed=draw(st.integers(0, 2**32)),
        )
    except ValidationError as exc:
        fits = ("holds at most", "too small", "look identical", "no whole-pixel side")
        assert any(reason in str(exc) for reason in fits), exc
        reject()


def _check_scene(config: SyntheticShapes.Config, s: Sample) -> None:
    """The scene's invariants, from ``meta`` alone."""
    size, half = config.image_size, config.image_size / 2
    objects, targets = s.meta["objects"], s.meta["targets"]
    assert s.boxes == [objects[t]["box"] for t in targets]
    assert s.box == (
        min(b[0] for b in s.boxes),
        min(b[1] for b in s.boxes),
        max(b[2] for b in s.boxes),
        max(b[3] for b in s.boxes),
    )
    boxes = [o["box"] for o in objects]
    for x0, y0, x1, y1 in boxes:  # inside the image, square, on one side of each midline
        assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size and x1 - x0 == y1 - y0
        assert (x1 <= half or x0 >= half) and (y1 <= half or y0 >= half)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:  # separated by at least one pixel: never overlapping
            assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]
    sides = [b[2] - b[0] for b in boxes]
    if config.target_area is None:
        assert all(config.object_size[0] <= side <= config.object_size[1] for side in sides)
    else:
        lo, hi = config.target_area
        assert all(lo - 1e-12 <= side * side / size**2 <= hi + 1e-12 for side in sides)
        assert len({sides[t] for t in targets}) == 1, "the targets share the drawn size"
    colours = [o["colour"] for o in objects]
    shapes = [o["shape"] for o in objects]
    colour, shape = _question_referent(s)
    answer = s.answer_text
    if s.category == "colour":
        assert shapes.count(shape) == 1 and shapes[0] == shape and colours[0] == answer
    elif s.category == "shape":
        assert colours.count(colour) == 1 and colours[0] == colour and shapes[0] == answer
    elif s.category == "position":
        assert list(zip(colours, shapes, strict=True)).count((colour, shape)) == 1
        assert (colours[0], shapes[0]) == (colour, shape)
        assert QUADRANTS[quadrant(objects[0]["box"], size)] == answer
    else:
        assert colours.count(colour) == int(answer) == len(targets)
        assert all(colours[t] == colour for t in targets)
    _check_distractors(config.distractors, s, colours, shapes)
    occluded = [o.get("occluder") is not None for o in objects]
    assert all(occluded) if s.category == "count" and config.occlusion > 0 else not any(occluded)


def _check_distractors(mode: str, s: Sample, colours: list[str], shapes: list[str]) -> None:
    """The distractor setting's promise, per task (distractors follow the targets; in a
    position scene the second distractor is the one that shares the target's shape)."""
    first = len(s.meta["targets"])
    rest = range(first, len(colours))
    if mode == "same_colour" and s.category == "position":
        for i in rest:
            if i == 2:
                assert shapes[i] == shapes[0] and colours[i] != colours[0]
            else:
                assert colours[i] == colours[0] and shapes[i] != shapes[0]
    elif mode == "detail" and s.category == "colour":
        assert all(shapes[i] == partner(shapes[0]) for i in rest)
    elif mode == "detail" and s.category == "shape":
        pairs = {frozenset(p) for p in DETAIL_PAIRS}
        options = set(s.options)
        assert sum(p <= options for p in pairs) == 2, "the options are two whole detail pairs"
    elif mode == "detail" and s.category == "position":
        for i in rest:
            assert shapes[i] == (shapes[0] if i == 2 else partner(shapes[0]))
    elif mode == "detail" or mode == "same_colour":
        assert all(shape in SHAPES for shape in shapes), "count scenes are left alone"


def _check_pixels(config: SyntheticShapes.Config, s: Sample) -> None:
    """On a clean background: every object's unoccluded pixels have its exact colour, occluders
    are theirs, the rest is background (mid-grey, or a photo within its contrast bound), and each
    object keeps at least 1 - occlusion of its pixels visible."""
    image = s.image.permute(1, 2, 0).int()
    size = config.image_size
    covered = torch.zeros(size, size, dtype=torch.bool)
    hidden = torch.zeros(size, size, dtype=torch.bool)
    for obj in s.meta["objects"]:
        if obj.get("occluder") is not None:
            x0, y0, x1, y1 = obj["occluder"]
            hidden[y0:y1, x0:x1] = True
    assert (image[hidden] == torch.tensor(OCCLUDER)).all()
    for obj in s.meta["objects"]:
        x0, y0, x1, y1 = obj["box"]
        mask = torch.zeros(size, size, dtype=torch.bool)
        mask[y0:y1, x0:x1] = shape_mask(obj["shape"], x1 - x0)
        covered |= mask
        visible = mask & ~hidden
        assert (image[visible] == torch.tensor(COLOURS[obj["colour"]])).all()
        assert visible.sum() >= (1 - config.occlusion) * mask.sum() - 1e-9 and visible.any()
    background = image[~covered & ~hidden]
    bound = 0 if config.background == "noise" else math.ceil(128 * PHOTO_CONTRAST)
    assert (background - 128).abs().max() <= bound


@settings(max_examples=60, deadline=None)
@given(config=dial_configs(), index=st.integers(0, 49))
def test_any_dial_setting_keeps_the_scene_honest(config: SyntheticShapes.Config, index: int):
    """Scenes fit, never overlap, keep their referent unique and their answer right; boxes match
    the drawn pixels; sizes stay in range; occluded objects stay partly visible; and the
    counterfactual changes the answer and only the pixels of the object it edits."""
    split = SyntheticShapes(config).split("val")
    s = split[index]
    assert s.image.shape == (3, config.image_size, config.image_size)
    assert set(s.question.split()) <= set(SyntheticShapes(config).corpus())
    _check_scene(config, s)
    _check_pixels(config, s)
    try:
        changed = split.counterfactual(index)
    except ValueError as exc:  # a position scene that fills every cell: no room to move to
        assert s.category == "position" and "fill every grid cell" in str(exc)
        return
    _check_scene(config, changed)
    _check_pixels(config, changed)
    assert (changed.question, changed.options) == (s.question, s.options)
    assert changed.answer != s.answer
    before = {tuple(o["box"]): o for o in s.meta["objects"]}
    after = {tuple(o["box"]): o for o in changed.meta["objects"]}
    touched = [before[b] for b in before.keys() - after.keys()]
    touched += [after[b] for b in after.keys() - before.keys()]
    touched += [after[b] for b in before.keys() & after.keys() if before[b] != after[b]]
    outside = torch.ones(s.image.shape[1:], dtype=torch.bool)
    for obj in touched:
        for x0, y0, x1, y1 in filter(None, (obj["box"], obj.get("occluder"))):
            outside[y0:y1, x0:x1] = False
    assert torch.equal(s.image[:, outside], changed.image[:, outside])


def _side_probabilities(area: tuple[float, float], image_size: int) -> dict[int, float]:
    """Reference for the targets' side: the area log-uniform in ``area``, its square root
    rounded to whole pixels and clamped to the range's sides; integrated per side."""
    lo, hi = area_sides(area, image_size)
    log_lo, log_hi = math.log(area[0]), math.log(area[1])
    probabilities = {}
    for side in range(lo, hi + 1):
        low = -math.inf if side == lo else math.log(((side - 0.5) / image_size) ** 2)
        high = math.inf if side == hi else math.log(((side + 0.5) / image_size) ** 2)
        probabilities[side] = (min(high, log_hi) - max(low, log_lo)) / (log_hi - log_lo)
    return probabilities


def test_target_areas_fill_the_relative_area_buckets_as_drawn() -> None:
    """128 px, targets from 0.2 % to 5.5 % of the image: all three V* buckets are populated,
    in the shares a log-uniform draw gives them (chi-square against the reference)."""
    area = (0.002, 0.055)
    config = SyntheticShapes.Config(
        image_size=128, object_size=None, target_area=area, background_noise=0.0
    )
    split = SyntheticShapes(config).split("train")
    n = 600
    counts = Counter()
    for i in range(n):
        s = split[i]
        counts[_bucket(min((b[2] - b[0]) ** 2 for b in s.boxes) / 128**2)] += 1
    expected = Counter()
    for side, p in _side_probabilities(area, 128).items():
        expected[_bucket(side * side / 128**2)] += p * n
    assert sorted(counts) == [0, 1, 2], counts
    assert abs(sum(expected.values()) - n) < 1e-6
    chi = sum((counts[b] - expected[b]) ** 2 / expected[b] for b in range(3))
    assert chi < 13.8, (counts, expected)  # p = 0.001 at 2 degrees of freedom


def test_distractor_sides_follow_the_targets_side() -> None:
    config = SyntheticShapes.Config(image_size=128, object_size=None, target_area=(0.002, 0.055))
    split = SyntheticShapes(config).split("test")
    lo, hi = area_sides(config.target_area, 128)
    for i in range(100):
        s = split[i]
        side = s.boxes[0][2] - s.boxes[0][0]
        for obj in s.meta["objects"]:
            other = obj["box"][2] - obj["box"][0]
            assert max(lo, round(side * 0.9)) <= other <= min(hi, round(side * 1.1))


@pytest.mark.parametrize(
    ("distractors", "tasks"),
    [("same_colour", ["position"]), ("detail", ["colour", "shape", "position"])],
)
def test_harder_distractors_keep_answers_uniform(distractors: str, tasks: list[str]) -> None:
    """In canonical option order, the right option's place is uniform: the option set says
    nothing about the answer."""
    config = SyntheticShapes.Config(distractors=distractors, tasks=tasks, shuffle_options=False)
    split = SyntheticShapes(config).split("train")
    places = Counter(OPTION_LETTERS.index(split[i].answer) for i in range(N))
    assert _chi_square(places, N, 4) < 16.3  # p = 0.001 at 3 degrees of freedom


@pytest.mark.parametrize(
    ("distractors", "tasks"),
    [("same_colour", ["position", "count"]), ("detail", ["colour", "shape", "position", "count"])],
)
def test_distractor_settings_keep_their_promise(distractors: str, tasks: list[str]) -> None:
    """Every task of 120 scenes, each with its full clutter (4-6 distractors)."""
    config = SyntheticShapes.Config(
        image_size=96, distractors=distractors, tasks=tasks, num_distractors=(4, 6)
    )
    split = SyntheticShapes(config).split("val")
    samples = [split[i] for i in range(120)]
    assert {s.category for s in samples} == set(tasks)
    for s in samples:
        _check_scene(config, s)


def test_detail_pairs_differ_only_by_a_visible_detail() -> None:
    """At every side the ambiguity check allows (6 px up), each variant is its base shape less
    a detail of at least a 2 x 2 block's worth of pixels and at most a quarter of the shape; and
    below 6 px some shapes coincide, so no config can draw them there."""
    for side in range(6, 41):
        assert ambiguous_shapes(side, ALL_SHAPES) is None
        for base, variant in DETAIL_PAIRS:
            a, b = shape_mask(base, side), shape_mask(variant, side)
            detail = int((a & ~b).sum())
            assert not (b & ~a).any() and 4 <= detail <= a.sum() / 4, (base, side)
    assert all(ambiguous_shapes(side, ALL_SHAPES) for side in range(3, 6))


def test_occluders_hide_what_they_promise() -> None:
    """occlusion 0.5 on 10-16 px objects: every object of a count scene is behind a bar, each
    keeps at least half of its pixels, and the bars hide a substantial share on average."""
    config = SyntheticShapes.Config(
        image_size=128, object_size=(10, 16), occlusion=0.5, tasks=["count"], background_noise=0
    )
    split = SyntheticShapes(config).split("test")
    hidden_shares = []
    for i in range(40):
        s = split[i]
        _check_pixels(config, s)
        labels = s.image.permute(1, 2, 0).int()
        for obj in s.meta["objects"]:
            x0, y0, x1, y1 = obj["box"]
            mask = shape_mask(obj["shape"], x1 - x0)
            painted = (labels[y0:y1, x0:x1] == torch.tensor(COLOURS[obj["colour"]])).all(-1)
            hidden_shares.append(1 - (painted & mask).sum().item() / mask.sum().item())
    assert 0.3 < sum(hidden_shares) / len(hidden_shares) <= 0.5


def test_photos_are_scikit_learns_sample_images() -> None:
    """Decoded from the package folder, they are exactly what load_sample_images returns."""
    from sklearn.datasets import load_sample_images

    reference = load_sample_images().images
    assert len(photos()) == len(reference) == 2
    for ours, theirs in zip(photos(), reference, strict=True):
        assert torch.equal(ours.permute(1, 2, 0).to(torch.uint8), torch.tensor(theirs))


def test_photo_backgrounds_are_real_seeded_and_bounded() -> None:
    config = SyntheticShapes.Config(background="photo", background_noise=0.0)
    split = SyntheticShapes(config).split("train")
    a, b = split[0], split[1]
    assert torch.equal(a.image, SyntheticShapes(config).split("train")[0].image)
    assert photos() is photos()
    grey = SyntheticShapes(SyntheticShapes.Config(background_noise=0.0)).split("train")[0]
    assert a.question == grey.question and a.meta["objects"] == grey.meta["objects"]
    for s in (a, b):
        _check_pixels(config, s)
        free = torch.ones(64, 64, dtype=torch.bool)
        for x0, y0, x1, y1 in (o["box"] for o in s.meta["objects"]):
            free[y0:y1, x0:x1] = False
        pixels = s.image.permute(1, 2, 0)[free].float()
        assert pixels.std(0).min() > 2, "a photo's texture, not a flat fill"
    crops = [split[i].image[:, :8, :8] for i in range(8)]  # corners rarely hold an object
    assert len({c.numpy().tobytes() for c in crops}) == 8, "each sample its own crop"


def test_missing_photos_are_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import crystalkit.data.backgrounds as backgrounds

    monkeypatch.setattr(backgrounds.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValidationError, match=r"sample photos .* were not found; install"):
        SyntheticShapes.Config(background="photo")
