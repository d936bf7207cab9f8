"""Cheap components are built, and their contracts checked, while a recipe loads.

Corruptions, objectives and latent and weight schedules are built once during validation
(:func:`~crystalkit.components.build_component`), so a check in their constructor fails at load
time with one line naming the recipe key. Corruptions and objectives are also called on tiny
inputs (:func:`~crystalkit.corruptions.contract.check_corruption`,
:func:`~crystalkit.objectives.contract.check_objective`): a plugin that returns one channel, or a
loss that is not differentiable, fails before any model is built, with a line that names the
component and where its code lives (a :class:`PluginError`, exit code 3), not deep inside a
training step.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from crystalkit.components import ComponentError, build_component
from crystalkit.corruptions.contract import check_corruption, dummy_images
from crystalkit.errors import (
    ContractError,
    PluginError,
    RecipeError,
    UsageError,
    blame,
    defined_at,
    is_builtin,
)
from crystalkit.objectives.contract import check_objective
from crystalkit.registries import CORRUPTIONS, OBJECTIVES
from crystalkit.registry import Registry, source_text

#: components whose contract is checked on tiny inputs at load time
CONTRACTS = (CORRUPTIONS, OBJECTIVES)
#: image side of the corruption check when the dataset declares no ``image_size``
CHECK_IMAGE_SIDE = 16
#: the largest side the check uses: a contract shows on small images, and a huge ``image_size``
#: must fail where it is used, not stall the load on a giant dummy batch
MAX_CHECK_IMAGE_SIDE = 512
#: (kind, name, params, image side) -> (breach, whether it is the plugin's) of checked components
_CHECKED: dict[tuple[str, str, str, int], tuple[str, bool] | None] = {}


def build_and_check(
    registry: Registry, name: str, params: BaseModel, at: str, image_side: int
) -> None:
    """Build ``registry``'s component ``name`` from its validated ``params`` and check its
    contract; ``at`` ("FILE: KEY") opens the error."""
    try:
        built = build_component(registry, name, params)
    except ComponentError as exc:
        raise RecipeError(f"{at}: {exc.reason}") from None
    except UsageError as exc:
        raise RecipeError(f"{at}: {exc}") from None
    except PluginError as exc:
        raise PluginError(f"{at}: {exc}") from exc
    if registry not in CONTRACTS:
        return
    state = json.dumps(params.model_dump(mode="json"), sort_keys=True, default=str)
    checked = (registry.kind, name, state, image_side)
    if checked not in _CHECKED:
        _CHECKED[checked] = _contract_breach(built, registry, name, image_side)
    breach = _CHECKED[checked]
    if breach is not None:
        message, theirs = breach
        raise (PluginError if theirs else RecipeError)(f"{at}: {message}")


def _contract_breach(
    built: Any, registry: Registry, name: str, image_side: int
) -> tuple[str, bool] | None:
    """Check a freshly built corruption (on two images of the dataset's size) or objective:
    ``None``, or one line naming the component, its source and the breach, and whether the
    component is third-party code."""
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
        kind, source = registry.singular, source_text(registry.entry(name))
        return (
            f"{kind} {name!r} ({source}) breaks the {kind} contract: {exc}{at}",
            not is_builtin(built) or isinstance(cause, PluginError),
        )
    return None
