"""Component contracts (crystalkit.testing): built-ins keep them, breaches are one line naming the
problem, recipes naming a breaking plugin fail at load time, and third-party code that raises at
train time is a PluginError naming its file:line (CLI exit code 3; ``--debug`` shows the
traceback)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from cli_process import finish, start, stderr_of
from hypothesis import strategies as st
from typer.testing import CliRunner

from crystalkit.cli import app
from crystalkit.corruptions import build_corruption
from crystalkit.corruptions.basic import GaussianNoise
from crystalkit.corruptions.contract import call_corruption
from crystalkit.crystal.method import Method
from crystalkit.errors import PluginError, UsageError, blame
from crystalkit.objectives.alignment import AnswerKL
from crystalkit.registries import CORRUPTIONS, OBJECTIVES
from crystalkit.runs.build import build_backbone, build_dataset
from crystalkit.testing import (
    ContractError,
    assert_corruption_contract,
    assert_objective_contract,
    check_corruption,
    check_objective,
    dummy_images,
    dummy_outputs,
    image_batches,
)

ROOT = Path(__file__).resolve().parents[1]
DIRECT = ROOT / "recipes" / "direct_finetune.yaml"

# -- built-ins keep their contracts ---------------------------------------------------------


def _builtin(registry) -> list[str]:
    return [e.name for e in registry.entries() if e.source == "builtin"]


@pytest.mark.parametrize("name", _builtin(CORRUPTIONS))
def test_every_builtin_corruption_keeps_the_contract(name: str):
    corruption = build_corruption(name)
    check_corruption(corruption)
    check_corruption(corruption, dummy_images(3, 32, 24, seed=1, dtype=torch.float64), seed=5)


def test_a_composition_keeps_the_contract():
    check_corruption(
        build_corruption({"name": "compose", "steps": [{"name": "blur"}, {"name": "noise"}]})
    )


@pytest.mark.parametrize("name", _builtin(OBJECTIVES))
def test_every_builtin_objective_keeps_the_contract(name: str):
    value = check_objective(OBJECTIVES.get(name)())
    assert value.ndim == 0 and value.requires_grad


@pytest.mark.parametrize(
    "params", [{"layers": (0, -1)}, {"layers": (-1,), "divergence": "js"}, {"divergence": "mse"}]
)
def test_attention_objective_with_several_layers_keeps_the_contract(params: dict):
    check_objective(OBJECTIVES.get("attention")(**params))


def test_dummy_outputs_follow_the_declarations():
    outputs = dummy_outputs(OBJECTIVES.get("attention")(layers=(1, -1)), batch=3, latents=5)
    assert set(outputs.intact_attention) == set(outputs.corrupted_attention) == {1, -1}
    rows = outputs.intact_attention[-1]
    assert rows.shape == (3, 3, 5) and rows.requires_grad
    torch.testing.assert_close(rows.sum(-1), torch.ones(3, 3))
    assert outputs.intact_hidden is None and outputs.corrupted_logits.requires_grad
    hidden = dummy_outputs(OBJECTIVES.get("cosine")(), hidden=6)
    assert hidden.corrupted_hidden.shape == (2, 3, 6)
    assert dummy_outputs(OBJECTIVES.get("attention")(), latents=0).intact_attention == {}


# -- breaches -------------------------------------------------------------------------------


class OneChannel:
    def __call__(self, images, generator):
        return images[:, :1].clone()


class ToDouble:
    def __call__(self, images, generator):
        return images.double()


class OutOfRange:
    def __call__(self, images, generator):
        return images * 2 - 0.5


class NotFinite:
    def __call__(self, images, generator):
        return images / 0.0


class GlobalRandom:
    def __call__(self, images, generator):
        return (images + 0.1 * torch.rand(images.shape)).clamp(0, 1)  # ignores its generator


class InPlace:
    def __call__(self, images, generator):
        return images.mul_(0.5)


class Raises:
    def __call__(self, images, generator):
        raise ValueError("no luck")


class NotATensor:
    def __call__(self, images, generator):
        return images.tolist()


@pytest.mark.parametrize(
    "corruption, expected",
    [
        (OneChannel(), "returned shape [2, 1, 16, 16] for images [2, 3, 16, 16]; a corruption "
         "must keep shape, dtype and device"),
        (ToDouble(), "returned dtype torch.float64 for images of dtype torch.float32"),
        (OutOfRange(), "must return values within [0, 1]"),
        (NotFinite(), "non-finite values"),
        (GlobalRandom(), "different images for two generators seeded 0"),
        (InPlace(), "modified its input images in place"),
        (Raises(), "raised ValueError: no luck"),
        (NotATensor(), "returned list, not a tensor"),
    ],
)  # fmt: skip
def test_corruption_breaches_are_one_line_contract_errors(corruption, expected: str):
    with pytest.raises(ContractError) as info:
        check_corruption(corruption)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    assert isinstance(info.value, AssertionError) and isinstance(info.value, PluginError)


class Declared:
    attention_layers: tuple[int, ...] = ()
    needs_hidden = False


class PerSample(Declared):
    def __call__(self, outputs):
        return outputs.corrupted_logits.mean(dim=(1, 2))


class NaNLoss(Declared):
    def __call__(self, outputs):
        return outputs.corrupted_logits.sum() * math.nan


class Constant(Declared):
    def __call__(self, outputs):
        return torch.tensor(0.5)


class PythonFloat(Declared):
    def __call__(self, outputs):
        return outputs.corrupted_logits.mean().item()


class ReadsUndeclaredHidden(Declared):
    def __call__(self, outputs):
        return (outputs.intact_hidden - outputs.corrupted_hidden).pow(2).mean()


class Undeclared:
    def __call__(self, outputs):
        return outputs.corrupted_logits.mean()


class BadLayers(Declared):
    attention_layers = (-1.0,)

    def __call__(self, outputs):
        return outputs.corrupted_logits.mean()


@pytest.mark.parametrize(
    "objective, expected",
    [
        (PerSample(), "returned a tensor of shape [2]; an objective must return a scalar"),
        (NaNLoss(), "returned nan"),
        (Constant(), "does not require grad"),
        (PythonFloat(), "returned float"),
        (ReadsUndeclaredHidden(), "raised TypeError"),
        (Undeclared(), "does not declare attention_layers and needs_hidden"),
        (BadLayers(), "declares attention_layers=(-1.0,); expected a tuple of ints"),
    ],
)
def test_objective_breaches_are_one_line_contract_errors(objective, expected: str):
    with pytest.raises(ContractError) as info:
        check_objective(objective)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


# -- property-based helpers -------------------------------------------------------------------


def test_hypothesis_helpers_accept_good_components():
    assert_corruption_contract(
        GaussianNoise,
        params=st.fixed_dictionaries({"std": st.tuples(st.just(0.0), st.floats(0.0, 1.0))}),
        max_examples=10,
    )
    assert_corruption_contract(lambda: build_corruption("erase"), max_examples=10)
    assert_objective_contract(
        AnswerKL, params=st.fixed_dictionaries({"fraction": st.floats(0.05, 1.0)}), max_examples=10
    )
    assert_objective_contract(OBJECTIVES.get("attention"), max_examples=10)


class SmallOnly:
    """Keeps the contract on 16 x 16 images, breaks it on odd widths."""

    def __call__(self, images, generator):
        return images[..., : images.shape[-1] // 2 * 2].clone()


class NeedsLatents(Declared):
    attention_layers = (-1,)

    def __call__(self, outputs):  # KeyError at steps without latents
        return outputs.corrupted_attention[-1].mean()


def test_hypothesis_helpers_reject_bad_components():
    check_corruption(SmallOnly())  # one tiny batch does not find it
    with pytest.raises(ContractError, match="returned shape"):
        assert_corruption_contract(SmallOnly, max_examples=20)
    check_objective(NeedsLatents())
    with pytest.raises(ContractError, match="raised KeyError"):
        assert_objective_contract(NeedsLatents, max_examples=50)


def test_image_batches_draw_small_batches_in_range():
    seen = []

    from hypothesis import given, settings

    @settings(max_examples=30, deadline=None)
    @given(image_batches(max_side=8, max_batch=2))
    def draw(images):
        seen.append((images.shape, images.dtype))
        assert images.dtype in (torch.float32, torch.float64) and images.shape[1] == 3
        assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0

    draw()
    assert all(1 <= s[0] <= 2 and 1 <= s[2] <= 8 and 1 <= s[3] <= 8 for s, _ in seen)
    assert {dtype for _, dtype in seen} == {torch.float32, torch.float64}


# -- load time: a recipe naming a breaking component ---------------------------------------

PLUGIN = '''\
import torch


class OneChannel:
    def __call__(self, images, generator):
        return images[:, :1].clone()


def _check(images):
    if images.shape[0] > 2:
        raise ValueError("more than two images")


class BigBatchFails:
    """Keeps the contract on the two-image check, raises on a training batch."""

    def __call__(self, images, generator):
        _check(images)
        return images.clone()


class BigBatchObjective:
    attention_layers = ()
    needs_hidden = False

    def __call__(self, outputs):
        if outputs.targets.shape[0] > 2:
            raise RuntimeError("batch too big")
        return outputs.corrupted_logits.logsumexp(-1).mean()
'''


@pytest.fixture
def plugin_file(tmp_path: Path) -> Path:
    path = tmp_path / "contract_plugin.py"
    path.write_text(PLUGIN)
    return path


def _line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_recipe_naming_a_breaking_corruption_fails_at_load_with_one_line(
    tiny_recipe, plugin_file: Path
):
    with pytest.raises(PluginError) as info:
        tiny_recipe(f"corruption.name={plugin_file}:OneChannel")
    message = str(info.value)
    assert "\n" not in message
    assert f"corruption: corruption '{plugin_file}:OneChannel' (file {plugin_file})" in message
    assert "returned shape [2, 1, 32, 32] for images [2, 3, 32, 32]" in message  # dataset size
    assert f"defined at {plugin_file}:{_line_of(plugin_file, 'class OneChannel')}" in message


def test_recipe_naming_an_objective_breaking_its_contract_fails_at_load(
    tmp_path: Path, tiny_recipe
):
    path = tmp_path / "objective_plugin.py"
    path.write_text(
        "class Loss:\n    attention_layers = ()\n    needs_hidden = False\n\n"
        "    def __call__(self, outputs):\n        return outputs.intact_hidden.mean()\n"
    )
    with pytest.raises(PluginError) as info:
        tiny_recipe("method=crystal", f"objectives={{own: {{name: {path}:Loss}}}}")
    message = str(info.value)
    assert "objectives.own: objective" in message and f"(file {path})" in message
    assert "raised AttributeError" in message and f"at {path}:6" in message


def test_builtin_breach_at_the_datasets_image_size_is_a_recipe_error(tiny_recipe):
    from crystalkit.errors import RecipeError

    with pytest.raises(RecipeError, match="patch_size=5, got 32x32") as info:
        tiny_recipe("corruption={name: patch_shuffle, patch_size: 5}")
    assert not isinstance(info.value, PluginError)
    tiny_recipe("corruption={name: patch_shuffle, patch_size: 16}")  # divides 32: fine


# -- train time: third-party code that raises --------------------------------------------


def test_plugin_raising_at_train_time_is_a_plugin_error_naming_its_line(
    tiny_recipe, plugin_file: Path
):
    recipe = tiny_recipe(
        "method=crystal",
        "latents.schedule.k=2",
        f"corruption.name={plugin_file}:BigBatchFails",
        f"objectives={{big: {{name: {plugin_file}:BigBatchObjective}}}}",
        "dataset.tasks=[position]",
    )  # both pass their load-time checks
    dataset = build_dataset(recipe)
    method = Method(recipe, build_backbone(recipe, dataset))
    samples = [dataset.split("train")[i] for i in range(4)]
    method.layout(samples[:2], step=0)
    with pytest.raises(PluginError) as info:
        method.layout(samples, step=0)
    message = str(info.value)
    raise_line = _line_of(plugin_file, "raise ValueError")
    assert message == (
        f"corruption '{plugin_file}:BigBatchFails' (file {plugin_file}) raised ValueError: more "
        f"than two images at {plugin_file}:{raise_line}"
    )
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(PluginError) as info:
        method.terms(dummy_outputs(batch=4))
    assert f"objective '{plugin_file}:BigBatchObjective' (file {plugin_file})" in str(info.value)
    assert str(info.value).endswith(
        f"raised RuntimeError: batch too big at {plugin_file}:"
        f"{_line_of(plugin_file, 'raise RuntimeError')}"
    )
    total, terms = method.terms(dummy_outputs(batch=2))
    assert set(terms) == {"ce_intact", "ce_corrupted", "big"} and total.ndim == 0


def test_a_plugin_failing_during_training_names_the_step_and_stage(tiny_recipe, plugin_file):
    from crystalkit.training.trainer import train

    recipe = tiny_recipe(
        "latents.schedule.k=2",
        "train.steps=4",
        "train.batch_size=4",
        "stages=[{name: warm, fraction: 0.5}, {name: crystal, fraction: 0.5, method: crystal, "
        f"corruption: {{name: {plugin_file}:BigBatchFails}}}}]",
    )  # passes the load-time check on two images; a training batch has four
    with pytest.raises(PluginError) as info:
        train(recipe)
    message = str(info.value)
    assert message.startswith(f"step 3/4, stage crystal: corruption '{plugin_file}:BigBatchFails'")
    assert message.endswith(
        f"more than two images at {plugin_file}:{_line_of(plugin_file, 'raise')}"
    )


def test_runtime_shape_change_is_a_plugin_error_not_a_stack_error():
    images = dummy_images(4, 8, 8)
    with pytest.raises(PluginError, match=r"corruption 'x' \(file x.py\) returned shape \[4, 1"):
        call_corruption(OneChannel(), images, torch.Generator(), "corruption 'x'", "file x.py")
    assert call_corruption(InPlace(), images.clone(), torch.Generator(), "c", "s").shape == (
        4, 3, 8, 8,
    )  # fmt: skip


def test_blame_points_into_the_components_code_not_into_torch():
    def inner():
        torch.stack([torch.zeros(2), torch.zeros(3)])

    try:
        inner()
    except RuntimeError as exc:
        where = blame(exc, inner)
    assert where.startswith(f"{__file__}:")
    assert int(where.rsplit(":", 1)[1]) == inner.__code__.co_firstlineno + 1


def test_import_time_error_of_a_file_component_names_file_and_line(tmp_path: Path):
    path = tmp_path / "explodes_on_import.py"
    path.write_text("import math\n\nvalue = math.sqrt(-1)\n")
    with pytest.raises(UsageError) as info:
        CORRUPTIONS.get(f"{path}:Thing")
    message = str(info.value)
    assert "failed: math domain error" in message
    assert f"(ValueError at {path}:3)" in message
    syntax = tmp_path / "bad_syntax.py"
    syntax.write_text("x = 1\ndef broken(:\n")
    with pytest.raises(UsageError, match=rf"at {syntax}:2\)"):
        CORRUPTIONS.get(f"{syntax}:x")


# -- the command line ---------------------------------------------------------------------


@pytest.fixture
def breaking_recipe(tmp_path: Path, plugin_file: Path) -> Path:
    recipe = tmp_path / "plugged.yaml"
    recipe.write_text(f"inherit: {DIRECT}\ncorruption: {{name: '{plugin_file}:OneChannel'}}\n")
    return recipe


def test_cli_reports_a_plugin_error_as_one_line_with_exit_code_3(breaking_recipe: Path):
    result = CliRunner().invoke(app, ["recipe", "validate", str(breaking_recipe)])
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output
    lines = stderr_of(result).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "breaks the corruption contract" in lines[0] and "OneChannel" in lines[0]


def test_cli_debug_reraises_errors(breaking_recipe: Path, monkeypatch: pytest.MonkeyPatch):
    result = CliRunner().invoke(app, ["--debug", "recipe", "validate", str(breaking_recipe)])
    assert isinstance(result.exception, PluginError)
    result = CliRunner().invoke(app, ["recipe", "validate", str(breaking_recipe)])
    assert result.exit_code == 3  # --debug does not stick to later commands
    monkeypatch.setenv("CRYSTALKIT_DEBUG", "1")
    result = CliRunner().invoke(app, ["recipe", "show", "missing.yaml"])
    assert isinstance(result.exception, UsageError)


def test_cli_debug_prints_the_traceback(breaking_recipe: Path):
    process = finish(start("--debug", "recipe", "validate", str(breaking_recipe)))
    assert process.returncode == 1
    assert "Traceback (most recent call last)" in process.stderr
    assert "crystalkit.errors.PluginError" in process.stderr


# -- checks at every step, blame, parameters drawn from the signature ------------------------


class OutOfRangeOnBigBatches:
    """Keeps the contract on the load check's two images; leaves [0, 1] on a training batch."""

    def __call__(self, images, generator):
        return images * 2 if images.shape[0] > 4 else images.clone()


def test_values_out_of_range_are_caught_at_the_step_not_only_at_load():
    corruption = OutOfRangeOnBigBatches()
    check_corruption(corruption)  # the load check passes
    with pytest.raises(PluginError, match=r"returned values in \[0, 2\] for images in \[0, 1\]"):
        call_corruption(corruption, dummy_images(8, 8, 8), torch.Generator(), "c", "file c.py")


class NotCallable:
    """A corruption class that forgot ``__call__``."""


def test_a_class_without_call_is_blamed_on_the_class(tiny_recipe, tmp_path: Path):
    path = tmp_path / "nocall.py"
    path.write_text(
        "class NoCall:\n    def corrupt(self, images, generator):\n        return images\n"
    )
    with pytest.raises(ContractError, match="is a NotCallable, not callable"):
        check_corruption(NotCallable())
    with pytest.raises(PluginError) as info:
        tiny_recipe("method=crystal", f"corruption.name={path}:NoCall")
    assert f"(defined at {path}:1)" in str(info.value) and "testing.py" not in str(info.value)


def test_signature_params_draw_within_the_declared_types_and_bounds():
    from hypothesis import given, settings

    from crystalkit.testing import signature_params

    class Typed:
        def __init__(
            self, p: float = 0.5, n: int = 3, flip: bool = False, pair: tuple[float, float] = (1, 2)
        ):
            self.kwargs = {"p": p, "n": n, "flip": flip, "pair": pair}

    seen: list[dict] = []

    @settings(max_examples=60, deadline=None)
    @given(kwargs=signature_params(Typed))
    def draw(kwargs):
        seen.append(kwargs)
        assert set(kwargs) <= {"p", "n", "flip", "pair"}
        assert 0 <= kwargs.get("p", 0) <= 1 and 0 <= kwargs.get("n", 0) <= 6
        assert isinstance(kwargs.get("flip", False), bool) and len(kwargs.get("pair", (0, 0))) == 2

    draw()
    assert {key for kwargs in seen for key in kwargs} == {"p", "n", "flip", "pair"}  # all drawn
    assert any(not kwargs for kwargs in seen) or len(seen) > 1  # defaults are kept too


def test_drawn_parameters_find_a_breach_the_defaults_hide():
    class BreaksAtHighStrength:
        def __init__(self, strength: float = 0.1):
            self.strength = strength

        def __call__(self, images, generator):
            return images + self.strength if self.strength > 0.5 else images.clone()

    check_corruption(BreaksAtHighStrength())  # the default keeps the contract
    with pytest.raises(ContractError, match="returned values in"):
        assert_corruption_contract(BreaksAtHighStrength, max_examples=40)


def test_a_file_components_module_name_is_the_same_in_every_process(tmp_path: Path):
    import subprocess
    import sys

    from crystalkit.registry import file_module_name

    path = tmp_path / "my-plugin.py"
    code = "from pathlib import Path; from crystalkit.registry import file_module_name; "
    code += f"print(file_module_name(Path({str(path)!r})))"
    names = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        for _ in range(2)
    }
    assert names == {file_module_name(path)}
    assert file_module_name(path).startswith("crystalkit_file_my_plugin_")
