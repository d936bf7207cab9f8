"""The registries every recipe section resolves against.

Each one lazily imports its built-in modules and its entry-point group
(``crystalkit.<kind>``) on first lookup, so plugins and built-ins are always visible.
"""

from __future__ import annotations

from crystalkit.registry import Registry

BACKBONES: Registry = Registry(
    "backbones",
    (
        "crystalkit.models.embedded",
        "crystalkit.models.hf.qwen_vl",
        "crystalkit.models.hf.llava",
        "crystalkit.models.hf.idefics3",
    ),
    factory="create",
)
DATASETS: Registry = Registry("datasets", ("crystalkit.data.synthetic", "crystalkit.data.llava"))
CORRUPTIONS: Registry = Registry(
    "corruptions", ("crystalkit.corruptions.basic", "crystalkit.corruptions.evidence")
)
OBJECTIVES: Registry = Registry("objectives", ("crystalkit.objectives.alignment",))
SCHEDULES: Registry = Registry("schedules", ("crystalkit.latents.schedules",))
WEIGHTS: Registry = Registry("weights", ("crystalkit.objectives.weights",))
LOGGERS: Registry = Registry("loggers", ("crystalkit.training.loggers",))

ALL: dict[str, Registry] = {
    r.kind: r for r in (BACKBONES, DATASETS, CORRUPTIONS, OBJECTIVES, SCHEDULES, WEIGHTS, LOGGERS)
}
