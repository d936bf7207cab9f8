"""The generic registry: registration, lookups and their errors, import paths, lazy built-ins, and
the pydantic models derived from component signatures."""

from __future__ import annotations

import sys
import uuid
from collections import OrderedDict
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from crystalkit.errors import UsageError
from crystalkit.params import config_model
from crystalkit.registry import Registry, resolve_import_path


def _registry(kind: str = "things") -> Registry:
    # a group no distribution declares, so only what the test registers is visible
    return Registry(kind, entry_point_group=f"crystalkit.test_{uuid.uuid4().hex}")


# -- registration -----------------------------------------------------------------------------


def test_register_decorator_uses_docstring_first_line_as_description():
    reg = _registry()

    @reg.register("gaussian_blur")
    class GaussianBlur:
        """Blur with a Gaussian kernel.

        Longer explanation that ``crystalkit list`` must not show.
        """

    entry = reg.entries()[0]
    assert reg.get("gaussian_blur") is GaussianBlur
    assert entry.name == "gaussian_blur"
    assert entry.description == "Blur with a Gaussian kernel."
    assert entry.source == "builtin"


def test_register_explicit_description_and_default_name():
    reg = _registry()

    @reg.register(description="explicit text")
    def jpeg(images, generator):
        """Docstring that loses to the explicit description."""
        return images

    @reg.register()
    def undocumented(images, generator):
        return images

    assert reg.names() == ["jpeg", "undocumented"]
    assert reg.entries()[0].description == "explicit text"
    assert reg.entries()[1].description == ""


def test_duplicate_name_with_different_object_raises_and_same_object_is_idempotent():
    reg = _registry()

    def first():
        """First."""

    def second():
        """Second."""

    reg.add("blur", first)
    reg.add("blur", first)  # re-importing a module re-registers the same object: fine
    assert reg.get("blur") is first
    with pytest.raises(ValueError, match=r"'blur' is already registered"):
        reg.add("blur", second)
    assert reg.get("blur") is first


def test_name_with_colon_is_rejected():
    reg = _registry()
    with pytest.raises(ValueError, match="may not contain ':'"):
        reg.add("pkg:thing", object())


# -- lookup errors ----------------------------------------------------------------------------


def test_unknown_name_lists_valid_names_and_suggests_closest():
    reg = _registry()
    for name in ("gaussian_blur", "jpeg", "cutout"):
        reg.add(name, object())
    with pytest.raises(UsageError) as info:
        reg.get("gausian_blur")
    message = str(info.value)
    assert "unknown thing 'gausian_blur'" in message
    assert "did you mean 'gaussian_blur'?" in message
    assert "valid: cutout, gaussian_blur, jpeg" in message
    assert "\n" not in message


def test_unknown_name_without_close_match_has_no_suggestion():
    reg = _registry()
    reg.add("jpeg", object())
    with pytest.raises(UsageError) as info:
        reg.get("zzzzzzzz")
    assert "did you mean" not in str(info.value)
    assert "valid: jpeg" in str(info.value)


def test_unknown_name_in_empty_registry_says_none_registered():
    with pytest.raises(UsageError, match="none registered"):
        _registry().get("anything")


# -- import paths -----------------------------------------------------------------------------


def test_module_attr_path_resolves_including_dotted_attributes():
    reg = _registry()
    import json

    assert reg.get("json:dumps") is json.dumps
    assert reg.get("collections:OrderedDict.fromkeys") == OrderedDict.fromkeys
    assert reg.names() == []  # a path lookup registers nothing


def test_file_path_resolves_and_is_imported_once(tmp_path: Path):
    source = tmp_path / "my_components.py"
    source.write_text(
        "class Sharpen:\n"
        "    '''Sharpen edges.'''\n"
        "    def __init__(self, amount: float = 1.0):\n"
        "        self.amount = amount\n"
    )
    reg = _registry()
    cls = reg.get(f"{source}:Sharpen")
    assert cls.__name__ == "Sharpen"
    assert cls(amount=2.0).amount == 2.0
    assert reg.get(f"{source}:Sharpen") is cls  # cached, not re-executed


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (":attr", "expected 'package.module:attr' or 'file.py:attr'"),
        ("json:", "expected 'package.module:attr' or 'file.py:attr'"),
        ("no_such_module_for_crystalkit_tests:thing", "cannot import module"),
        ("json:JSONDecodr", "has no attribute 'JSONDecodr' (did you mean 'JSONDecoder'?)"),
        ("json:dumps.nope", "has no attribute 'nope'"),
        ("/definitely/not/here/comp.py:Thing", "does not exist"),
    ],
)
def test_bad_import_paths_raise_usage_error_naming_the_problem(spec: str, expected: str):
    with pytest.raises(UsageError) as info:
        resolve_import_path(spec, kind="corruption")
    message = str(info.value)
    assert expected in message
    assert message.startswith(f"corruption {spec!r}")


def test_file_that_fails_to_import_is_a_usage_error_and_can_be_retried(tmp_path: Path):
    source = tmp_path / "broken_component.py"
    source.write_text("raise RuntimeError('boom at import')\n")
    spec = f"{source}:Thing"
    for _ in range(2):  # the half-imported module is not cached
        with pytest.raises(UsageError, match=r"importing .* failed: boom at import"):
            _registry().get(spec)
    source.write_text("Thing = 42\n")
    assert _registry().get(spec) == 42


def test_missing_attribute_in_file_suggests_closest(tmp_path: Path):
    source = tmp_path / "comp_attr.py"
    source.write_text("class Posterize:\n    pass\n")
    with pytest.raises(
        UsageError, match=r"has no attribute 'Posterise' \(did you mean 'Posterize'\?\)"
    ):
        _registry().get(f"{source}:Posterise")


# -- lazy built-ins ---------------------------------------------------------------------------


@pytest.fixture
def lazy_builtin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fresh registry whose built-in module (in tmp_path) registers ``lazy_thing`` on import."""
    suffix = uuid.uuid4().hex
    holder, module = f"ck_test_holder_{suffix}", f"ck_test_builtin_{suffix}"
    reg = _registry()
    holder_module = type(sys)(holder)
    holder_module.REG = reg  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, holder, holder_module)
    (tmp_path / f"{module}.py").write_text(
        f"from {holder} import REG\n\n"
        "@REG.register('lazy_thing')\n"
        "class LazyThing:\n"
        "    '''Registered when the built-in module is imported.'''\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reg._builtin_modules = (module,)
    yield reg, module
    sys.modules.pop(module, None)


def test_builtin_modules_load_lazily_on_first_lookup(lazy_builtin):
    reg, module = lazy_builtin
    assert module not in sys.modules  # creating the registry imported nothing
    assert reg.get("lazy_thing").__name__ == "LazyThing"
    assert module in sys.modules
    assert reg.entries()[0].description == "Registered when the built-in module is imported."


@pytest.mark.parametrize("first_use", ["names", "contains", "len", "unknown"])
def test_every_kind_of_lookup_loads_builtins(lazy_builtin, first_use: str):
    reg, _ = lazy_builtin
    if first_use == "names":
        assert reg.names() == ["lazy_thing"]
    elif first_use == "contains":
        assert "lazy_thing" in reg
    elif first_use == "len":
        assert len(reg) == 1
    else:
        with pytest.raises(UsageError, match="did you mean 'lazy_thing'"):
            reg.get("lazy_thinh")


# -- config_model -----------------------------------------------------------------------------


class Posterize:
    """Quantise channels."""

    def __init__(self, levels: int, *, strength: float = 0.5, mode: str = "round", _private=1):
        self.levels = levels


def cutout(size: int = 8, fill: float | None = None) -> None:
    """A function component."""


def flexible(scale: float = 1.0, **extra) -> None:
    """Takes arbitrary extra keyword arguments."""


class WithConfig:
    """Declares its parameters as a nested pydantic model."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        sigma: float = 1.0
        kernel: int = 3


def _error_types(exc: ValidationError) -> set[str]:
    return {e["type"] for e in exc.errors()}


def test_config_model_from_class_signature_fills_defaults_and_skips_self():
    model = config_model(Posterize)
    params = model.model_validate({"levels": 3})
    assert params.model_dump() == {"levels": 3, "strength": 0.5, "mode": "round"}
    assert "self" not in model.model_fields
    assert "_private" not in model.model_fields


def test_config_model_from_signature_is_strict():
    model = config_model(Posterize)
    with pytest.raises(ValidationError) as info:
        model.model_validate({"levels": 3, "levles": 4})
    assert _error_types(info.value) == {"extra_forbidden"}
    with pytest.raises(ValidationError) as info:
        model.model_validate({"levels": "many"})
    assert _error_types(info.value) == {"int_parsing"}
    with pytest.raises(ValidationError) as info:
        model.model_validate({})
    assert _error_types(info.value) == {"missing"}


def test_config_model_from_function_signature():
    model = config_model(cutout)
    assert model.model_validate({}).model_dump() == {"size": 8, "fill": None}
    assert model.model_validate({"fill": 0.5}).model_dump() == {"size": 8, "fill": 0.5}
    with pytest.raises(ValidationError):
        model.model_validate({"fill": "grey"})


def test_config_model_var_keyword_allows_extra_keys():
    params = config_model(flexible).model_validate({"scale": 2, "anything": [1, 2]})
    assert params.model_dump() == {"scale": 2.0, "anything": [1, 2]}


def test_config_model_uses_nested_pydantic_config():
    model = config_model(WithConfig)
    assert model is WithConfig.Config
    assert model.model_validate({"kernel": 5}).model_dump() == {"sigma": 1.0, "kernel": 5}
    with pytest.raises(ValidationError) as info:
        model.model_validate({"sigmaa": 2.0})
    assert _error_types(info.value) == {"extra_forbidden"}
