"""A recipe's training objective, assembled from its registries: what one step computes.

``method: finetune`` runs the intact path alone with cross-entropy on the answer (with a latent
block when the schedule gives K > 0: the "template only" baseline). ``method: crystal`` lays out
both paths, corrupts the images, runs the chosen strategy and adds the weighted objectives:

    loss = ce_weight(t) * CE  +  sum_i weight_i(t) * objective_i

Each weight is a schedule over the steps of the recipe (a plain number is a constant). A term
with ``gradient: false`` enters the loss value detached: it is computed and logged, and it trains
nothing (the released code's attention term).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from crystalkit.config.schema import ComponentSpec, Recipe
from crystalkit.corruptions import Corruption, build_corruption
from crystalkit.crystal.layout import Layout, Packer
from crystalkit.crystal.paths import STRATEGIES, Needs, PathOutputs, intact_only, resolve_layers
from crystalkit.data.sample import Sample
from crystalkit.errors import UsageError
from crystalkit.latents.blocks import LatentBlock
from crystalkit.models.backbone import Backbone
from crystalkit.objectives.alignment import Objective
from crystalkit.registries import OBJECTIVES, SCHEDULES, WEIGHTS
from crystalkit.training.losses import answer_cross_entropy
from crystalkit.training.sampler import derived_seed


def build_schedule(recipe: Recipe) -> Callable[[int, int], int]:
    spec = recipe.latents.schedule
    return SCHEDULES.get(spec.name)(**spec.params)


WeightSchedule = Callable[[int, int], float]


def build_weight(weight: float | ComponentSpec) -> WeightSchedule:
    """A term's weight as a schedule ``(step, total_steps) -> float`` (a number is a constant)."""
    if isinstance(weight, ComponentSpec):
        return WEIGHTS.get(weight.name)(**weight.params)
    return WEIGHTS.get("constant")(value=float(weight))


def build_latents(recipe: Recipe, backbone: Backbone) -> tuple[LatentBlock, int]:
    """The recipe's latent block on ``backbone`` (adding its tokens) and the K used once training
    is over (evaluation, generation)."""
    schedule, total = build_schedule(recipe), recipe.train.steps
    max_k = max(schedule(step, total) for step in range(total + 1))
    block = LatentBlock(backbone, recipe.latents.family, max_k, recipe.latents.init_from)
    return block, schedule(total, total)


class Method:
    """Builds layouts and losses for one recipe (or one stage of it) on one backbone."""

    def __init__(self, recipe: Recipe, backbone: Backbone):
        self.recipe = recipe
        self.crystal = recipe.method == "crystal"
        self.schedule = build_schedule(recipe)
        self.block, self.final_k = build_latents(recipe, backbone)
        self.packer = Packer(backbone, answer=recipe.prompt.answer)
        self.corruption: Corruption = build_corruption(recipe.corruption)
        self.ce_weight = build_weight(recipe.crystal.ce_weight if self.crystal else 1.0)
        #: (key, weight schedule, objective, trains) per alignment term
        self.objectives: list[tuple[str, WeightSchedule, Objective, bool]] = []
        if self.crystal:
            for key, spec in recipe.objectives.items():
                objective = OBJECTIVES.get(spec.name)(**spec.params)
                self.objectives.append((key, build_weight(spec.weight), objective, spec.gradient))
        layers = sorted({layer for _, _, o, _ in self.objectives for layer in o.attention_layers})
        self.needs = Needs(tuple(layers), any(o.needs_hidden for _, _, o, _ in self.objectives))
        self.strategy = STRATEGIES[recipe.crystal.strategy] if self.crystal else intact_only
        if self.needs.layers:
            try:
                resolve_layers(backbone, self.needs.layers)
            except ValueError as exc:
                raise UsageError(f"objectives: {exc}") from None
            backbone.enable_attention_probe()

    def k_at(self, step: int) -> int:
        return self.schedule(step, self.recipe.train.steps)

    def weights_at(self, step: int) -> dict[str, float]:
        """Every term's weight at ``step``: ``ce``, then one per objective key."""
        total = self.recipe.train.steps
        weights = {"ce": self.ce_weight(step, total)}
        weights.update({key: weight(step, total) for key, weight, _, _ in self.objectives})
        return weights

    def layout(
        self, samples: Sequence[Sample], step: int, corrupt_seed: int | None = None
    ) -> Layout:
        """Step ``step``'s batch: K from the schedule, images corrupted with a generator seeded
        from ``corrupt_seed`` (default ``(seed, step)``), so that a resumed run corrupts
        identically."""
        corrupted = None
        if self.crystal:
            seed = derived_seed(self.recipe.seed, step) if corrupt_seed is None else corrupt_seed
            corrupted = self.corrupt(samples, seed)
        layout = self.packer(
            samples,
            self.block.ids(self.k_at(step)),
            corrupted_images=corrupted,
            blank_latents=self.crystal and not self.recipe.crystal.copy_latents,
            recurrent=self.block.recurrent,
        )
        layout.detach_corrupted_image = self.crystal and self.recipe.crystal.detach_corrupted_image
        return layout

    def corrupt(self, samples: Sequence[Sample], seed: int) -> torch.Tensor:
        """The samples' images corrupted (float ``[B, 3, H, W]`` in [0, 1])."""
        images = torch.stack([s.image for s in samples]).float() / 255.0
        return self.corruption(images, torch.Generator().manual_seed(seed))

    def prompt_layout(self, samples: Sequence[Sample], corrupt_seed: int | None = None) -> Layout:
        """Generation prompts with the final latent block (the intact path up to the answer cue);
        with ``corrupt_seed``, its images are corrupted versions (to measure what the corruption
        leaves of the evidence)."""
        layout = self.packer(
            samples, self.block.ids(self.final_k), with_answer=False, recurrent=self.block.recurrent
        )
        if corrupt_seed is not None:
            images = self.corrupt(samples, corrupt_seed)
            layout.pixel_values = self.packer.backbone.preprocess_images(images)
        return layout

    def control_layout(self, samples: Sequence[Sample], seed: int, blank: bool) -> Layout:
        """A generation prompt with both images (the corrupted one seeded by ``seed``) and the
        final latent block, plus the image-free block D' with ``blank``: what the ``copied`` and
        ``no_copy`` views of :func:`~crystalkit.evaluation.generation.generate_answers` decode."""
        return self.packer(
            samples,
            self.block.ids(self.final_k),
            corrupted_images=self.corrupt(samples, seed),
            blank_latents=blank,
            with_answer=False,
            recurrent=self.block.recurrent,
        )

    def loss(
        self, backbone: Backbone, layout: Layout, weights: dict[str, float] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The total loss and each (unweighted) term, with ``weights`` (default: those of the
        first step, see :meth:`weights_at`)."""
        return self.terms(self.strategy(backbone, layout, self.needs), weights)

    def terms(
        self, out: PathOutputs, weights: dict[str, float] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        weights = self.weights_at(0) if weights is None else weights
        ce_intact = answer_cross_entropy(out.intact_logits, out.targets)
        if out.corrupted_logits is None:
            return weights["ce"] * ce_intact, {"ce": ce_intact}
        ce_corrupted = answer_cross_entropy(out.corrupted_logits, out.targets)
        placement = self.recipe.crystal.ce
        ce = {
            "intact": ce_intact,
            "corrupted": ce_corrupted,
            "both": (ce_intact + ce_corrupted) / 2,
        }[placement]
        terms = {"ce_intact": ce_intact, "ce_corrupted": ce_corrupted}
        total = weights["ce"] * ce
        for key, _, objective, trains in self.objectives:
            value = objective(out)
            terms[key] = value
            total = total + weights[key] * (value if trains else value.detach())
        return total, terms
