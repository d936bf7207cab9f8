"""Contract checks for corruptions and objectives, for plugin authors' test suites and for crystalkit.

A corruption or an objective that breaks its contract rarely fails where it is wrong: a corruption
returning one channel fails deep in batch assembly ("stack expects each tensor to be equal
size"), one that ignores its generator makes runs unreproducible without failing at all, and an
objective returning ``loss.item()`` trains nothing. These helpers call a component on tiny dummy
inputs and raise :class:`ContractError` with one line saying what was wrong and what was expected.
crystalkit runs :func:`check_corruption` and :func:`check_objective` on every component a recipe
names, when the recipe loads; run them (and the property-based variants) in your own tests::

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

A corruption that reads the evidence (``uses_boxes = True``) gets boxes too: :func:`dummy_boxes`
from ``check_corruption``, drawn ones (:func:`box_lists`) from ``assert_corruption_contract``.

:class:`ContractError` is an :class:`AssertionError`, so pytest reports a breach as a failed
assertion. The ``assert_*_contract`` helpers need `hypothesis <https://hypothesis.readthedocs.io>`_
(``pip install hypothesis``); the ``check_*`` ones only torch.

The contracts themselves live with their components: :mod:`crystalkit.corruptions.contract` and
:mod:`crystalkit.objectives.contract` (which also says what an objective's ``units`` are). This
module re-exports their checks and adds the property-based helpers; crystalkit itself never
imports it.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

import torch

from crystalkit.corruptions.contract import (
    check_corruption,
    dummy_boxes,
    dummy_images,
    output_breach,
    reads_boxes,
)
from crystalkit.errors import ContractError, UsageError
from crystalkit.objectives.contract import check_declarations, check_objective, dummy_outputs
from crystalkit.params import config_model

__all__ = [
    "ContractError",
    "assert_corruption_contract",
    "assert_objective_contract",
    "box_lists",
    "check_corruption",
    "check_objective",
    "dummy_boxes",
    "dummy_images",
    "dummy_outputs",
    "image_batches",
    "output_breach",
    "signature_params",
]

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
    min_side: int = 1,
    max_side: int = 64,
    max_batch: int = 3,
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.float64),
) -> Any:
    """A hypothesis strategy of float image batches ``[B, 3, H, W]`` in ``[0, 1]`` on the CPU:
    ``1 <= B <= max_batch``, sides drawn independently in ``[min_side, max_side]`` (tiny and
    non-square ones included, up to the 64 px of the default recipes), uniform noise or
    black-and-white pixels (the range's ends), of each of ``dtypes``."""
    st = _hypothesis().strategies
    if not 1 <= min_side <= max_side or max_batch < 1 or not dtypes:
        raise ValueError(
            "image_batches: need 1 <= min_side <= max_side, max_batch >= 1 and a dtype"
        )

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
        return images.to(draw(st.sampled_from(list(dtypes))))

    return batches()


def box_lists(shape: torch.Size | tuple[int, ...], max_boxes: int = 3) -> Any:
    """A hypothesis strategy of evidence boxes for a batch of ``shape`` ``[B, 3, H, W]``: per
    image 1 to ``max_boxes`` non-empty boxes ``(x0, y0, x1, y1)`` inside it (exclusive ends; they
    may overlap, touch the border or fill the image), as crystalkit hands them to a corruption
    that reads them."""
    st = _hypothesis().strategies
    batch, _, height, width = shape

    def span(side: int) -> Any:
        return st.integers(0, side - 1).flatmap(
            lambda low: st.integers(low + 1, side).map(lambda high: (low, high))
        )

    box = st.tuples(span(width), span(height)).map(
        lambda xy: (xy[0][0], xy[1][0], xy[0][1], xy[1][1])
    )
    image = st.lists(box, min_size=1, max_size=max_boxes)
    return st.lists(image, min_size=batch, max_size=batch)


def signature_params(factory: Callable[..., Any]) -> Any:
    """A hypothesis strategy of keyword dicts for ``factory``'s typed parameters (the model the
    recipe loader validates them with, :func:`~crystalkit.params.config_model`): each parameter is
    drawn or left at its default. Numbers are drawn within their declared bounds, else around the
    default; ``bool``, ``Literal``, ``X | None`` and tuples of numbers are drawn too; other types
    keep their default. The constructor's own checks may refuse a draw (a ``ValueError``): the
    ``assert_*_contract`` helpers skip those draws."""
    st = _hypothesis().strategies
    fields = config_model(factory).model_fields
    drawn = {name: _field_values(st, field) for name, field in fields.items()}
    missing = [n for n, f in fields.items() if f.is_required() and drawn[n] is None]
    if missing:
        raise ValueError(
            f"signature_params: cannot draw the required parameter(s) {', '.join(missing)} of "
            f"{getattr(factory, '__name__', factory)!r}; pass params=... (a strategy of dicts)"
        )
    required = {n: v for n, v in drawn.items() if v is not None and fields[n].is_required()}
    optional = {n: v for n, v in drawn.items() if v is not None and not fields[n].is_required()}
    return st.fixed_dictionaries(required, optional=optional)


def _bounds(field: Any) -> tuple[float | None, float | None, bool]:
    """``(low, high, exclusive_low)`` declared on a pydantic field."""
    low = high = None
    exclusive = False
    for meta in field.metadata:
        for attr, is_low, strict in (("ge", True, False), ("gt", True, True), ("le", False, False),
                                     ("lt", False, True)):  # fmt: skip
            value = getattr(meta, attr, None)
            if value is None:
                continue
            if is_low:
                low, exclusive = value, strict
            else:
                high = value - (1 if strict and isinstance(value, int) else 0)
    return low, high, exclusive


def _number(st: Any, kind: type, default: Any, low: Any, high: Any, exclusive: bool) -> Any:
    scale = (
        abs(default) if isinstance(default, int | float) and not isinstance(default, bool) else 1
    )
    low = (
        min(0, -scale) if low is None and isinstance(default, int | float) and default < 0 else low
    )
    low = 0 if low is None else low
    high = max(low + 1, 2 * scale) if high is None else high
    if kind is int:
        return st.integers(int(low) + (1 if exclusive else 0), int(high))
    return st.floats(low, high, exclude_min=exclusive, allow_nan=False, allow_infinity=False)


def _field_values(st: Any, field: Any) -> Any:
    """A strategy for one parameter, or ``None`` where its type is not drawn."""
    default = None if field.is_required() else field.get_default(call_default_factory=True)
    return _type_values(st, field.annotation, default, *_bounds(field))


def _type_values(st: Any, annotation: Any, default: Any, low: Any, high: Any, excl: bool) -> Any:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is bool:
        return st.booleans()
    if annotation in (int, float):
        return _number(st, annotation, default, low, high, excl)
    if origin is typing.Literal:
        return st.sampled_from(list(args))
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        values = _type_values(st, inner[0], default, low, high, excl) if len(inner) == 1 else None
        return None if values is None else st.one_of(st.none(), values)
    if origin is tuple and args:
        defaults = default if isinstance(default, tuple | list) else ()
        if len(args) == 2 and args[1] is Ellipsis:
            item = _type_values(st, args[0], defaults[0] if defaults else None, None, None, False)
            return None if item is None else st.lists(item, min_size=1, max_size=3).map(tuple)
        items = [
            _type_values(st, a, defaults[i] if i < len(defaults) else None, low, high, excl)
            for i, a in enumerate(args)
        ]
        return None if any(i is None for i in items) else st.tuples(*items)
    return None


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
    from ``params`` (a strategy of keyword dicts; default :func:`signature_params`, drawn from the
    factory's typed parameters), images from ``images`` (default :func:`image_batches`; pass e.g.
    ``image_batches(min_side=8)`` for a corruption that needs bigger images), evidence boxes for
    one that reads them (:func:`box_lists`) and seeds. Raises the (shrunk)
    :class:`ContractError`."""
    hypothesis = _hypothesis()
    st = hypothesis.strategies

    @_settings(hypothesis, max_examples)
    @hypothesis.given(
        kwargs=signature_params(factory) if params is None else params,
        batch=image_batches() if images is None else images,
        seed=st.integers(0, 2**32 - 1),
        data=st.data(),
    )
    def corruption_contract(
        kwargs: dict[str, Any], batch: torch.Tensor, seed: int, data: Any
    ) -> None:
        corruption = _build(hypothesis, factory, kwargs, params is None)
        boxes = data.draw(box_lists(batch.shape)) if reads_boxes(corruption) else None
        check_corruption(corruption, batch, seed, boxes)

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
    from ``params`` (a strategy of keyword dicts; default :func:`signature_params`) and dummy
    outputs of drawn batch size, answer columns, latent count (0 included: steps without latents),
    vocabulary, hidden size and seed. Raises the (shrunk) :class:`ContractError`."""
    hypothesis = _hypothesis()
    st = hypothesis.strategies

    @_settings(hypothesis, max_examples)
    @hypothesis.given(
        kwargs=signature_params(factory) if params is None else params,
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
        objective = _build(hypothesis, factory, kwargs, params is None)
        batch, width, latents, vocab, hidden, seed = sizes
        check_declarations(objective)
        outputs = dummy_outputs(objective, batch, width, vocab, latents, hidden, seed)
        check_objective(objective, outputs)

    objective_contract()


def _build(
    hypothesis: Any, factory: Callable[..., Any], kwargs: dict[str, Any], drawn: bool
) -> Any:
    """``factory(**kwargs)``; parameters drawn from the signature that the constructor refuses
    (its own ``ValueError``, ``TypeError`` or one-line usage error) are skipped, not failures."""
    if not drawn:
        return factory(**kwargs)
    try:
        return factory(**kwargs)
    except (ValueError, TypeError, UsageError):
        hypothesis.reject()
