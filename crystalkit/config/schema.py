"""The recipe's typed structure. Every field has a default and a description (shown in the docs
and in the JSON Schema editors use for autocompletion)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
    weight: float = Field(1.0, ge=0, description="weight of this term in the total loss")


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
    ce_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy term")


class TrainConfig(_Strict):
    steps: int = Field(600, ge=1, description="optimizer steps")
    batch_size: int = Field(
        32,
        ge=1,
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
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decoupled weight decay")
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
        None, ge=1, description="torch CPU threads; null = torch default"
    )


class EvalConfig(_Strict):
    split: str = Field("val", description="split evaluated periodically during training")
    final_split: str = Field("test", description="split evaluated once training finishes")
    max_samples: int | None = Field(None, ge=1, description="cap on evaluated samples per split")
    batch_size: int = Field(128, ge=1, description="samples per evaluation batch")
    max_new_tokens: int = Field(4, ge=1, description="greedy decoding budget for the answer")


class PromptConfig(_Strict):
    answer: Literal["letter", "text"] = Field(
        "letter",
        description="what the model learns to write: the option letter, or the option's text "
        "(evaluation accepts either)",
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


class Recipe(_Strict):
    """A complete, runnable experiment."""

    name: str = Field(description="run name; outputs go to OUTPUT_DIR/NAME (defaults to file stem)")
    description: str = Field("", description="free text, kept with the run")
    seed: int = Field(0, description="seeds model init, data order and every random op")
    output_dir: str = Field("runs", description="parent folder of run directories")
    device: str = Field("cpu", description="torch device, e.g. 'cpu' or 'cuda'")
    backbone: ComponentSpec = Field(
        default_factory=lambda: ComponentSpec(name="embedded"), description="model (BACKBONES)"
    )
    dataset: ComponentSpec = Field(
        default_factory=lambda: ComponentSpec(name="synthetic_shapes"),
        description="data (DATASETS)",
    )
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    method: Literal["finetune", "crystal"] = Field(
        "finetune",
        description="finetune: the intact path alone (CE); crystal: intact + corrupted paths "
        "with the latent copy and the objectives",
    )
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

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise ValueError("must be a plain folder name (no slashes)")
        return name

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved recipe as plain YAML-able data."""
        return self.model_dump(mode="json")
