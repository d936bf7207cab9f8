"""Contract checks for corruptions and objectives, for plugin authors' test suites and for crystalkit.

A corruption or an objective that breaks its contract rarely fails where it is wrong: a corruption
returning one channel fails deep in batch assembly ("stack expects each tensor to be equal
size"), one that ignores its generator makes runs unreproducible without failing at all, and an
objective returning ``loss.item()`` trains nothing. These helpers call a component on tiny dummy
inputs and raise :class:`ContractError` with one line saying what was wrong and what was expected.
crystalkit runs :func:`check_corruption` and :func:`check_objective` on every plugin component a
recipe names, when the recipe loads; run them (and the property-based variants) in your own tests::

    from crystalkit.testing import assert_corruption_contract, check_corruption, check_objective
    from hypothesis import strategies as st

    from my_plugin import Posterize, Sharpness


    def test_posterize_keeps_the_contract():
        check_corruption(Posterize(levels=4))  # one tiny batch, seed 0
        assert_corruption_contract(  # many image sizes, parameters and seeds
            Posterize, params=st.fixed_dictionaries({"levels": st.integers(2, 8)})
        )


    def test_sharpness_objective():
        check_objective(Sharpness())

:class:`ContractError` is an :class:`AssertionError`, so pytest reports a breach as a failed
assertion. The ``assert_*_contract`` helpers need `hypothesis <https://hypothesis.readthedocs.io>`_
(``pip install hypothesis``); the ``check_*`` ones only torch.

The contracts:

* a **corruption** ``(images, generator) -> images`` takes a float batch ``[B, 3, H, W]`` in
  ``[0, 1]`` and returns a tensor of the same shape, dtype and device, finite and within ``[0, 1]``;
  it leaves its input unchanged and draws all randomness from ``generator`` (the same seed gives
  the same output).
* an **objective** ``(PathOutputs) -> loss`` declares ``attention_layers`` (a tuple of ints, -1 =
  last layer) and ``needs_hidden`` (a bool), reads only what it declares, and returns a finite 0-dim
  float tensor differentiable in its inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from crystalkit.errors import PluginError, one_line

if TYPE_CHECKING:
    from crystalkit.crystal.paths import PathOutputs

__all__ = [
    "ContractError",
    "assert_corruption_contract",
    "assert_objective_contract",
    "check_corruption",
    "check_objective",
    "dummy_images",
    "dummy_outputs",
    "image_batches",
    "output_breach",
]

#: what crystalkit's multi-process training accepts for an objective's optional ``units``
_UNITS = ("answer_tokens", "answer_samples", "samples")
_KEEP = "a corruption must keep shape, dtype and device"


class ContractError(PluginError, AssertionError):
    """A component that breaks its contract (a failed assertion in pytest, a plugin error in the
    CLI). The message is one line: what was wrong and what was expected."""


def _shape(tensor: torch.Tensor) -> str:
    return f"[{', '.join(str(s) for s in tensor.shape)}]"


def _number(value: float) -> str:
    return f"{value:.4g}"


# -- corruptions -----------------------------------------------------------------------------


def dummy_images(
    batch: int = 2, height: int = 16, width: int = 16, seed: int = 0, dtype=torch.float32
) -> torch.Tensor:
    """A float batch ``[batch, 3, height, width]`` in ``[0, 1]`` on the CPU, with some pixels at
    exactly 0 and 1."""
    images = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))
    flat = images.view(-1)
    flat[:: max(1, flat.numel() // 7)] = 0.0
    flat[3 :: max(1, flat.numel() // 5)] = 1.0
    return images.to(dtype)


def output_breach(images: torch.Tensor, out: Any, values: bool = True) -> str | None:
    """Why ``out`` is not a valid corruption of ``images`` (one line), or ``None``: it must be a
    tensor of the images' shape, dtype and device; with ``values``, finite and within [0, 1]."""
    if not isinstance(out, torch.Tensor):
        return f"returned {type(out).__name__}, not a tensor; a corruption returns the image batch"
    if out.shape != images.shape:
        return f"returned shape {_shape(out)} for images {_shape(images)}; {_KEEP}"
    if out.dtype != images.dtype:
        return f"returned dtype {out.dtype} for images of dtype {images.dtype}; {_KEEP}"
    if out.device != images.device:
        return f"returned a tensor on {out.device} for images on {images.device}; {_KEEP}"
    if not values or out.numel() == 0:
        return None
    if not bool(torch.isfinite(out).all()):
        return "returned non-finite values (NaN or inf); a corruption must return values in [0, 1]"
    low, high = float(out.min()), float(out.max())
    if low < 0.0 or high > 1.0:
        return (
            f"returned values in [{_number(low)}, {_number(high)}] for images in [0, 1]; a "
            "corruption must return values within [0, 1] (clamp them)"
        )
    return None


def check_corruption(
    corruption: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    images: torch.Tensor | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Call ``corruption`` on ``images`` (default: :func:`dummy_images`, ``[2, 3, 16, 16]``) with a
    generator seeded ``seed`` and check its contract; returns the corrupted batch.

    Raises :class:`ContractError` if it raises, returns something else than a tensor of the same
    shape, dtype and device, returns values outside [0, 1] (or not finite), modifies its input in
    place, or returns something else when called again with a fresh generator of the same seed.
    """
    images = dummy_images() if images is None else images
    original = images.clone()
    described = f"images {_shape(images)} {str(images.dtype).removeprefix('torch.')}"

    def call() -> Any:
        generator = torch.Generator(device=images.device).manual_seed(seed)
        try:
            return corruption(images, generator)
        except Exception as exc:
            raise ContractError(
                f"raised {type(exc).__name__}: {one_line(exc)} (on {described}, seed {seed})"
            ) from exc

    out = call()
    breach = output_breach(images, out)
    if breach:
        raise ContractError(f"{breach} (on {described}, seed {seed})")
    if not torch.equal(images, original):
        raise ContractError(
            f"modified its input images in place (on {described}); a corruption must leave its "
            "input unchanged and return a new tensor"
        )
    first = out.detach().clone()
    again = call()
    if output_breach(images, again) or not torch.allclose(first, again, rtol=0.0, atol=1e-6):
        raise ContractError(
            f"returned different images for two generators seeded {seed} (on {described}); a "
            "corruption must draw all its randomness from the generator it is given"
        )
    return out


# -- objectives ------------------------------------------------------------------------------


def _declared_layers(objective: Any) -> tuple[int, ...]:
    layers = getattr(objective, "attention_layers", ())
    return tuple(layers) if isinstance(layers, tuple | list) else ()


def dummy_outputs(
    objective: Any = None,
    batch: int = 2,
    width: int = 3,
    vocab: int = 11,
    latents: int = 4,
    hidden: int = 8,
    seed: int = 0,
) -> PathOutputs:
    """Random :class:`~crystalkit.crystal.paths.PathOutputs` of both paths with what ``objective``
    declares: attention maps ``[batch, width, latents]`` (rows summing to 1) at each of its
    ``attention_layers`` (none when ``latents`` is 0, as at steps without latents) and, with
    ``needs_hidden``, hidden states ``[batch, width, hidden]``. Every tensor an objective may
    differentiate is a leaf requiring grad; the last answer column of the first sample is padding
    (``IGNORE_INDEX``) when ``width > 1``."""
    from crystalkit.crystal.paths import PathOutputs
    from crystalkit.data.prompt import IGNORE_INDEX

    generator = torch.Generator().manual_seed(seed)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).requires_grad_()

    def maps() -> dict[int, torch.Tensor]:
        if not latents:
            return {}
        return {
            layer: torch.randn(batch, width, latents, generator=generator)
            .softmax(-1)
            .requires_grad_()
            for layer in _declared_layers(objective)
        }

    targets = torch.randint(0, vocab, (batch, width), generator=generator)
    if width > 1:
        targets[0, -1] = IGNORE_INDEX
    needs_hidden = bool(getattr(objective, "needs_hidden", False))
    return PathOutputs(
        targets=targets,
        intact_logits=leaf(batch, width, vocab),
        corrupted_logits=leaf(batch, width, vocab),
        intact_attention=maps(),
        corrupted_attention=maps(),
        intact_hidden=leaf(batch, width, hidden) if needs_hidden else None,
        corrupted_hidden=leaf(batch, width, hidden) if needs_hidden else None,
        num_latents=latents,
    )


def _check_declarations(objective: Any) -> None:
    if not callable(objective):
        raise ContractError(
            f"is a {type(objective).__name__}, not callable; an objective is called with the "
            "paths' outputs and returns the loss"
        )
    missing = [a for a in ("attention_layers", "needs_hidden") if not hasattr(objective, a)]
    if missing:
        raise ContractError(
            f"does not declare {' and '.join(missing)}; an objective declares attention_layers "
            "(a tuple of decoder layer indices, () for none) and needs_hidden (a bool)"
        )
    layers = objective.attention_layers
    if not isinstance(layers, tuple | list) or not all(
        isinstance(layer, int) and not isinstance(layer, bool) for layer in layers
    ):
        raise ContractError(
            f"declares attention_layers={layers!r}; expected a tuple of ints (decoder layer "
            "indices, -1 = last; () for none)"
        )
    if not isinstance(objective.needs_hidden, bool):
        raise ContractError(
            f"declares needs_hidden={objective.needs_hidden!r}; expected True or False"
        )
    units = getattr(objective, "units", None)
    if units is not None and units not in _UNITS:
        raise ContractError(
            f"declares units={units!r}; expected one of {', '.join(_UNITS)} (or no units)"
        )


def _inputs_of(outputs: PathOutputs) -> list[torch.Tensor]:
    tensors = [
        outputs.intact_logits,
        outputs.corrupted_logits,
        outputs.intact_hidden,
        outputs.corrupted_hidden,
        *outputs.intact_attention.values(),
        *outputs.corrupted_attention.values(),
    ]
    return [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]


def check_objective(objective: Any, outputs: PathOutputs | None = None) -> torch.Tensor:
    """Check ``objective``'s declarations, call it on ``outputs`` (default:
    :func:`dummy_outputs` for what it declares) and check the result; returns the loss.

    Raises :class:`ContractError` if ``attention_layers`` / ``needs_hidden`` are missing or of the
    wrong type, if the call raises (reading something undeclared, say), or if the result is not a
    finite 0-dim float tensor differentiable in the outputs (with finite gradients). The gradient
    check needs inputs that require grad, which the default outputs have.
    """
    _check_declarations(objective)
    outputs = dummy_outputs(objective) if outputs is None else outputs
    layers = tuple(outputs.intact_attention)
    described = (
        f"on outputs with batch {outputs.targets.shape[0]}, {outputs.targets.shape[-1]} answer "
        f"columns, {outputs.num_latents} latents, attention at layers {layers or '()'} and "
        f"{'hidden states' if outputs.intact_hidden is not None else 'no hidden states'}"
    )
    try:
        value = objective(outputs)
    except Exception as exc:
        raise ContractError(
            f"raised {type(exc).__name__}: {one_line(exc)} ({described}; an objective reads only "
            "what it declares in attention_layers and needs_hidden)"
        ) from exc
    if not isinstance(value, torch.Tensor):
        raise ContractError(
            f"returned {type(value).__name__}; an objective must return a 0-dim tensor (not a "
            "Python number: it must stay differentiable)"
        )
    if value.ndim != 0:
        raise ContractError(
            f"returned a tensor of shape {_shape(value)}; an objective must return a scalar "
            "(0-dim) tensor (reduce it, e.g. with .mean())"
        )
    if not value.is_floating_point():
        raise ContractError(f"returned dtype {value.dtype}; an objective must return a float")
    if not math.isfinite(float(value.detach())):
        raise ContractError(
            f"returned {float(value.detach())} ({described}); an objective must be finite"
        )
    inputs = _inputs_of(outputs)
    if not inputs:
        return value
    if not value.requires_grad:
        raise ContractError(
            "returned a tensor that does not require grad (a constant, or computed under no_grad "
            "or from .detach()/.item()); an objective must be differentiable in the outputs"
        )
    grads = torch.autograd.grad(value, inputs, allow_unused=True)
    found = [g for g in grads if g is not None]
    if not found:
        raise ContractError(
            "returned a value not connected to any of the outputs; an objective must be "
            "differentiable in the outputs it reads"
        )
    if not all(bool(torch.isfinite(g).all()) for g in found):
        raise ContractError(
            f"has non-finite gradients ({described}); an objective must give finite gradients"
        )
    return value


# -- property-based (hypothesis) ---------------------------------------------------------------


def _hypothesis() -> Any:
    try:
        import hypothesis
        import hypothesis.strategies
    except ImportError:
        raise ImportError(
            "crystalkit.testing's property-based helpers need hypothesis: pip install hypothesis"
        ) from None
    return hypothesis


def image_batches(
    min_side: int = 1, max_side: int = 32, max_batch: int = 3, dtype: torch.dtype = torch.float32
) -> Any:
    """A hypothesis strategy of float image batches ``[B, 3, H, W]`` in ``[0, 1]`` on the CPU:
    ``1 <= B <= max_batch``, sides drawn independently in ``[min_side, max_side]`` (tiny and
    non-square ones included), uniform noise or black-and-white pixels (the range's ends)."""
    st = _hypothesis().strategies
    if not 1 <= min_side <= max_side or max_batch < 1:
        raise ValueError("image_batches: need 1 <= min_side <= max_side and max_batch >= 1")

    @st.composite
    def batches(draw: Any) -> torch.Tensor:
        batch = draw(st.integers(1, max_batch))
        height = draw(st.integers(min_side, max_side))
        width = draw(st.integers(min_side, max_side))
        seed = draw(st.integers(0, 2**32 - 1))
        generator = torch.Generator().manual_seed(seed)
        images = torch.rand(batch, 3, height, width, generator=generator)
        if draw(st.booleans()):
            images = (images > 0.5).float()
        return images.to(dtype)

    return batches()


def _settings(hypothesis: Any, max_examples: int) -> Any:
    """No deadline (a first call may compile kernels) and no too-slow health check: the cases
    build tensors, which is what makes them slow."""
    return hypothesis.settings(
        deadline=None,
        max_examples=max_examples,
        suppress_health_check=[hypothesis.HealthCheck.too_slow],
    )


def assert_corruption_contract(
    factory: Callable[..., Any],
    params: Any = None,
    max_examples: int = 25,
    images: Any = None,
) -> None:
    """Check :func:`check_corruption` on ``factory(**kwargs)`` over many drawn cases: ``kwargs``
    from ``params`` (a strategy of keyword dicts; default ``{}``), images from ``images`` (default
    :func:`image_batches`; pass e.g. ``image_batches(min_side=8)`` for a corruption that needs
    bigger images) and seeds. Raises the (shrunk) :class:`ContractError`."""
    hypothesis = _hypothesis()
    st = hypothesis.strategies

    @_settings(hypothesis, max_examples)
    @hypothesis.given(
        kwargs=st.just({}) if params is None else params,
        batch=image_batches() if images is None else images,
        seed=st.integers(0, 2**32 - 1),
    )
    def corruption_contract(kwargs: dict[str, Any], batch: torch.Tensor, seed: int) -> None:
        check_corruption(factory(**kwargs), batch, seed)

    corruption_contract()


def assert_objective_contract(
    factory: Callable[..., Any],
    params: Any = None,
    max_examples: int = 25,
    max_batch: int = 4,
    max_width: int = 6,
    max_latents: int = 6,
) -> None:
    """Check :func:`check_objective` on ``factory(**kwargs)`` over many drawn cases: ``kwargs``
    from ``params`` (a strategy of keyword dicts; default ``{}``) and dummy outputs of drawn batch
    size, answer columns, latent count (0 included: steps without latents), vocabulary, hidden
    size and seed. Raises the (shrunk) :class:`ContractError`."""
    hypothesis = _hypothesis()
    st = hypothesis.strategies

    @_settings(hypothesis, max_examples)
    @hypothesis.given(
        kwargs=st.just({}) if params is None else params,
        sizes=st.tuples(
            st.integers(1, max_batch),
            st.integers(1, max_width),
            st.integers(0, max_latents),
            st.integers(2, 13),
            st.integers(1, 8),
            st.integers(0, 2**32 - 1),
        ),
    )
    def objective_contract(kwargs: dict[str, Any], sizes: Sequence[int]) -> None:
        objective = factory(**kwargs)
        batch, width, latents, vocab, hidden, seed = sizes
        _check_declarations(objective)
        outputs = dummy_outputs(objective, batch, width, vocab, latents, hidden, seed)
        check_objective(objective, outputs)

    objective_contract()
