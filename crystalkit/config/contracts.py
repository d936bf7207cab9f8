"""Cheap components are built, and their contracts checked, while a recipe loads.

Corruptions, objectives and latent and weight schedules are built once during validation, so a
check in their constructor fails at load time with one line naming the recipe key. Corruptions and
objectives also get the contract checks of :mod:`crystalkit.testing` on tiny inputs: a plugin that
returns one channel, or a loss that is not differentiable, fails before any model is built, with a
line that names the component and where its code lives (a :class:`PluginError`, exit code 3), not
deep inside a training step.
"""

from __future__ import annotations

import json
from typing import Any

from crystalkit.errors import (
    PluginError,
    RecipeError,
    UsageError,
    blame,
    defined_at,
    is_builtin,
    plugin_error,
)
from crystalkit.registries import CORRUPTIONS, OBJECTIVES
from crystalkit.registry import Registry, source_text

#: components whose contract (:mod:`crystalkit.testing`) is checked on tiny inputs at load time
CONTRACTS = (CORRUPTIONS, OBJECTIVES)
#: image side of the corruption check when the dataset declares no ``image_size``
CHECK_IMAGE_SIDE = 16
#: the largest side the check uses: a contract shows on small images, and a huge ``image_size``
#: must fail where it is used, not stall the load on a giant dummy batch
MAX_CHECK_IMAGE_SIDE = 512
#: (kind, name, params, image side) -> (breach, whether it is the plugin's) of checked components
_CHECKED: dict[tuple[str, str, str, int], tuple[str, bool] | None] = {}


def build_and_check(
    obj: Any, params: dict[str, Any], registry: Registry, name: str, at: str, image_side: int
) -> None:
    """Build ``obj(**params)`` and check its contract; ``at`` ("FILE: KEY") opens the error."""
    try:
        built = obj(**params)
    except (ValueError, TypeError, UsageError) as exc:
        raise RecipeError(f"{at}: {exc}") from None
    except Exception as exc:  # a plugin's constructor may fail in any way
        if is_builtin(obj):
            raise
        failure = plugin_error(f"{_singular(registry)} {name!r}", _source(registry, name), exc, obj)
        raise PluginError(f"{at}: {failure}") from exc
    if registry not in CONTRACTS:
        return
    state = json.dumps(params, sort_keys=True, default=str)
    checked = (registry.kind, name, state, image_side)
    if checked not in _CHECKED:
        _CHECKED[checked] = _contract_breach(built, registry, name, image_side)
    breach = _CHECKED[checked]
    if breach is not None:
        message, theirs = breach
        raise (PluginError if theirs else RecipeError)(f"{at}: {message}")


def _singular(registry: Registry) -> str:
    return registry.kind[:-1] if registry.kind.endswith("s") else registry.kind


def _source(registry: Registry, name: str) -> str:
    return source_text(registry.entry(name))


def _contract_breach(
    built: Any, registry: Registry, name: str, image_side: int
) -> tuple[str, bool] | None:
    """Run the contract check of :mod:`crystalkit.testing` on a freshly built corruption (on two
    images of the dataset's size) or objective: ``None``, or one line naming the component, its
    source and the breach, and whether the component is third-party code."""
    from crystalkit.testing import ContractError, check_corruption, check_objective, dummy_images

    try:
        if registry is CORRUPTIONS:
            side = min(image_side, MAX_CHECK_IMAGE_SIDE)
            check_corruption(built, dummy_images(2, side, side))
        else:
            check_objective(built)
    except ContractError as exc:
        cause = exc.__cause__
        where = blame(cause, built) if cause is not None else defined_at(built)
        if isinstance(cause, PluginError):  # a step of a composition: its message says where
            where = ""
        at = f" ({'at' if cause is not None else 'defined at'} {where})" if where else ""
        kind = _singular(registry)
        return (
            f"{kind} {name!r} ({_source(registry, name)}) breaks the {kind} contract: {exc}{at}",
            not is_builtin(built) or isinstance(cause, PluginError),
        )
    return None
