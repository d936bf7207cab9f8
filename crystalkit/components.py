"""The one way a registered component is built: (registry, name, parameters) -> object.

The recipe loader's checks, the contract checks, the method, the loggers, the run builder and
compositions such as the ``compose`` corruption all call :func:`build_component`, so a component
is validated and constructed by the same rules wherever it is used:

* its parameters are validated against :func:`~crystalkit.params.config_model` (a declared
  ``Config`` class, or a strict model of the typed signature);
* a component that declares ``Config`` receives the validated config object; one with typed
  keyword arguments receives them as keywords; ``context`` (what a recipe does not hold, e.g. a
  backbone's corpus and device) is passed as keywords as well;
* the registry's ``factory`` (``create`` for backbones) builds it, else the object is called.

Failures are one line: :class:`ParamsError` for parameters that do not validate (naming the key),
:class:`ComponentError` for a ``ValueError`` or ``TypeError`` the constructor raises (its own
check of the parameters), a :class:`~crystalkit.errors.PluginError` naming the plugin and the
file:line for anything else third-party code raises. A built-in's other exceptions are crystalkit
bugs and keep their traceback.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from crystalkit.errors import UsageError, is_builtin, one_line, plugin_error
from crystalkit.params import config_model
from crystalkit.registry import Registry, source_text


class ParamsError(UsageError):
    """Parameters that do not validate. ``error`` and ``model`` let the recipe loader name the
    file each bad key came from."""

    def __init__(self, message: str, error: ValidationError, model: type[BaseModel]):
        super().__init__(message)
        self.error, self.model = error, model


class ComponentError(UsageError):
    """A constructor that refused its parameters (a ``ValueError`` or ``TypeError``); ``reason``
    is its message without the ``KIND 'NAME':`` prefix."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def validate_params(registry: Registry, name: str, params: Mapping[str, Any] | None) -> BaseModel:
    """``params`` validated against the parameter model of ``registry``'s component ``name``."""
    model = config_model(registry.get(name))
    try:
        return model.model_validate(dict(params or {}))
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        key = ".".join(str(p) for p in err["loc"]) or "<params>"
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        valid = ", ".join(model.model_fields) or "none"
        message = f"{registry.singular} {name!r}: {key}: {err['msg']}{more}; parameters: {valid}"
        raise ParamsError(one_line(message), exc, model) from None


def build_component(
    registry: Registry,
    name: str,
    params: Mapping[str, Any] | BaseModel | None = None,
    **context: Any,
) -> Any:
    """Build ``registry``'s component ``name`` (a registered name or an import path) from
    ``params`` (a mapping, validated here, or what :func:`validate_params` returned for it),
    passing ``context`` on (see the module docstring)."""
    obj = registry.get(name)
    model = config_model(obj)
    config = params if isinstance(params, model) else validate_params(registry, name, params)
    factory = getattr(obj, registry.factory) if registry.factory else obj
    if type(config) is getattr(obj, "Config", None):  # a declared Config: passed whole
        args, kwargs = (config,), context
    else:
        kwargs = {key: getattr(config, key) for key in type(config).model_fields}
        args, kwargs = (), kwargs | (config.model_extra or {}) | context
    try:
        return factory(*args, **kwargs)
    except UsageError:
        raise
    except (ValueError, TypeError) as exc:
        reason = one_line(exc)
        raise ComponentError(f"{registry.singular} {name!r}: {reason}", reason) from exc
    except Exception as exc:  # third-party code may fail in any way
        if is_builtin(obj):
            raise
        what = f"{registry.singular} {name!r}"
        raise plugin_error(what, source_text(registry.entry(name)), exc, obj) from exc
