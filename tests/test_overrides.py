"""CLI overrides (``key.sub=value``, ``~key``): property tests of the parser and the applier against a
small reference model, plus the error messages of malformed overrides."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from crystalkit.config.overrides import Override, apply_override, parse_override
from crystalkit.errors import RecipeError

# -- strategies -------------------------------------------------------------------------------

# a few fixed names so generated keys often hit generated trees, plus arbitrary valid segments
SEGMENTS = st.one_of(
    st.sampled_from(["train", "lr", "a", "b", "x-y", "_p", "0", "1"]),
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_\-]{0,5}", fullmatch=True),
    st.from_regex(r"[0-9]{1,2}", fullmatch=True),
)
KEYS = st.lists(SEGMENTS, min_size=1, max_size=4).map(tuple)

TEXT = st.text(st.characters(codec="utf-8", categories=("L", "N", "P", "S", "Zs")), max_size=12)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    TEXT,
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(SEGMENTS, inner, max_size=3),
    max_leaves=6,
)
TREES = st.dictionaries(
    SEGMENTS,
    st.recursive(
        SCALARS | st.lists(SCALARS, max_size=3),
        lambda inner: (
            st.dictionaries(SEGMENTS, inner, max_size=3)
            | st.lists(st.dictionaries(SEGMENTS, inner, max_size=2), max_size=2)
        ),
        max_leaves=10,
    ),
    max_size=4,
)


def flow_dump(value: Any) -> str:
    """``value`` as one line of YAML flow style, the way a user types it after ``=``."""
    text = yaml.safe_dump(value, default_flow_style=True, width=2**31, allow_unicode=True)
    return text.removesuffix("\n").removesuffix("\n...").strip()


# -- reference model --------------------------------------------------------------------------


class Invalid(Exception):
    """The reference model says this override must be rejected."""


def _step(node: Any, segment: str) -> Any:
    if isinstance(node, list):
        if not segment.isdigit() or int(segment) >= len(node):
            raise Invalid
        return int(segment)
    if isinstance(node, dict):
        return segment
    raise Invalid  # a scalar has no keys


def reference_apply(tree: dict, path: tuple[str, ...], value: Any, delete: bool) -> dict:
    """What applying the override should produce (on a copy)."""
    tree = copy.deepcopy(tree)
    node: Any = tree
    for segment in path[:-1]:
        slot = _step(node, segment)
        if isinstance(node, dict) and node.get(slot) is None:
            if delete:
                return tree  # deleting below a missing key: nothing to do
            node[slot] = {}
        node = node[slot]
    slot = _step(node, path[-1])
    if not delete:
        node[slot] = copy.deepcopy(value)
    elif isinstance(node, list):
        del node[slot]
    else:
        node.pop(slot, None)
    return tree


def read(tree: Any, path: tuple[str, ...]) -> Any:
    for segment in path:
        tree = tree[int(segment)] if isinstance(tree, list) else tree[segment]
    return tree


def paths_of(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    items = enumerate(tree) if isinstance(tree, list) else tree.items()
    out = []
    for key, sub in items:
        path = (*prefix, str(key))
        out.append(path)
        if isinstance(sub, dict | list):
            out.extend(paths_of(sub, path))
    return out


# -- properties -------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(tree=TREES, path=KEYS, value=VALUES)
@example(tree={"train": {"lr": 0.1}}, path=("train", "lr"), value=3.0e-4)
@example(tree={"train": {"lr": 0.1}}, path=("train", "lr", "x"), value=1)
@example(tree={"o": [{"w": 1}]}, path=("o", "0", "w"), value=2)
@example(tree={"o": [{"w": 1}]}, path=("o", "5", "w"), value=2)
@example(tree={"a": None}, path=("a", "b"), value=[1, "two", None])
def test_set_then_read_returns_the_value_and_touches_nothing_else(tree, path, value):
    text = f"{'.'.join(path)}={flow_dump(value)}"
    assume(yaml.safe_load(flow_dump(value)) == value)  # a PyYAML quirk is not ours to test
    override = parse_override(text)
    assert override == Override(path, value, False)
    assert override.key == ".".join(path)
    try:
        expected = reference_apply(tree, path, value, delete=False)
    except Invalid:
        before = copy.deepcopy(tree)
        with pytest.raises(RecipeError) as info:
            apply_override(tree, override)
        assert repr(override.key) in str(info.value)
        assert tree == before  # a rejected override changes nothing
        return
    apply_override(tree, override)
    assert read(tree, path) == value
    assert tree == expected  # every other key is untouched


@settings(max_examples=100, deadline=None)
@given(tree=TREES, data=st.data())
def test_delete_removes_exactly_that_key(tree, data):
    existing = paths_of(tree)
    assume(existing)
    path = data.draw(st.sampled_from(existing))
    expected = reference_apply(tree, path, None, delete=True)
    parent = read(tree, path[:-1])
    length = len(parent)
    apply_override(tree, parse_override("~" + ".".join(path)))
    assert tree == expected
    assert len(parent) == length - 1
    if isinstance(parent, dict):
        assert path[-1] not in parent


@settings(max_examples=100, deadline=None)
@given(tree=TREES, path=KEYS)
def test_delete_of_any_key_matches_the_reference(tree, path):
    text = "~" + ".".join(path)
    try:
        expected = reference_apply(tree, path, None, delete=True)
    except Invalid:
        before = copy.deepcopy(tree)
        with pytest.raises(RecipeError, match="override"):
            apply_override(tree, parse_override(text))
        assert tree == before
        return
    apply_override(tree, parse_override(text))
    assert tree == expected


@settings(max_examples=200, deadline=None)
@given(
    text=st.one_of(
        st.text(max_size=30),
        st.builds("{}={}".format, st.text(max_size=8), st.text(max_size=20)),
        st.builds("~{}".format, st.text(max_size=12)),
        st.builds("{}={}".format, KEYS.map(".".join), st.text(max_size=20)),
    )
)
@example("seed=2020-13-45")  # PyYAML raises ValueError building an impossible date
@example("when=2001-12-14t21:59:43.10-99:99")
@example("steps=!!int abc")
@example("lr=!!float x")
@example("flag=!!bool maybe")  # KeyError inside PyYAML
@example("at=!!timestamp x")  # AttributeError inside PyYAML
@example("deep=" + "[" * 1000)  # RecursionError inside PyYAML
@example("obj=!!python/object:os.system {}")
@example("a=*undefined_alias")
@example("~")
@example("=")
@example("a.=1")
def test_arbitrary_text_parses_or_raises_recipe_error(text):
    try:
        override = parse_override(text)
    except RecipeError as exc:
        message = str(exc)
        assert message.startswith(f"override {text!r}: ")
        assert "\n" not in message
        return
    assert isinstance(override, Override)
    assert override.path
    assert all(override.path)
    assert override.delete == text.startswith("~")


# -- examples ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "path", "value"),
    [
        ("train.lr=0.0003", ("train", "lr"), 0.0003),
        ("dataset.tasks=[colour, shape]", ("dataset", "tasks"), ["colour", "shape"]),
        ("train.grad_clip=null", ("train", "grad_clip"), None),
        ("train.grad_clip=", ("train", "grad_clip"), None),
        (
            "backbone.encoder_kwargs={channels: [8, 16]}",
            ("backbone", "encoder_kwargs"),
            {"channels": [8, 16]},
        ),
        ("description=a=b", ("description",), "a=b"),  # only the first '=' separates
        ("objectives.0.weight=2", ("objectives", "0", "weight"), 2),
        (" train.steps =5", ("train", "steps"), 5),
    ],
)
def test_parse_examples(text: str, path: tuple[str, ...], value: Any):
    assert parse_override(text) == Override(path, value, False)


def test_parse_delete():
    assert parse_override("~eval.max_samples") == Override(("eval", "max_samples"), None, True)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train.lr", "expected KEY=VALUE"),
        ("~train.lr=3", "'~KEY' removes a key and takes no '=VALUE'"),
        ("train..lr=1", "is not a dotted path"),
        ("train.l r=1", "is not a dotted path"),
        ("1x.lr=1", "is not a dotted path"),
        ("train/lr=1", "is not a dotted path"),
        ("=1", "is not a dotted path"),
        ("train.lr=[1", "value is not valid YAML"),
        ("train.lr={a: 1", "value is not valid YAML"),
        ("seed=2020-13-45", "value is not valid YAML"),
    ],
)
def test_malformed_overrides_name_the_override(text: str, expected: str):
    with pytest.raises(RecipeError) as info:
        parse_override(text)
    assert str(info.value).startswith(f"override {text!r}: ")
    assert expected in str(info.value)


def test_indexing_into_a_scalar_is_rejected():
    tree = {"train": {"lr": 0.1}}
    with pytest.raises(RecipeError) as info:
        apply_override(tree, parse_override("train.lr.warmup=1"))
    message = str(info.value)
    assert "'train.lr.warmup'" in message
    assert "train.lr is 0.1, not a mapping" in message
    assert tree == {"train": {"lr": 0.1}}


def test_list_index_out_of_range_and_non_numeric_index_are_rejected():
    tree = {"objectives": [{"weight": 1.0}]}
    with pytest.raises(RecipeError, match=r"index 3 is out of range for objectives \(length 1\)"):
        apply_override(tree, parse_override("objectives.3.weight=2"))
    with pytest.raises(RecipeError, match="objectives is a list; use an index, not 'weight'"):
        apply_override(tree, parse_override("objectives.weight=2"))
    with pytest.raises(RecipeError, match="out of range"):
        apply_override(tree, parse_override("~objectives.1"))
    assert tree == {"objectives": [{"weight": 1.0}]}


def test_list_elements_can_be_set_and_deleted():
    tree = {"objectives": [{"weight": 1.0}, {"weight": 0.5}]}
    apply_override(tree, parse_override("objectives.1.weight=3"))
    assert tree == {"objectives": [{"weight": 1.0}, {"weight": 3}]}
    apply_override(tree, parse_override("~objectives.0"))
    assert tree == {"objectives": [{"weight": 3}]}


def test_missing_and_null_parents_are_created_but_not_for_deletes():
    tree: dict = {"eval": None}
    apply_override(tree, parse_override("~train.lr"))
    apply_override(tree, parse_override("~eval.split"))
    assert tree == {"eval": None}
    apply_override(tree, parse_override("eval.split=val"))
    apply_override(tree, parse_override("backbone.encoder_kwargs.depth=2"))
    assert tree == {"eval": {"split": "val"}, "backbone": {"encoder_kwargs": {"depth": 2}}}


# -- mapping overrides merge like inherit -----------------------------------------------------

RECIPE = "recipes/crystal_default.yaml"


def _load(*overrides: str):
    from conftest import ROOT

    from crystalkit.config.loader import load_recipe

    return load_recipe(ROOT / RECIPE, list(overrides))


def test_a_mapping_override_keeps_the_keys_it_does_not_name():
    base = _load()
    recipe = _load("train={steps: 5}", "backbone={hidden_size: 64}")
    assert recipe.train.steps == 5
    assert recipe.train.model_dump(exclude={"steps"}) == base.train.model_dump(exclude={"steps"})
    assert recipe.backbone.params["hidden_size"] == 64
    assert recipe.backbone.params["feature_stride"] == base.backbone.params["feature_stride"]


def test_a_mapping_override_adds_an_objective_beside_the_others():
    base = _load()
    recipe = _load("objectives={cosine: {weight: 0.5}}")
    assert set(recipe.objectives) == {*base.objectives, "cosine"}
    assert recipe.objectives["kl"] == base.objectives["kl"]


def test_removing_first_replaces_a_section_whole():
    recipe = _load("~objectives", "objectives={cosine: {weight: 0.5}}")
    assert set(recipe.objectives) == {"cosine"}
    assert _load("~objectives").objectives == {}


def test_an_empty_mapping_over_a_section_is_refused_with_the_fix():
    with pytest.raises(RecipeError) as info:
        _load("objectives={}")
    message = str(info.value)
    assert "'~objectives'" in message and "merges nothing" in message and "\n" not in message


def test_a_mapping_naming_another_component_starts_from_its_defaults():
    recipe = _load("corruption={name: mask, fraction: 0.75}")
    assert recipe.corruption.name == "mask"
    assert recipe.corruption.params["fraction"] == 0.75  # blur's radius is not carried over


def test_merging_keeps_provenance_of_the_untouched_keys(tmp_path):
    from crystalkit.config.loader import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("train: {lr: 0.5}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe, ["train={warmup_ratio: 2}"])
    assert str(info.value).startswith("override 'train={warmup_ratio: 2}': train.warmup_ratio")
