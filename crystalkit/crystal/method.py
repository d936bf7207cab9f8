"""A recipe's training objective, assembled from its registries: what one step computes.

``method: finetune`` runs the intact path alone with cross-entropy on the answer (with a latent
block when the schedule gives K > 0: the "template only" baseline). ``method: crystal`` lays out
both paths, corrupts the images, runs the chosen strategy and adds the weighted objectives:

    loss = ce_weight(t) * CE  +  sum_i weight_i(t) * objective_i

Each weight is a schedule over the steps of the recipe (a plain number is a constant). A term
with ``gradient: false`` enters the loss value detached: it is computed and logged, and it trains
nothing (the released code's attention term).

``method: perceive`` trains the vision tower alone on dense per-cell labels
(:mod:`crystalkit.crystal.perception`), the stand-in for a pretrained vision tower.

With ``latents.write`` the cross-entropy also covers the latent template and block the model
writes (:meth:`Method._written_terms`: one mean per term over all its tokens, the latent block
shared by both paths counted once).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from crystalkit.components import build_component
from crystalkit.config.schema import ComponentSpec, Recipe
from crystalkit.config.sources import Sources, resolve_or_explain
from crystalkit.corruptions.boxes import Boxes, ResizeMode, resized_box
from crystalkit.corruptions.contract import Corruption, apply_corruption, reads_boxes
from crystalkit.crystal.layout import Layout, Packer
from crystalkit.crystal.paths import STRATEGIES, Needs, intact_only, resolve_layers
from crystalkit.crystal.perception import attach_heads, cell_labels, perception_terms
from crystalkit.data.boxes import Box, box_breach
from crystalkit.data.sample import Sample
from crystalkit.errors import UsageError
from crystalkit.latents.blocks import LatentBlock
from crystalkit.models.backbone import Backbone
from crystalkit.objectives.contract import Objective, call_objective
from crystalkit.objectives.cross_entropy import answer_cross_entropy, pooled_cross_entropy
from crystalkit.objectives.outputs import PathOutputs
from crystalkit.registries import CORRUPTIONS, OBJECTIVES, SCHEDULES, WEIGHTS
from crystalkit.seeding import derived_seed


def build_schedule(recipe: Recipe) -> Callable[[int, int], int]:
    spec = recipe.latents.schedule
    return build_component(SCHEDULES, spec.name, spec.params)


WeightSchedule = Callable[[int, int], float]


def build_weight(weight: float | ComponentSpec) -> WeightSchedule:
    """A term's weight as a schedule ``(step, total_steps) -> float`` (a number is a constant)."""
    if isinstance(weight, ComponentSpec):
        return build_component(WEIGHTS, weight.name, weight.params)
    return build_component(WEIGHTS, "constant", {"value": float(weight)})


def build_latents(recipe: Recipe, backbone: Backbone) -> tuple[LatentBlock, int]:
    """The recipe's latent block on ``backbone`` (adding its tokens) and the K used once training
    is over (evaluation, generation)."""
    schedule, total = build_schedule(recipe), recipe.train.steps
    max_k = max(schedule(step, total) for step in range(total + 1))
    block = LatentBlock(backbone, recipe.latents.family, max_k, recipe.latents.init_from)
    return block, schedule(total, total)


class Method:
    """Builds layouts and losses for one recipe (or one stage of it) on one backbone."""

    def __init__(
        self,
        recipe: Recipe,
        backbone: Backbone,
        training: bool = True,
        sources: Sources | None = None,
        object_attributes: dict[str, Sequence[str]] | None = None,
    ):
        """``training=False`` (evaluation, generation, export): no objectives, and the corruption
        is built when first used, so a run evaluates without its training-only plugins;
        ``sources`` (the run's recorded component sources) then say what to install;
        ``object_attributes`` (the dataset's: each attribute's values) label ``perceive``."""
        self.recipe = recipe
        self.crystal = recipe.method == "crystal"
        self.perceive = recipe.method == "perceive"
        self.vocab: dict[str, list[str]] = {}
        if self.perceive:
            attributes = recipe.perception.attributes
            attach_heads(backbone, attributes, object_attributes)
            self.vocab = {a: list(object_attributes[a]) for a in attributes}  # type: ignore[index]
        self.sources = sources or {}
        self.schedule = build_schedule(recipe)
        self.block, self.final_k = build_latents(recipe, backbone)
        template = recipe.latents.template
        self.packer = Packer(
            backbone,
            answer=recipe.prompt.answer,
            template=(template.open, template.close),
            write=recipe.latents.write,
            question_first=recipe.prompt.question_first,
        )
        self.strategy = STRATEGIES[recipe.crystal.strategy] if self.crystal else intact_only
        self.ce_weight = build_weight(
            recipe.crystal.ce_weight if self.crystal and training else 1.0
        )
        #: (key, weight schedule, objective, trains) per alignment term
        self.objectives: list[tuple[str, WeightSchedule, Objective, bool]] = []
        if self.crystal and training:
            for key, spec in recipe.objectives.items():
                objective = build_component(OBJECTIVES, spec.name, spec.params)
                self.objectives.append((key, build_weight(spec.weight), objective, spec.gradient))
        layers = sorted({layer for _, _, o, _ in self.objectives for layer in o.attention_layers})
        self.needs = Needs(tuple(layers), any(o.needs_hidden for _, _, o, _ in self.objectives))
        if training:
            self.corruption  # noqa: B018 -- built now: a broken corruption fails before training
        if self.needs.layers:
            try:
                resolve_layers(backbone, self.needs.layers)
            except ValueError as exc:
                raise UsageError(f"objectives: {exc}") from None
            backbone.enable_attention_capture()

    @functools.cached_property
    def corruption(self) -> Corruption:
        """The recipe's corruption, built on first use."""
        spec = self.recipe.corruption
        resolve_or_explain(CORRUPTIONS, spec.name, self.sources, "the run's corruption")
        return build_component(CORRUPTIONS, spec.name, spec.params)

    @functools.cached_property
    def corruption_blame(self) -> tuple[str, str] | None:
        """``("corruption 'NAME'", source)`` of a third-party corruption, whose errors become a
        :class:`~crystalkit.errors.PluginError` naming it; ``None`` for a built-in one (its errors
        are crystalkit's bugs and keep their traceback)."""
        return CORRUPTIONS.third_party(self.recipe.corruption.name)

    @functools.cached_property
    def objective_blame(self) -> dict[str, tuple[str, str]]:
        """``("objective 'NAME'", source)`` per key of a third-party objective."""
        specs = self.recipe.objectives.items() if self.crystal else ()
        return {k: b for k, s in specs if (b := OBJECTIVES.third_party(s.name)) is not None}

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
        if self.perceive:
            layout.cell_labels = cell_labels(samples, self.vocab, self.packer.backbone.image_grid)
        return layout

    def corrupt(self, samples: Sequence[Sample], seed: int) -> torch.Tensor | list[torch.Tensor]:
        """The samples' images corrupted (float ``[B, 3, H, W]`` in [0, 1]; a list of ``[3, H,
        W]`` when their sizes differ, each corrupted in turn with the one generator).
        ``crystal.corrupt_at``: ``sample`` corrupts the image the sample holds (the backbone
        resizes afterwards); ``model_input`` first resizes it to what the vision tower sees
        (:meth:`~crystalkit.models.backbone.Backbone.input_size`). A corruption that reads the
        evidence gets each sample's boxes, resized with its image
        (:func:`~crystalkit.corruptions.boxes.resized_box`)."""
        corruption = self.corruption  # first: a missing plugin is named with what to install
        images = [s.image.float() / 255.0 for s in samples]
        boxes = [self._evidence(s) for s in samples] if reads_boxes(corruption) else None
        if self.recipe.crystal.corrupt_at == "model_input":
            resized = [self._model_input(image) for image in images]
            if boxes is not None:
                boxes = [
                    [resized_box(b, i.shape[-2:], r.shape[-2:], self._resize_mode) for b in bs]
                    for bs, i, r in zip(boxes, images, resized, strict=True)
                ]
            images = resized
        generator = torch.Generator().manual_seed(seed)

        def apply(batch: torch.Tensor, batch_boxes: Boxes | None) -> torch.Tensor:
            return apply_corruption(
                corruption, batch, generator, batch_boxes, self.corruption_blame
            )

        if len({tuple(image.shape) for image in images}) == 1:
            return apply(torch.stack(images), boxes)
        return [
            apply(image[None], None if boxes is None else boxes[i : i + 1])[0]
            for i, image in enumerate(images)
        ]

    def _evidence(self, sample: Sample) -> list[Box]:
        """``sample``'s evidence boxes, for a corruption that reads them (every object's box when
        it declares ``box_scope = "objects"``, occluder bars included): a sample without any (data that does not mark
        its evidence, e.g. a benchmark file) is a usage error."""
        name = self.recipe.corruption.name
        if getattr(self.corruption, "box_scope", "evidence") == "objects":
            objects = sample.meta.get("objects", [])  # with their occluder bars: no outlines left
            evidence = [o["box"] for o in objects] + [
                o["occluder"] for o in objects if "occluder" in o
            ]
            if not evidence:
                raise UsageError(
                    f"corruption {name!r} reads every object's box, but sample {sample.index} "
                    "lists no objects (meta['objects']); use scope: evidence, or data that lists "
                    "its objects (synthetic_shapes does)"
                )
        else:
            evidence = sample.evidence
        if not evidence:
            raise UsageError(
                f"corruption {name!r} reads each sample's evidence boxes, but sample "
                f"{sample.index} has none (Sample.boxes and Sample.box are empty); use it on data "
                "that marks its evidence (synthetic_shapes does), or a corruption that reads no "
                "boxes"
            )
        height, width = sample.image.shape[-2:]
        for box in evidence:
            breach = box_breach(box, height, width)
            if breach is not None:
                raise UsageError(
                    f"corruption {name!r}: sample {sample.index}'s evidence box {box} {breach}"
                )
        return [tuple(int(v) for v in box) for box in evidence]

    @property
    def _resize_mode(self) -> ResizeMode:
        """The filter of :meth:`_model_input`: what the backbone's own resize uses."""
        return "bicubic" if self.packer.backbone.resizes_itself else "bilinear"

    def _model_input(self, image: torch.Tensor) -> torch.Tensor:
        """``[3, H, W]`` in [0, 1] at the size the backbone's vision tower sees."""
        backbone = self.packer.backbone
        size = backbone.input_size(*image.shape[-2:])
        if size is None:
            raise UsageError(
                f"crystal.corrupt_at: model_input needs the backbone's input size; "
                f"{type(backbone).__name__} does not give one (use corrupt_at: sample)"
            )
        if tuple(size) == tuple(image.shape[-2:]):
            return image
        out = torch.nn.functional.interpolate(
            image[None],
            size=tuple(size),
            mode=self._resize_mode,
            antialias=True,
            align_corners=False,
        )
        return out[0].clamp(0.0, 1.0)

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

    def generated_prompt_layout(
        self, samples: Sequence[Sample], corrupt_seed: int | None = None
    ) -> Layout:
        """Prompts of generated latents: the intact path up to the question (the assistant turn),
        before the latent template; the model writes the template, the block and the answer.
        ``corrupt_seed`` as in :meth:`prompt_layout`. Recurrent latents are refused: they are
        hidden states, not tokens the model can write."""
        if self.block.recurrent:
            raise UsageError(
                "generated latents need token latents: recurrent latents are hidden states, not "
                "tokens the model can write (evaluate with forced latents)"
            )
        layout = self.packer(samples, (), with_answer=False, until_question=True)
        if corrupt_seed is not None:
            images = self.corrupt(samples, corrupt_seed)
            layout.pixel_values = self.packer.backbone.preprocess_images(images)
        return layout

    def written_ids(self) -> list[int]:
        """The ids a forced prompt holds after the question, which a model that writes its own
        block should write: opening text, the final latent block, closing text, answer cue."""
        return self.packer.written_ids(self.block.ids(self.final_k))

    def written_prefix(self) -> tuple[list[int], int]:
        """What a model that writes its own block writes up to the block's end (the template's
        opening text, then the final latent block), and where the block starts in it."""
        opening = self.packer.opening_ids
        return [*opening, *self.block.ids(self.final_k)], len(opening)

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
        if self.perceive:
            total, terms = perception_terms(backbone, layout.pixel_values, layout.cell_labels)
            return total, {"perceive": total, **terms}
        return self.terms(self.strategy(backbone, layout, self.needs), weights)

    def terms(
        self, out: PathOutputs, weights: dict[str, float] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        weights = self.weights_at(0) if weights is None else weights
        if out.written:
            ce, terms = self._written_terms(out)
        else:
            ce_intact = answer_cross_entropy(out.intact_logits, out.targets)
            if out.corrupted_logits is None:
                return weights["ce"] * ce_intact, {"ce": ce_intact}
            ce_corrupted = answer_cross_entropy(out.corrupted_logits, out.targets)
            ce = {
                "intact": ce_intact,
                "corrupted": ce_corrupted,
                "both": (ce_intact + ce_corrupted) / 2,
            }[self.recipe.crystal.ce]
            terms = {"ce_intact": ce_intact, "ce_corrupted": ce_corrupted}
        total = weights["ce"] * ce
        if out.corrupted_logits is None:
            return total, terms
        for key, _, objective, trains in self.objectives:
            blamed = self.objective_blame.get(key)
            value = objective(out) if blamed is None else call_objective(objective, out, *blamed)
            terms[key] = value
            total = total + weights[key] * (value if trains else value.detach())
        return total, terms

    def _written_terms(self, out: PathOutputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Cross-entropy with the written template (``latents.write``): each term is one mean over
        all the tokens it covers. A path's CE covers its answer and its written template, the
        shared latent block D included; ``both`` pools the two paths' tokens and counts D's once,
        as the released code's single packed sequence does (its CE covers each labelled token of
        the sequence once). ``ce_template`` logs the template part alone."""
        written = out.written

        def own(owner: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
            return [written[owner]] if owner in written else []

        intact = [(out.intact_logits, out.targets), *own("intact")]
        template = pooled_cross_entropy(list(written.values()))
        ce_intact = pooled_cross_entropy([*intact, *own("shared")])
        if out.corrupted_logits is None:
            return ce_intact, {"ce": ce_intact, "ce_template": template}
        corrupted = [(out.corrupted_logits, out.targets), *own("corrupted")]
        ce_corrupted = pooled_cross_entropy([*corrupted, *own("shared")])
        placement = self.recipe.crystal.ce
        if placement == "both":
            ce = pooled_cross_entropy([*intact, *corrupted, *own("shared")])
        else:
            ce = ce_intact if placement == "intact" else ce_corrupted
        terms = {"ce_intact": ce_intact, "ce_corrupted": ce_corrupted, "ce_template": template}
        return ce, terms
