"""The objective contract: what an objective declares, what it returns, and what it averages.

An **objective** ``(PathOutputs) -> loss`` declares ``attention_layers`` (a tuple of ints, -1 =
last layer) and ``needs_hidden`` (a bool), reads only what it declares, and returns a finite 0-dim
float tensor differentiable in its inputs. It also says over which ``units`` its value is a mean
(:data:`UNITS`; an objective that declares none is taken to average over ``samples``), which
multi-process training needs to combine the shards' values exactly
(:mod:`crystalkit.training.distributed`).

The recipe loader runs :func:`check_objective` on every objective a recipe names
(:mod:`crystalkit.config.contracts`); plugin authors run it, and property-based variants, from
:mod:`crystalkit.testing`.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from crystalkit.data.prompt import IGNORE_INDEX
from crystalkit.errors import ContractError, PluginError, call_plugin, one_line
from crystalkit.objectives.outputs import PathOutputs

Units = Literal["answer_tokens", "answer_samples", "samples"]
#: what an objective's value can be a mean over: the answer tokens of the batch; the samples that
#: have an answer token (a per-sample mean, then the mean over those samples); all samples
UNITS: tuple[Units, ...] = ("answer_tokens", "answer_samples", "samples")
#: the units of an objective that declares none
DEFAULT_UNITS: Units = "samples"


@runtime_checkable
class Objective(Protocol):
    attention_layers: tuple[int, ...]
    needs_hidden: bool

    def __call__(self, outputs: PathOutputs) -> torch.Tensor: ...


def objective_units(objective: object) -> Units:
    """What ``objective``'s value is a mean over: its declared ``units``, else
    :data:`DEFAULT_UNITS`."""
    return getattr(objective, "units", None) or DEFAULT_UNITS


def _shape(tensor: torch.Tensor) -> str:
    return f"[{', '.join(str(s) for s in tensor.shape)}]"


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
    """Random :class:`~crystalkit.objectives.outputs.PathOutputs` of both paths with what ``objective``
    declares: attention maps ``[batch, width, latents]`` (rows summing to 1) at each of its
    ``attention_layers`` (none when ``latents`` is 0, as at steps without latents) and, with
    ``needs_hidden``, hidden states ``[batch, width, hidden]``. Every tensor an objective may
    differentiate is a leaf requiring grad; the last answer column of the first sample is padding
    (``IGNORE_INDEX``) when ``width > 1``."""
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


def check_declarations(objective: Any) -> None:
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
    if units is not None and units not in UNITS:
        raise ContractError(
            f"declares units={units!r}; expected one of {', '.join(UNITS)} (or no units)"
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
    check_declarations(objective)
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


def call_objective(objective: Objective, out: PathOutputs, what: str, source: str) -> torch.Tensor:
    """Call a third-party objective: an exception it raises, or a result that is not a 0-dim
    tensor, becomes a one-line :class:`~crystalkit.errors.PluginError` naming it."""
    value = call_plugin(what, source, objective, out)
    if not isinstance(value, torch.Tensor) or value.ndim != 0:
        got = (
            f"shape {list(value.shape)}"
            if isinstance(value, torch.Tensor)
            else type(value).__name__
        )
        raise PluginError(
            f"{what} ({source}) returned {got}; an objective must return a 0-dim tensor"
        )
    return value
