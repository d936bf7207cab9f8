"""Control evaluations: what the latent block does for the answer (``eval.controls``).

Each control re-evaluates the split under one intervention and reports its accuracy:

* ``corrupted`` — the corrupted images, with the latent block they compute themselves;
* ``copied`` — the corrupted images, with the latent block the intact images compute (the
  corrupted path of training: the method's claim is that this recovers the intact answer);
* ``no_copy`` — the corrupted images, with a latent block that saw no image;
* ``zero`` / ``mean`` / ``shuffle`` / ``swap`` — the intact images with the latent block replaced
  (:mod:`crystalkit.evaluation.replacement`).

All corrupted views use the same corrupted images (seeded per batch from the run's seed). The
corrupted views put a latent block at known columns, so they always force the block into the
prompt; the replacements follow ``eval.latent_block`` (with ``generated`` they replace the block the
model writes itself).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch.utils.data import Dataset

from crystalkit.config.schema import EvalConfig
from crystalkit.crystal.method import Method
from crystalkit.evaluation.accuracy import EvalResult, eval_batches, evaluate
from crystalkit.evaluation.replacement import (
    BUILTIN,
    REPLACEMENTS,
    dataset_mean_kv,
    mean_replacement,
)
from crystalkit.models.backbone import Backbone

VIEWS = ("corrupted", "copied", "no_copy")
CONTROLS = (*VIEWS, *REPLACEMENTS)


def control_accuracy(
    backbone: Backbone, data: Dataset, method: Method, cfg: EvalConfig, name: str
) -> float:
    """Accuracy on ``data`` under control ``name`` (one of :data:`CONTROLS`)."""
    return control_result(backbone, data, method, cfg, name).accuracy


def control_result(
    backbone: Backbone, data: Dataset, method: Method, cfg: EvalConfig, name: str
) -> EvalResult:
    """The evaluation of ``data`` under control ``name`` (one of :data:`CONTROLS`); the corrupted
    views with forced latents, the replacements with ``cfg.latent_block``."""
    if name in VIEWS:
        cfg = cfg.model_copy(update={"latent_block": "forced"})
    if name == "corrupted":
        return evaluate(backbone, data, method, cfg, corrupted=True)
    if name in VIEWS:
        return evaluate(backbone, data, method, cfg, view=name)
    if name == "mean":
        device = next(backbone.parameters()).device
        layouts = [method.prompt_layout(batch).to(device) for _, batch in eval_batches(data, cfg)]
        replacement = mean_replacement(dataset_mean_kv(backbone.eval(), layouts))
    else:
        replacement = BUILTIN[name]
    return evaluate(backbone, data, method, cfg, replacement=replacement)


def run_controls(
    backbone: Backbone, data: Dataset, method: Method, cfg: EvalConfig, names: Sequence[str]
) -> dict[str, float]:
    """``{control: accuracy}``; controls that need a latent block are skipped without one
    (K = 0), since they would repeat the plain evaluation."""
    needs_latents = set(REPLACEMENTS) | {"copied", "no_copy"}
    return {
        name: control_accuracy(backbone, data, method, cfg, name)
        for name in names
        if method.final_k > 0 or name not in needs_latents
    }
