"""Built-in corruptions: contract (shape, dtype, range, determinism) and per-corruption semantics."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crystalkit.corruptions import Corruption, build_corruption
from crystalkit.corruptions.basic import (
    ColorJitter,
    GaussianBlur,
    PatchMask,
    PatchShuffle,
    RandomErase,
    hsv_to_rgb,
    rgb_to_hsv,
)
from crystalkit.errors import UsageError
from crystalkit.registries import CORRUPTIONS

BUILTINS = ["none", "blur", "erase", "mask", "patch_shuffle", "noise", "color_jitter", "compose"]
RANDOM = [n for n in BUILTINS if n not in ("none", "compose")]
#: a compose spec with real work in it, for the generic contract tests
COMPOSE = {"name": "compose", "steps": [{"name": "blur"}, {"name": "erase"}, {"name": "noise"}]}


def spec_of(name: str) -> dict:
    return COMPOSE if name == "compose" else {"name": name}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(batch: int = 4, height: int = 32, width: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=gen(10_000 + seed))


def pair(lo: float, hi: float) -> st.SearchStrategy:
    return st.tuples(st.floats(lo, hi), st.floats(lo, hi)).map(lambda t: tuple(sorted(t)))


#: parameters within their valid ranges, per corruption
PARAMS: dict[str, st.SearchStrategy] = {
    "none": st.just({}),
    "blur": st.fixed_dictionaries(
        {"radius": pair(0.0, 8.0), "reference_size": st.sampled_from([16, 64, 448])}
    ),
    "erase": st.fixed_dictionaries(
        {"area": pair(0.01, 1.0), "aspect": pair(0.2, 5.0), "value": st.floats(0, 1)}
    ),
    "mask": st.fixed_dictionaries(
        {
            "patch_size": st.sampled_from([1, 4, 8, 12]),
            "fraction": st.floats(0, 1),
            "value": st.floats(0, 1),
        }
    ),
    "patch_shuffle": st.fixed_dictionaries({"patch_size": st.sampled_from([1, 2, 4, 8])}),
    "noise": st.fixed_dictionaries({"std": pair(0.0, 1.0)}),
    "color_jitter": st.fixed_dictionaries(
        {
            "brightness": st.floats(0, 1),
            "contrast": st.floats(0, 1),
            "saturation": st.floats(0, 1),
            "hue": st.floats(0, 0.5),
        }
    ),
    "compose": st.just(COMPOSE),
}


# -- registry and contract --------------------------------------------------------------------


def test_builtins_registered_with_descriptions():
    entries = {e.name: e for e in CORRUPTIONS.entries()}
    for name in BUILTINS:
        assert name in entries
        assert entries[name].description, name
        assert isinstance(build_corruption(name), Corruption)


@pytest.mark.parametrize("name", BUILTINS)
@settings(max_examples=12, deadline=None)
@given(
    data=st.data(),
    batch=st.integers(1, 4),
    height=st.integers(2, 8).map(lambda k: 8 * k),
    width=st.integers(2, 8).map(lambda k: 8 * k),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_shape_dtype_range(name, data, batch, height, width, dtype, seed):
    params = data.draw(PARAMS[name])
    corruption = build_corruption({"name": name, **params} if name != "compose" else params)
    x = images(batch, height, width, seed).to(dtype)
    y = corruption(x, gen(seed))
    assert y.shape == x.shape
    assert y.dtype == dtype
    assert y.device == x.device
    assert torch.isfinite(y).all()
    assert y.min() >= 0.0 and y.max() <= 1.0


@pytest.mark.parametrize("name", [*RANDOM, "compose"])
def test_deterministic_given_generator(name):
    corruption = build_corruption(spec_of(name))
    x = images(4, 64, 64)
    torch.manual_seed(1)
    a = corruption(x, gen(7))
    torch.manual_seed(2)  # global RNG must not matter
    b = corruption(x, gen(7))
    c = corruption(x, gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("name", [*RANDOM, "compose"])
def test_per_sample_parameters_differ(name):
    """The same image repeated in a batch comes out differently for each sample."""
    corruption = build_corruption(spec_of(name))
    x = images(1, 64, 64).expand(4, -1, -1, -1).contiguous()
    y = corruption(x, gen(3))
    for i in range(1, 4):
        assert not torch.equal(y[0], y[i]), f"{name}: samples 0 and {i} got the same corruption"


@pytest.mark.parametrize("name", RANDOM)
def test_sample_then_apply_is_call(name):
    corruption = build_corruption(name)
    x = images(3, 32, 32)
    params = corruption.sample(x.shape, gen(5))
    assert all(v.shape[0] == 3 for v in params.values())
    assert torch.equal(corruption.apply(x, params), corruption(x, gen(5)))


def test_none_is_identity():
    x = images()
    assert torch.equal(build_corruption("none")(x, gen(0)), x)


def test_rejects_non_image_batches():
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        build_corruption("blur")(torch.rand(3, 16, 16), gen(0))


# -- blur -------------------------------------------------------------------------------------


def test_blur_keeps_constant_image():
    x = torch.full((3, 3, 64, 48), 0.37)
    y = GaussianBlur(reference_size=64)(x, gen(0))
    assert torch.allclose(y, x, atol=1e-6)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x.diff(dim=-1).abs().sum(dim=(1, 2, 3))) + (x.diff(dim=-2).abs().sum(dim=(1, 2, 3)))


def test_blur_lowers_total_variation():
    x = images(4, 64, 64)
    assert (total_variation(GaussianBlur()(x, gen(0))) < total_variation(x)).all()
    strong = GaussianBlur(reference_size=64)(x, gen(0))  # sigma 2-5 pixels at 64x64
    assert (total_variation(strong) < 0.2 * total_variation(x)).all()


def test_blur_radius_scales_with_image_size():
    blur = GaussianBlur(radius=(3.0, 3.0), reference_size=448)
    assert torch.allclose(blur.sample((2, 3, 448, 448), gen(0))["sigma"], torch.tensor(3.0))
    assert torch.allclose(
        blur.sample((2, 3, 64, 64), gen(0))["sigma"], torch.tensor(3.0 * 64 / 448)
    )


def test_blur_matches_torchvision_per_sample():
    tvf = pytest.importorskip("torchvision.transforms.functional")
    blur = GaussianBlur(radius=(0.5, 4.0), reference_size=64)
    x = images(4, 64, 48)
    params = blur.sample(x.shape, gen(11))
    y = blur.apply(x, params)
    half = blur.kernel_radius(params["sigma"], 64, 48)
    assert len(set(half.tolist())) > 1  # kernels of different sizes in one batch
    for i in range(4):
        size = 2 * int(half[i]) + 1
        sigma = float(params["sigma"][i])
        ref = tvf.gaussian_blur(x[i : i + 1], [size, size], [sigma, sigma])
        assert torch.allclose(y[i : i + 1], ref, atol=1e-5), i


# -- erase ------------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), area=pair(0.05, 0.3), value=st.floats(0, 1))
def test_erase_area_and_value(seed, area, value):
    # area <= 0.3 with aspect <= 3.3 never needs clipping: sqrt(0.3 * 3.3) < 1
    erase = RandomErase(area=area, value=value)
    x = images(4, 64, 64, seed) * 0.5 + 0.25 if value in (0.0, 1.0) else images(4, 64, 64, seed)
    params = erase.sample(x.shape, gen(seed))
    y = erase.apply(x, params)
    erased = (y == value).all(dim=1)  # [B, H, W]
    for i in range(4):
        h, w = int(params["height"][i]), int(params["width"][i])
        top, left = int(params["top"][i]), int(params["left"][i])
        assert top >= 0 and top + h <= 64 and left >= 0 and left + w <= 64
        box = torch.zeros(64, 64, dtype=torch.bool)
        box[top : top + h, left : left + w] = True
        assert torch.equal(erased[i], box)
        assert torch.equal(y[i][:, ~box], x[i][:, ~box])
        # rounding each side to whole pixels moves the area by at most (h + w) / 2 + 1/4
        slack = (h + w) / 2 + 0.25
        assert area[0] * 64 * 64 - slack <= h * w <= area[1] * 64 * 64 + slack


def test_erase_default_is_black_box_in_reference_range():
    x = images(8, 64, 64) * 0.5 + 0.25
    y = RandomErase()(x, gen(0))
    fraction = (y == 0).all(dim=1).float().mean(dim=(1, 2))
    assert ((fraction > 0.08) & (fraction < 0.33)).all()


# -- mask -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "patch", "fraction"), [(64, 8, 0.5), (32, 4, 0.3), (48, 8, 0.75)])
def test_mask_exact_patch_count(size, patch, fraction):
    mask = PatchMask(patch_size=patch, fraction=fraction, value=0.5)
    x = images(4, size, size)
    y = mask(x, gen(1))
    n = (size // patch) ** 2
    grid = y.reshape(4, 3, size // patch, patch, size // patch, patch)
    masked = (grid == 0.5).all(dim=(1, 3, 5)).sum(dim=(1, 2))
    assert masked.tolist() == [round(fraction * n)] * 4
    changed = (y != x).any(dim=1)
    assert int(changed.sum()) == 4 * round(fraction * n) * patch * patch


def test_mask_handles_partial_patches():
    y = PatchMask(patch_size=8, fraction=1.0, value=0.5)(images(2, 20, 28), gen(0))
    assert (y == 0.5).all()


# -- patch shuffle ----------------------------------------------------------------------------


def patches(x: torch.Tensor, p: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)


def test_patch_shuffle_preserves_multiset_of_patches():
    x = images(4, 64, 32)
    y = PatchShuffle(patch_size=8)(x, gen(0))
    assert not torch.equal(x, y)
    px, py = patches(x, 8), patches(y, 8)
    for i in range(4):
        order_x = sorted(map(tuple, px[i].tolist()))
        order_y = sorted(map(tuple, py[i].tolist()))
        assert order_x == order_y  # exactly this sample's own patches, rearranged


def test_patch_shuffle_moves_patches_with_permutation():
    shuffle = PatchShuffle(patch_size=8)
    x = images(2, 32, 32)
    params = shuffle.sample(x.shape, gen(4))
    y = shuffle.apply(x, params)
    assert torch.equal(
        patches(y, 8), patches(x, 8)[torch.arange(2)[:, None], params["permutation"]]
    )


def test_patch_shuffle_requires_divisible_size():
    with pytest.raises(ValueError, match="divisible by patch_size=8"):
        PatchShuffle(patch_size=8)(images(1, 20, 16), gen(0))


# -- noise ------------------------------------------------------------------------------------


def test_noise_is_zero_mean_with_std_in_range():
    x = torch.full((6, 3, 64, 64), 0.5)  # far from the clamp bounds for std <= 0.3 (mostly)
    y = build_corruption({"name": "noise", "std": [0.05, 0.15]})(x, gen(0))
    delta = (y - x).flatten(1)
    n = delta.shape[1]
    assert (delta.mean(dim=1).abs() < 5 * 0.15 / math.sqrt(n)).all()
    std = delta.std(dim=1)
    assert ((std > 0.05 * 0.97) & (std < 0.15 * 1.03)).all()
    assert std.max() - std.min() > 0.01  # a different std per sample


# -- colour jitter ----------------------------------------------------------------------------


def test_color_jitter_with_zero_strength_is_identity():
    x = images()
    jitter = ColorJitter(brightness=0, contrast=0, saturation=0, hue=0)
    assert torch.equal(jitter(x, gen(0)), x)


def test_hsv_round_trip_and_half_hue_shift_twice():
    x = images(2, 16, 16)
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-5)
    jitter = ColorJitter(brightness=0, contrast=0, saturation=0, hue=0.5)
    params = jitter.sample(x.shape, gen(0))
    params["hue"] = torch.full((2,), 0.5)
    once = jitter.apply(x, params)
    assert not torch.allclose(once, x, atol=1e-2)
    assert torch.allclose(jitter.apply(once, params), x, atol=1e-5)


def test_color_jitter_matches_torchvision_ops_per_sample():
    tvf = pytest.importorskip("torchvision.transforms.functional")
    jitter = ColorJitter()
    x = images(6, 24, 24)
    params = jitter.sample(x.shape, gen(2))
    assert len({tuple(o) for o in params["order"].tolist()}) > 1  # orders differ per sample
    y = jitter.apply(x, params)
    ops = {
        0: lambda img, i: tvf.adjust_brightness(img, float(params["brightness"][i])),
        1: lambda img, i: tvf.adjust_contrast(img, float(params["contrast"][i])),
        2: lambda img, i: tvf.adjust_saturation(img, float(params["saturation"][i])),
        3: lambda img, i: tvf.adjust_hue(img, float(params["hue"][i])),
    }
    for i in range(6):
        ref = x[i]
        for op in params["order"][i].tolist():
            ref = ops[op](ref, i)
        assert torch.allclose(y[i], ref, atol=1e-5), i


def test_color_jitter_factor_ranges():
    params = ColorJitter().sample((256, 3, 8, 8), gen(0))
    for name in ("brightness", "contrast", "saturation"):
        assert params[name].min() >= 0.6 and params[name].max() <= 1.4
    assert params["hue"].abs().max() <= 0.1
    assert sorted(params["order"][0].tolist()) == [0, 1, 2, 3]


# -- compose and build_corruption ------------------------------------------------------------


def test_compose_applies_steps_in_order():
    x = images(4, 32, 32)
    steps = [{"name": "mask", "fraction": 0.25}, {"name": "none"}]
    composed = build_corruption({"name": "compose", "steps": steps})(x, gen(9))
    assert torch.equal(composed, build_corruption(steps[0])(x, gen(9)))
    two = [{"name": "erase", "value": 1.0}, {"name": "mask", "value": 0.0, "fraction": 1.0}]
    y = build_corruption({"name": "compose", "steps": two})(x, gen(9))
    assert (y == 0.0).all()  # mask after erase covers everything
    y = build_corruption({"name": "compose", "steps": two[::-1]})(x, gen(9))
    assert (y == 1.0).any() and (y == 0.0).any()  # erase after mask leaves a white box


def test_compose_shares_generator_across_steps():
    x = images(2, 32, 32)
    spec = {"name": "compose", "steps": [{"name": "noise"}, {"name": "noise"}]}
    g = gen(0)
    expected = build_corruption("noise")(build_corruption("noise")(x, g), g)
    assert torch.equal(build_corruption(spec)(x, gen(0)), expected)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (
            {"name": "compose", "steps": [{"name": "blurr"}]},
            r"steps\[0\].*unknown corruption 'blurr'.*valid: .*erase",
        ),
        ({"name": "nope"}, r"unknown corruption 'nope'.*valid: .*blur"),
        ({"radius": [1, 2]}, "needs a 'name'"),
        ({"name": "blur", "sigma": 2}, "sigma: Extra inputs are not permitted; parameters: radius"),
        ({"name": "blur", "radius": [5, 2]}, "radius must be an ordered pair"),
        ({"name": "mask", "fraction": "half"}, "fraction: Input should be a valid number"),
        ({"name": "mask", "fraction": 1.5}, r"fraction must be within \[0, 1\]"),
        ({"name": "color_jitter", "hue": 0.7}, r"hue must be within \[0, 0.5\]"),
        ({"name": "erase", "aspect": [0, 1]}, "aspect must be"),
        ({"name": "none", "strength": 1}, "strength: Extra inputs"),
        (
            {"name": "compose", "steps": [{"name": "mask", "patch_size": 0}]},
            r"steps\[0\]: corruption 'mask': patch_size",
        ),
        (42, "must be a name or a mapping"),
    ],
)
def test_build_corruption_errors_are_single_line_usage_errors(spec, match):
    with pytest.raises(UsageError, match=match) as info:
        build_corruption(spec)
    assert "\n" not in str(info.value)


def test_build_corruption_accepts_component_spec():
    from crystalkit.config.schema import ComponentSpec

    blur = build_corruption(ComponentSpec(name="blur", radius=[1.0, 1.5]))
    assert isinstance(blur, GaussianBlur) and blur.radius == (1.0, 1.5)
