"""A run as a sequence of stages on one model.

A recipe without ``stages:`` is one stage, named ``train``, covering every step. With stages,
stage *i* takes ``fraction_i`` of ``train.steps`` (rounded at the cumulative boundaries, so
``train.steps=N`` still means N steps) and runs the recipe with that stage's sections in place of
the recipe's own. Within a stage, schedules (latent K, loss weights, learning rate) see the stage's
own step count and a step counter that starts at 0, so a stage behaves exactly like a run of its
own started from the previous stage's weights: each stage starts a fresh AdamW state and its own
warmup and decay (what the paper does when it applies CrystaL to an instruct model). Data order and
random ops follow the global step, so a resumed run replays them whatever the stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from crystalkit.config.schema import STAGE_SECTIONS, Recipe, stage_steps

#: the name of the single stage of a recipe without ``stages:``
SINGLE_STAGE = "train"


@dataclass(frozen=True)
class Stage:
    """One stage of a run: global steps ``[start, start + steps)`` under ``recipe``, whose
    ``train.steps`` is the stage's own length."""

    index: int
    name: str
    start: int
    steps: int
    recipe: Recipe

    @property
    def stop(self) -> int:
        return self.start + self.steps

    def local(self, step: int) -> int:
        """The stage's own step counter for global ``step``."""
        return step - self.start


def stage_recipe(recipe: Recipe, index: int, steps: int) -> Recipe:
    """The recipe stage ``index`` runs: the stage's sections in place of the recipe's, no stages,
    and ``train.steps`` = the stage's length."""
    stage = recipe.stages[index]
    update = {key: getattr(stage, key) for key in STAGE_SECTIONS if key != "train"}
    update = {key: value for key, value in update.items() if value is not None}
    if stage.latents is not None:
        latents = {k: v for k, v in stage.latents if v is not None}
        update["latents"] = recipe.latents.model_copy(update=latents)
    if stage.objectives is not None:
        update["objectives"] = {k: v for k, v in stage.objectives.items() if v is not None}
    train = {k: v for k, v in stage.train or () if v is not None}
    update["train"] = recipe.train.model_copy(update=train | {"steps": steps})
    return recipe.model_copy(update=update | {"stages": []})


def plan_stages(recipe: Recipe) -> list[Stage]:
    """The run's stages in order (one for a recipe without ``stages:``)."""
    if not recipe.stages:
        return [Stage(0, SINGLE_STAGE, 0, recipe.train.steps, recipe)]
    plan, start = [], 0
    for i, (spec, steps) in enumerate(
        zip(recipe.stages, stage_steps(recipe.stage_fractions, recipe.train.steps), strict=True)
    ):
        plan.append(Stage(i, spec.name, start, steps, stage_recipe(recipe, i, steps)))
        start += steps
    return plan


def stage_at(plan: list[Stage], step: int) -> Stage:
    """The stage global ``step`` (0-based) belongs to; the last one for ``step = train.steps``."""
    for stage in plan:
        if step < stage.stop:
            return stage
    return plan[-1]
