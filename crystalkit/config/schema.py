"""The recipe's typed structure. Every field has a default and a description (shown in the docs
and in the JSON Schema editors use for autocompletion)."""

from __future__ import annotations

import itertools
import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)


class _Strict(BaseModel):
    """Unknown keys are errors; so are ``.nan`` and ``.inf``, which no recipe number means."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _weight_shape(value: Any) -> Any:
    """Before validation: a number, or a mapping naming a weight schedule (one clear error
    instead of one per alternative of the union)."""
    if isinstance(value, dict):
        if "name" not in value:
            raise ValueError(
                "a weight schedule needs a name, e.g. {name: linear, start: 0, end: 1} "
                "(`crystalkit list weights`)"
            )
        return value
    if isinstance(value, bool) or not isinstance(value, int | float | ComponentSpec):
        raise ValueError(f"expected a number >= 0 or a weight schedule mapping, got {value!r}")
    return value


def _check_weight(weight: float | ComponentSpec) -> float | ComponentSpec:
    if isinstance(weight, float) and not 0 <= weight < math.inf:
        raise ValueError(f"must be >= 0 and finite (a number, or a weight schedule), got {weight}")
    return weight


#: a loss term's weight: a number >= 0, or a weight schedule (WEIGHTS) resolved by the loader
Weight = Annotated[
    "float | ComponentSpec", BeforeValidator(_weight_shape), AfterValidator(_check_weight)
]


class ComponentSpec(BaseModel):
    """A registered component: ``name`` plus that component's own parameters."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(description="registered name, 'package.module:attr' or 'file.py:attr'")

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ObjectiveSpec(ComponentSpec):
    """An alignment objective under ``objectives:``; its key names it unless ``name`` is given
    (so one objective can appear twice, e.g. attention at two layer sets)."""

    name: str | None = Field(None, description="registered objective (defaults to the key)")
    weight: Weight = Field(
        1.0,
        description="weight of this term in the total loss: a number, or a weight schedule "
        "over the stage (WEIGHTS), e.g. {name: gate, until: 0.5}",
    )
    gradient: bool = Field(
        True,
        description="false: the term is computed, logged and counted in the loss value but gives "
        "no gradient (how the released code's attention term behaves)",
    )


#: the released CrystaL code's latent template: ``<think> Because the feature of the image is`` +
#: the latent block + ``. </think>``
RELEASED_TEMPLATE = {"open": "<think> Because the feature of the image is", "close": ". </think>"}
#: ``latents.template`` shorthands
TEMPLATE_PRESETS: dict[str, dict[str, str]] = {"none": {}, "released": RELEASED_TEMPLATE}


def _template_preset(value: Any) -> Any:
    """Before validation: a preset name becomes the text it stands for."""
    if isinstance(value, str):
        if value not in TEMPLATE_PRESETS:
            raise ValueError(
                f"expected {' or '.join(TEMPLATE_PRESETS)}, or a mapping {{open: TEXT, close: "
                f"TEXT}}, got {value!r}"
            )
        return dict(TEMPLATE_PRESETS[value])
    return value


class LatentTemplate(_Strict):
    """Text around the latent block: ``open`` ends the question, ``close`` starts the answer
    (before the answer cue); both empty = no template."""

    open: str = Field("", description="text between the question and the latent block")
    close: str = Field("", description="text between the latent block and the answer cue")


class LatentsConfig(_Strict):
    family: Literal["token", "recurrent"] = Field(
        "token",
        description="token: K learned special tokens; recurrent: each slot's input is the "
        "previous position's last hidden state (Coconut)",
    )
    schedule: ComponentSpec = Field(
        default_factory=lambda: ComponentSpec(name="fixed", k=0),
        description="latents per step (SCHEDULES); K = 0 is no latent block",
    )
    init_from: str | None = Field(
        None, description="existing token whose rows initialise the new ones (default: eos)"
    )
    train_new_rows_only: bool = Field(
        False,
        description="train only the new tokens' rows of the embedding and output matrices "
        "(the reference does this on a pretrained model)",
    )
    template: Annotated[
        LatentTemplate,
        BeforeValidator(
            _template_preset, json_schema_input_type=Literal["none", "released"] | LatentTemplate
        ),
    ] = Field(
        default_factory=LatentTemplate,
        description="text around the latent block: none, released (the released code's "
        "`<think> Because the feature of the image is` ... `. </think>`) or {open, close}; "
        "stored as its text",
    )
    write: bool = Field(
        False,
        description="the model writes its own latent block, as released: cross-entropy also "
        "covers the template text, the latent tokens and the answer cue, pooled with the answer "
        "tokens (token latents only)",
    )

    @field_validator("write")
    @classmethod
    def _writable(cls, write: bool, info: ValidationInfo) -> bool:
        if write and info.data.get("family") == "recurrent":
            raise ValueError(
                "recurrent latents are hidden states, not tokens the model can write; "
                "got family recurrent (use latents.family=token)"
            )
        return write


class CrystalConfig(_Strict):
    strategy: Literal["packed", "two_pass"] = Field(
        "packed",
        description="packed: one forward over A B C D E F (reference); two_pass: intact pass, "
        "then a corrupted pass reusing the latent block's keys/values",
    )
    copy_latents: bool = Field(
        True,
        description="false = no_copy control: the corrupted path reads a latent block computed "
        "with no image in view",
    )
    ce: Literal["intact", "corrupted", "both"] = Field(
        "both", description="which path's answer tokens get cross-entropy (both: their mean)"
    )
    ce_weight: Weight = Field(
        1.0,
        description="weight of the cross-entropy term: a number or a weight schedule (WEIGHTS)",
    )
    detach_corrupted_image: bool = Field(
        False,
        description="stop the gradient at the corrupted image's features: no loss reaches the "
        "vision encoder through the corrupted image (the latents' route is untouched)",
    )
    corrupt_at: Literal["sample", "model_input"] = Field(
        "sample",
        description="sample: corrupt the image as the sample holds it, then the backbone "
        "resizes (native size where the data keeps it — the released code's blur-then-resize; "
        "square datasets already hold their image_size); model_input: resize to what the "
        "vision tower sees first (backbone.image_size, or the processor's size), then corrupt",
    )


def _logger_names(value: Any) -> Any:
    """Before validation: a logger may be given by its name alone (``[tensorboard, wandb]``)."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        return [{"name": item} if isinstance(item, str) else item for item in value]
    return value


class TrainConfig(_Strict):
    steps: int = Field(600, ge=1, le=10_000_000, description="optimizer steps")
    batch_size: int = Field(
        32,
        ge=1,
        le=1_000_000,
        description="samples per optimizer step, over all processes and micro-batches (the "
        "global batch); divisible by processes x grad_accum_steps",
    )
    grad_accum_steps: int = Field(
        1, ge=1, description="micro-batches per optimizer step (same result, less memory)"
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="autocast dtype of forward and loss (weights and optimizer stay fp32); "
        "fp16 adds dynamic loss scaling",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute decoder layers in backward instead of storing activations"
    )
    fsdp: bool = Field(
        False,
        description="shard weights, gradients and optimizer state over the processes (FSDP2); "
        "needs several processes",
    )
    lr: float = Field(1e-3, gt=0, le=100, description="peak learning rate (AdamW)")
    vision_lr_scale: float = Field(
        1.0,
        ge=0,
        le=100,
        description="the vision tower's learning rate (encoder and projector: "
        "Backbone.vision_tower) as a multiple of lr; 0 leaves it as it is (its gradients are "
        "still computed and counted in grad_clip's norm)",
    )
    weight_decay: float = Field(0.01, ge=0, le=100, description="AdamW decoupled weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="decay after warmup (transformers' schedulers)"
    )
    warmup_ratio: float = Field(0.05, ge=0, le=1, description="share of steps with linear warmup")
    grad_clip: float | None = Field(1.0, gt=0, description="max global grad norm; null disables")
    log_every: int = Field(10, ge=1, description="steps between metric lines")
    eval_every: int = Field(0, ge=0, description="steps between validation passes; 0 = only at end")
    save_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = only at end")
    keep_checkpoints: int = Field(2, ge=1, description="most recent checkpoints kept on disk")
    num_threads: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="torch CPU threads (1 on a machine shared with busy jobs); null = "
        "OMP_NUM_THREADS if set, else the cores this process may use",
    )
    loggers: Annotated[list[ComponentSpec], BeforeValidator(_logger_names)] = Field(
        default_factory=list,
        description="where metrics go besides metrics.jsonl (LOGGERS): names or "
        "{name: ..., params}, e.g. [tensorboard, {name: wandb, project: p}]; main process only",
    )


class EvalConfig(_Strict):
    split: str = Field("val", description="split evaluated periodically during training")
    extra_splits: list[str] = Field(
        default_factory=list,
        description="more splits evaluated at every periodic evaluation, logged under their own "
        "names: [train] gives train-vs-validation learning curves (under- or overfitting)",
    )
    final_split: str = Field("test", description="split evaluated once training finishes")
    max_samples: int | None = Field(None, ge=1, description="cap on evaluated samples per split")
    batch_size: int = Field(128, ge=1, le=1_000_000, description="samples per evaluation batch")
    max_new_tokens: int = Field(
        4, ge=1, le=65_536, description="greedy decoding budget for the answer"
    )
    latent_block: Literal["forced", "generated"] = Field(
        "forced",
        description="forced: the prompt holds the latent template and block, the model writes "
        "the answer; generated: the prompt ends at the question and the model writes the "
        "template, the block and the answer itself (token latents; controls always force)",
    )
    controls: list[Literal["corrupted", "copied", "no_copy", "zero", "mean", "shuffle", "swap"]] = (
        Field(
            default_factory=list,
            description="extra evaluations of final_split, in results.json under controls: the "
            "corrupted image with its own latents (corrupted), with the intact image's latents "
            "copied in (copied), with latents that never saw the image (no_copy); the latent "
            "latent replacements zero, mean, shuffle, swap",
        )
    )
    area_buckets: list[float] = Field(
        default_factory=lambda: [0.005, 0.05],
        description="edges of the difficulty buckets, increasing fractions in (0, 1) of the "
        "image area the smallest evidence box covers (default: buckets <0.5%, 0.5-5%, >=5%); "
        "accuracy is reported per bucket (per_bucket) next to per category; [] reports none",
    )

    @field_validator("area_buckets")
    @classmethod
    def _increasing_fractions(cls, edges: list[float]) -> list[float]:
        if any(not 0 < edge < 1 for edge in edges) or any(
            low >= high for low, high in itertools.pairwise(edges)
        ):
            raise ValueError(
                "expected increasing fractions of the image area, each in (0, 1), e.g. "
                f"[0.005, 0.05], got {edges}"
            )
        return edges


class PromptConfig(_Strict):
    answer: Literal["letter", "text"] = Field(
        "letter",
        description="what the model learns to write: the option letter, or the option's text "
        "(evaluation accepts either)",
    )
    question_first: bool = Field(
        False,
        description="put the question before the image (default: image, then question); "
        "causal attention then lets every image token read the question",
    )


class PerceptionConfig(_Strict):
    """Dense perception pretraining (``method: perceive``): every cell of the vision tower's
    feature grid classified by the object centred in it."""

    attributes: list[str] = Field(
        default_factory=lambda: ["colour", "shape"],
        min_length=1,
        description="the object attributes classified per cell (keys of each sample's "
        "meta['objects'] entries; their values come from the dataset)",
    )


class LoraConfig(_Strict):
    """LoRA on the language model (and the vision tower); defaults are the reference's."""

    enabled: bool = Field(
        False,
        description="train LoRA adapters (peft) instead of the full model; the base is frozen "
        "except the latent tokens' rows",
    )
    r: int = Field(16, ge=1, description="LoRA rank")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.01, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] = Field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        description="language-model modules adapted, by name or name suffix "
        "(e.g. self_attn.q_proj)",
    )
    vision_tower: bool = Field(
        True, description="also adapt every linear layer of the vision tower (the reference does)"
    )
    bias: Literal["none", "all", "lora_only"] = Field(
        "none", description="biases trained too: none, all of them, or those of adapted layers"
    )


class WarmStartConfig(_Strict):
    """Start from the weights of another run instead of a fresh initialisation."""

    source: str | None = Field(
        None,
        description="a finished run directory or a `crystalkit export` folder (relative to the "
        "working directory, like output_dir); its latest weights, LoRA merged, and its "
        "tokenizer start this run. null = fresh initialisation",
    )


class StageLatents(_Strict):
    family: Literal["token", "recurrent"] | None = Field(None, description="latents.family")
    schedule: ComponentSpec | None = Field(None, description="latents.schedule (SCHEDULES)")
    write: bool | None = Field(None, description="latents.write")


class StageTrain(_Strict):
    """The optimisation keys a stage may set; the others (steps, batch size, precision, ...)
    belong to the whole run."""

    lr: float | None = Field(None, gt=0, le=100, description="peak learning rate of this stage")
    vision_lr_scale: float | None = Field(
        None, ge=0, le=100, description="the vision tower's learning rate as a multiple of lr"
    )
    weight_decay: float | None = Field(
        None, ge=0, le=100, description="AdamW decoupled weight decay"
    )
    betas: tuple[float, float] | None = Field(None, description="AdamW betas")
    lr_schedule: Literal["cosine", "linear", "constant"] | None = Field(
        None, description="decay after warmup, within the stage"
    )
    warmup_ratio: float | None = Field(
        None, ge=0, le=1, description="share of the stage's steps with linear warmup"
    )
    grad_clip: float | None = Field(None, gt=0, description="max global grad norm")


#: the recipe sections a stage may set, in the order they are shown
STAGE_SECTIONS = ("method", "latents", "corruption", "crystal", "objectives", "train")


class StageSpec(_Strict):
    """One stage of a staged run: a partial recipe applied to the same model for a share of
    ``train.steps``. A section left out (``null``) is the recipe's own; the loader merges a
    stage's sections over the recipe's key by key (an objective set to ``null`` is dropped)."""

    name: str = Field(description="stage name (metrics, checkpoints and overrides use it)")
    fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="share of train.steps; the fractions sum to 1 (one stage may leave it "
        "out and take the rest)",
    )
    method: Literal["finetune", "crystal", "perceive"] | None = Field(None, description="method")
    latents: StageLatents | None = Field(
        None, description="latents.family, latents.schedule and latents.write"
    )
    corruption: ComponentSpec | None = Field(None, description="corruption (CORRUPTIONS)")
    crystal: CrystalConfig | None = Field(None, description="crystal section")
    objectives: dict[str, ObjectiveSpec | None] | None = Field(
        None, description="objectives section; an objective set to null is dropped"
    )
    train: StageTrain | None = Field(
        None, description="lr, weight_decay, betas, lr_schedule, warmup_ratio, grad_clip"
    )

    @field_validator("name")
    @classmethod
    def _plain(cls, name: str) -> str:
        if not name or not name.replace("_", "a").replace("-", "a").isalnum() or name.isdigit():
            raise ValueError(
                "must be a word of letters, digits, '_' or '-' (not a number), e.g. finetune"
            )
        return name


def stage_steps(fractions: list[float], steps: int) -> list[int]:
    """Steps of each stage: boundaries at the rounded cumulative fractions of ``steps``, so the
    stages always add up to ``steps`` exactly."""
    bounds, total = [0], 0.0
    for fraction in fractions:
        total += fraction
        bounds.append(round(min(total, 1.0) * steps))
    bounds[-1] = steps
    return [b - a for a, b in itertools.pairwise(bounds)]


class Recipe(_Strict):
    """A complete, runnable experiment."""

    name: str = Field(description="run name; outputs go to OUTPUT_DIR/NAME (defaults to file stem)")
    description: str = Field("", description="free text, kept with the run")
    seed: int = Field(
        0,
        ge=0,
        lt=2**32,
        description="seeds model init, data order and every random op",
    )
    output_dir: str = Field("runs", description="parent folder of run directories")
    device: str = Field(
        "cpu",
        description="torch device, e.g. 'cpu', 'cuda' or 'cuda:1' (checked against this "
        "machine's devices when a run starts)",
    )
    backbone: ComponentSpec = Field(
        default_factory=lambda: ComponentSpec(name="embedded"), description="model (BACKBONES)"
    )
    dataset: ComponentSpec = Field(
        default_factory=lambda: ComponentSpec(name="synthetic_shapes"),
        description="data (DATASETS)",
    )
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    method: Literal["finetune", "crystal", "perceive"] = Field(
        "finetune",
        description="finetune: the intact path alone (CE); crystal: intact + corrupted paths "
        "with the latent copy and the objectives; perceive: dense perception pretraining of "
        "the vision tower (see perception)",
    )
    perception: PerceptionConfig = Field(default_factory=PerceptionConfig)
    latents: LatentsConfig = Field(default_factory=LatentsConfig)
    corruption: ComponentSpec = Field(
        default_factory=lambda: ComponentSpec(name="blur"),
        description="what the corrupted path sees (CORRUPTIONS); used by method crystal",
    )
    crystal: CrystalConfig = Field(default_factory=CrystalConfig)
    lora: LoraConfig = Field(
        default_factory=LoraConfig, description="LoRA adapters (peft) instead of full training"
    )
    objectives: dict[str, ObjectiveSpec] = Field(
        default_factory=dict,
        description="alignment terms (OBJECTIVES) by key, each with a weight; method crystal",
    )
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    warm_start: WarmStartConfig = Field(
        default_factory=WarmStartConfig, description="start from another run's weights"
    )
    stages: list[StageSpec] = Field(
        default_factory=list,
        description="ordered stages, each a partial recipe for a share of train.steps (empty: "
        "one stage, the recipe itself)",
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not name or "/" in name or "\\" in name or "\0" in name or name in (".", ".."):
            raise ValueError("must be a plain folder name (no slashes, no NUL characters)")
        if len(name.encode("utf-8")) > 200:  # file systems cap a name at 255 bytes
            raise ValueError("must be a folder name of at most 200 bytes")
        return name

    @field_validator("output_dir")
    @classmethod
    def _check_output_dir(cls, output_dir: str) -> str:
        if not output_dir or "\0" in output_dir:
            raise ValueError("must be a folder path (not empty, no NUL characters)")
        return output_dir

    @field_validator("device")
    @classmethod
    def _check_device(cls, device: str) -> str:
        """Only the spelling: whether this machine has the device is checked when a run starts
        (:func:`crystalkit.runs.build.check_device`), so a recipe validates on any machine."""
        if not re.fullmatch(r"[a-z_]+(:\d{1,6})?", device):
            raise ValueError("expected a torch device such as cpu, cuda, cuda:1 or mps")
        return device

    @model_validator(mode="after")
    def _check_stages(self) -> Recipe:
        names = [stage.name for stage in self.stages]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"stages: stage names must be unique, {repeated[0]!r} repeats")
        open_ = [i for i, stage in enumerate(self.stages) if stage.fraction is None]
        given = sum(stage.fraction or 0.0 for stage in self.stages)
        if len(open_) > 1:
            raise ValueError(
                f"stages.{self.stages[open_[1]].name}.fraction: only one stage may leave its "
                "fraction out (it takes the rest of train.steps)"
            )
        if open_:
            if given >= 1 - 1e-9:
                raise ValueError(
                    f"stages.{self.stages[open_[0]].name}.fraction: the other stages already "
                    f"take {given:g} of train.steps; nothing is left for this one"
                )
            self.stages[open_[0]].fraction = round(1.0 - given, 12)
        elif self.stages and abs(given - 1.0) > 1e-6:
            raise ValueError(f"stages: the fractions must add up to 1, got {given:g}")
        for stage, steps in zip(
            self.stages, stage_steps(self.stage_fractions, self.train.steps), strict=True
        ):
            if steps < 1 and len(self.stages) > 1:
                raise ValueError(
                    f"stages.{stage.name}.fraction: {stage.fraction:g} of train.steps="
                    f"{self.train.steps} is less than one step"
                )
        return self

    @model_validator(mode="after")
    def _check_generated_eval(self) -> Recipe:
        if self.eval.latent_block == "generated" and self.latents.family == "recurrent":
            raise ValueError(
                "eval.latent_block: generated needs token latents, got latents.family recurrent "
                "(recurrent latents are hidden states, not tokens the model can write)"
            )
        return self

    @property
    def stage_fractions(self) -> list[float]:
        return [stage.fraction or 0.0 for stage in self.stages]

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved recipe as plain YAML-able data."""
        return self.model_dump(mode="json")
