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

:class:`ContractError` is an :class:`AssertionError`, so pytest reports a breach as a failed
assertion. The ``assert_*_contract`` helpers need `hypothesis <https://hypothesis.readthedocs.io>`_
(``pip install hypothesis``); the ``check_*`` ones only torch.

The contracts themselves live with their components: :mod:`crystalkit.corruptions.contract` and
:mod:`crystalkit.objectives.contract` (which also says what an objective's ``units`` are). This
module re-exports their checks and adds the property-based helpers; crystalkit itself never
imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from crystalkit.corruptions.contract import check_corruption, dummy_images, output_breach
from crystalkit.errors import ContractError
from crystalkit.objectives.contract import check_declarations, check_objective, dummy_outputs

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
        check_declarations(objective)
        outputs = dummy_outputs(objective, batch, width, vocab, latents, hidden, seed)
        check_objective(objective, outputs)

    objective_contract()
