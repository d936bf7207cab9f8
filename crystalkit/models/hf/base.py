"""What every Hugging Face VLM adapter shares: loading, offline random init, tokens, the forward.

An adapter wraps one unmodified ``transformers`` ``...ForConditionalGeneration`` class. It never
calls that class's own ``forward``: it embeds tokens and merges image features itself (through the
model's public ``get_image_features``), then runs the model's *language model* with an explicit
additive 4-D mask, explicit position ids and a KV cache, and applies ``lm_head``. That is the
surface the packed CrystaL sequence needs (a block mask, tied positions, injected latent keys and
values), and it sidesteps the state the top-level forward keeps between calls (``rope_deltas``).

A family subclass says where the parts live and how images become tokens; see
``docs/backbones.md`` for how to add one. Prompts follow the checkpoint's own chat template
(:mod:`crystalkit.models.hf.chat`) unless ``prompt: plain`` asks for the family's fixed text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from huggingface_hub.errors import StrictDataclassError
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn
from transformers import AutoImageProcessor, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.utils import is_flash_attn_2_available

from crystalkit.errors import CheckpointError, UsageError, first_line, one_line
from crystalkit.models.backbone import Backbone, scatter_image_features
from crystalkit.models.hf.chat import (
    PromptParts,
    checkpoint_chat_template,
    leading_bos,
    packaged_template,
    split_chat_template,
)
from crystalkit.models.hf.offline import train_bpe_tokenizer

TOKENIZER_DIR = "tokenizer"
PROCESSOR_DIR = "image_processor"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFConfig(BaseModel):
    """Recipe parameters shared by every Hugging Face adapter."""

    model_config = ConfigDict(extra="forbid")

    name_or_path: str | None = Field(
        None, description="checkpoint folder or hub id loaded with from_pretrained"
    )
    config: dict[str, Any] | None = Field(
        None,
        description="instead of name_or_path: build a randomly initialised model of this "
        "architecture from these config fields (text_config, vision_config, ...)",
    )
    image_size: int = Field(
        448, ge=8, le=4096, description="resolution: fixed — images are resized to this square size"
    )
    resolution: Literal["fixed", "processor"] = Field(
        "fixed",
        description="fixed: every image squashed to image_size x image_size (the paper's "
        "recipe); processor: the image processor's own resizing (Qwen-VL: aspect kept, between "
        "min_pixels and max_pixels, a grid and token count per image; LLaVA: CLIP's shortest "
        "edge and centre crop, SigLIP's square)",
    )
    min_pixels: int | None = Field(
        None, ge=1, description="resolution: processor — fewest pixels; null = the processor's"
    )
    max_pixels: int | None = Field(
        None, ge=1, description="resolution: processor — most pixels; null = the processor's"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="weight dtype (autocast is set by train.precision)"
    )
    attn_implementation: Literal["sdpa", "eager"] = Field(
        "sdpa",
        description="attention kernel the language model runs (flash_attention_2 is refused: "
        "it reads the mask as 2-D padding, not crystalkit's 4-D block mask)",
    )
    vision_attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = Field(
        None,
        description="attention kernel the vision tower runs; null = attn_implementation "
        "(flash_attention_2 needs the flash-attn package and a CUDA GPU; not yet run on a GPU "
        "by crystalkit's tests)",
    )
    prompt: Literal["chat_template", "plain"] = Field(
        "chat_template",
        description="chat_template: the checkpoint's own chat template (a user turn with the "
        "image and the question, then the generation prompt); plain: the family's fixed "
        "prefix and suffix (prompt_prefix, question_suffix)",
    )
    prompt_prefix: str | None = Field(
        None,
        description="prompt: plain only — text opening every prompt; null = the family's "
        "chat header",
    )
    question_suffix: str | None = Field(
        None,
        description="prompt: plain only — text after the question; null = the family's "
        "assistant header",
    )
    vocab_size: int = Field(
        1024, ge=64, description="size of the offline BPE tokenizer trained for config: models"
    )
    init: Literal["default", "xavier"] = Field(
        "default",
        description="config: models only — initialisation of the linear layers (xavier: what "
        "lets a small from-scratch model learn to attend to image tokens)",
    )

    @field_validator("attn_implementation", mode="before")
    @classmethod
    def _no_flash_language_model(cls, value: Any) -> Any:
        if isinstance(value, str) and value.startswith("flash_attention"):
            raise ValueError(
                f"{value} cannot run the language model: it reads the attention mask as a 2-D "
                "padding mask and would misread the packed sequence's 4-D block mask; use sdpa "
                "(backbone.vision_attn_implementation: flash_attention_2 for the vision tower)"
            )
        return value

    @model_validator(mode="after")
    def _one_source(self) -> HFConfig:
        if (self.name_or_path is None) == (self.config is None):
            raise ValueError(
                "give exactly one of name_or_path (pretrained) or config (random init)"
            )
        if self.name_or_path is not None and self.init != "default":
            raise ValueError("init applies to config: models; pretrained weights keep theirs")
        if self.resolution == "fixed" and (
            self.min_pixels is not None or self.max_pixels is not None
        ):
            raise ValueError("min_pixels / max_pixels apply to resolution: processor")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels {self.min_pixels} exceeds max_pixels {self.max_pixels}")
        if self.prompt == "chat_template" and (
            self.prompt_prefix is not None or self.question_suffix is not None
        ):
            raise ValueError(
                "prompt_prefix / question_suffix replace the fixed prompt of prompt: plain; "
                "set prompt: plain to use them"
            )
        return self

    @property
    def attention_kernels(self) -> str | dict[str, str]:
        """``attn_implementation`` as ``from_pretrained`` takes it: one kernel for the whole
        model, or the language model's and the vision tower's (transformers dispatches a dict
        per sub-config; every family here names its parts ``text_config``, ``vision_config``)."""
        vision = self.vision_attn_implementation
        if vision is None or vision == self.attn_implementation:
            return self.attn_implementation
        language = self.attn_implementation
        return {"": language, "text_config": language, "vision_config": vision}


class HFBackbone(Backbone):
    """Base of the Hugging Face VLM adapters (one subclass per model family)."""

    Config = HFConfig
    #: the ``transformers`` classes of the family
    model_class: ClassVar[type[PreTrainedModel]]
    config_class: ClassVar[type[PretrainedConfig]]
    #: special tokens an offline tokenizer needs: eos, pad, then the family's markers
    offline_eos: ClassVar[str] = "<|im_end|>"
    offline_pad: ClassVar[str] = "<|endoftext|>"
    offline_bos: ClassVar[str | None] = None
    offline_specials: ClassVar[tuple[str, ...]] = ()
    #: whether the family's real tokenizer adds bos on encode (the offline one then does too)
    offline_adds_bos: ClassVar[bool] = False
    #: ``chat_templates/FAMILY.jinja``: the family's real chat template, for offline tokenizers
    #: (see :meth:`offline_chat_template`)
    chat_family: ClassVar[str] = ""
    #: the text the family's chat template writes for one image
    chat_image_markup: ClassVar[str] = "<image>"
    #: ``prompt: plain``: the family's fixed text before the image and after the question
    default_prefix: ClassVar[str] = ""
    default_suffix: ClassVar[str] = ""
    #: whether ``resolution: processor`` is supported (the processor resizes each image itself)
    processor_resolution: ClassVar[bool] = False

    def __init__(
        self,
        config: HFConfig,
        model: PreTrainedModel,
        tokenizer: Any,
        processor: Any,
        source: str | None = None,
    ):
        super().__init__()
        self.config = config
        self.model = model
        self._tokenizer = tokenizer
        self.image_processor = processor
        self.check_image_size()
        self.check_consistency(source or config.name_or_path or "the tokenizer")
        self._prompt = self.build_prompt(source or config.name_or_path or "the tokenizer")

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        config: HFConfig,
        *,
        corpus: Sequence[str],
        assets: Path | None = None,
        device: torch.device | None = None,
    ) -> HFBackbone:
        cls.check_resolution(config)
        cls.check_kernels(config)
        saved = assets is not None and (assets / TOKENIZER_DIR).is_dir()
        if config.name_or_path is not None:
            return cls.load_pretrained(config, assets if saved else None, device)
        if saved and assets is not None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(assets / TOKENIZER_DIR)
            except Exception as exc:  # transformers and tokenizers raise many kinds
                raise CheckpointError(
                    f"{assets / TOKENIZER_DIR}: the run's saved tokenizer does not load "
                    f"({type(exc).__name__}: {one_line(exc)})"
                ) from None
            source = f"the tokenizer saved in {assets}"
        else:
            tokenizer = cls.offline_tokenizer(config, corpus)
            source = cls.offline_source()
        model_config = cls.random_config(config.config or {}, tokenizer)
        try:
            model = cls.model_class._from_config(
                model_config,
                dtype=DTYPES[config.dtype],
                attn_implementation=config.attention_kernels,
            )
        except (ValueError, RuntimeError, TypeError) as exc:
            name = cls.model_class.__name__
            raise UsageError(f"backbone.config: cannot build {name}: {exc}") from None
        if config.init == "xavier":
            for module in model.modules():
                if isinstance(module, nn.Linear):
                    nn.init.xavier_uniform_(module.weight)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
        return cls(config, model, tokenizer, cls.build_processor(model_config, config), source)

    @classmethod
    def check_resolution(cls, config: HFConfig) -> None:
        """One line when a family without per-image grids is asked for ``resolution:
        processor`` (before anything is loaded)."""
        if config.resolution == "processor" and not cls.processor_resolution:
            raise UsageError(
                f"backbone.resolution: processor is not supported by {cls.__name__}: it feeds "
                "one fixed image_size to every image (use resolution: fixed)"
            )

    @classmethod
    def check_kernels(cls, config: HFConfig) -> None:
        """One line when FlashAttention-2 is asked for where transformers cannot load it (before
        anything is loaded): transformers itself raises an ``ImportError`` from inside the
        model's constructor."""
        if config.vision_attn_implementation == "flash_attention_2" and not (
            is_flash_attn_2_available()
        ):
            raise UsageError(
                "backbone.vision_attn_implementation: flash_attention_2 needs the flash-attn "
                "package (>= 2.3.3) on a CUDA GPU, and transformers cannot load it here; use sdpa"
            )

    @classmethod
    def offline_tokenizer(cls, config: HFConfig, corpus: Sequence[str]) -> Any:
        """A BPE tokenizer trained on ``corpus`` plus the prompt text, with the family's special
        tokens and its real chat template (:meth:`offline_chat_template`)."""

        def train(prompt_text: Sequence[str]) -> Any:
            tokenizer = train_bpe_tokenizer(
                [*corpus, *prompt_text],
                [cls.offline_pad, cls.offline_eos, *cls.offline_specials]
                + ([cls.offline_bos] if cls.offline_bos else []),
                eos=cls.offline_eos,
                pad=cls.offline_pad,
                bos=cls.offline_bos,
                add_bos=cls.offline_adds_bos,
                vocab_size=config.vocab_size,
            )
            tokenizer.chat_template = cls.offline_chat_template()
            return tokenizer

        tokenizer = train([cls.default_prefix, cls.default_suffix])
        if config.prompt == "plain":
            return tokenizer
        parts = split_chat_template(tokenizer, cls.chat_image_markup, cls.offline_source())
        return train([parts.prefix, parts.between, parts.suffix])

    @classmethod
    def offline_chat_template(cls) -> str | None:
        """The chat template an offline tokenizer carries: the family's real one, shipped as
        ``chat_templates/FAMILY.jinja`` (``chat_family``); ``None`` for a family without one
        (a plugin's adapter may override this to supply its own)."""
        return packaged_template(cls.chat_family) if cls.chat_family else None

    @classmethod
    def offline_source(cls) -> str:
        return f"the offline {cls.chat_family or cls.__name__} tokenizer"

    @classmethod
    def load_pretrained(
        cls, config: HFConfig, assets: Path | None, device: torch.device | None = None
    ) -> HFBackbone:
        """Model, tokenizer and image processor from ``name_or_path`` (the tokenizer and
        processor from a run's ``assets`` when given: they hold the latent tokens). The weights
        are memory-mapped and read tensor by tensor onto ``device`` (default: CPU), converted
        to ``dtype`` on the way: with the checkpoint's own dtype on the CPU they stay in the
        page cache, shared by every process of a node; any other dtype is a copy, which on a
        GPU device never sits in host memory as a whole."""
        source = str(config.name_or_path)
        where = f"the tokenizer saved in {assets}" if assets else source
        try:
            tokenizer = AutoTokenizer.from_pretrained(assets / TOKENIZER_DIR if assets else source)
            if assets is None and (template := checkpoint_chat_template(source)) is not None:
                tokenizer.chat_template = template  # the processor's (multimodal) one, kept
            if config.prompt == "chat_template":  # fail before loading the weights
                split_chat_template(tokenizer, cls.chat_image_markup, where)
            processor = cls.load_processor(assets / PROCESSOR_DIR if assets else source, config)
            model = cls.model_class.from_pretrained(
                source,
                dtype=DTYPES[config.dtype],
                attn_implementation=config.attention_kernels,
                device_map=device,
            )
        except (OSError, ValueError) as exc:  # missing files, no hub access, wrong model type
            first = first_line(exc) or type(exc).__name__
            raise UsageError(
                f"backbone.name_or_path: cannot load {cls.model_class.__name__} from "
                f"{source!r}: {first}"
            ) from None
        return cls(config, model, tokenizer, processor, where)

    @classmethod
    def random_config(cls, fields: dict[str, Any], tokenizer: Any) -> PretrainedConfig:
        """The family config from a recipe's ``config:`` block, with the vocabulary and the
        special token ids filled in from the offline tokenizer. A larger
        ``text_config.vocab_size`` is kept: spare token rows, as pretrained checkpoints carry
        (Qwen2.5-VL-7B: 152,064 rows), so a random model's output head has the real width."""
        ids = {key: tokenizer.convert_tokens_to_ids(token) for key, token in cls.token_fields()}
        fields = {**fields, **ids}
        text = dict(fields.get("text_config") or {})
        text.update(
            vocab_size=max(len(tokenizer), int(text.get("vocab_size") or 0)),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
        fields["text_config"] = text
        try:
            return cls.config_class(**fields)
        except (TypeError, ValueError, KeyError, StrictDataclassError) as exc:
            raise UsageError(
                f"backbone.config: {cls.config_class.__name__} rejected it: {exc}"
            ) from None

    @classmethod
    def token_fields(cls) -> list[tuple[str, str]]:
        """``(config field, token)`` pairs set from the offline tokenizer."""
        return []

    @classmethod
    def load_processor(cls, path: str | Path, config: HFConfig) -> Any:
        return AutoImageProcessor.from_pretrained(path)

    @classmethod
    def build_processor(cls, model_config: PretrainedConfig, config: HFConfig) -> Any:
        """An image processor for a randomly initialised model (built, not downloaded)."""
        raise NotImplementedError

    def check_image_size(self) -> None:
        """Raise :class:`UsageError` unless ``image_size`` tiles into whole image tokens."""

    def check_consistency(self, source: str) -> None:
        """One line when the tokenizer, the image processor and the model config disagree (a
        tokenizer or processor from another checkpoint): otherwise the mismatch surfaces as a
        shape error deep inside the first forward."""
        config = self.model.config
        expected = getattr(config, "image_token_id", None)
        if expected is None:
            expected = getattr(config, "image_token_index", None)
        actual = self.image_token_id
        if expected is not None and actual != expected:
            raise UsageError(
                f"{source}: the tokenizer's image placeholder {self.image_token!r} has id {actual} "
                f"but the model config's image_token_id is {expected}; the tokenizer does not "
                "belong to this checkpoint"
            )
        for name, (processor_value, model_value, model_key) in self.processor_geometry().items():
            if processor_value != model_value:
                raise UsageError(
                    f"{source}: the image processor's {name} is {processor_value} but the model "
                    f"config's {model_key} is {model_value}; the processor does not belong to "
                    "this checkpoint"
                )

    def processor_geometry(self) -> dict[str, tuple[Any, Any, str]]:
        """``processor field -> (processor value, model value, model config key)`` that must
        agree for the processor's pixels to fit the vision tower (none by default)."""
        return {}

    def check_fixed_tower_size(self, tower_size: int) -> None:
        """For towers with a fixed position table: ``image_size`` must be the tower's own."""
        if self.config.image_size != tower_size:
            raise UsageError(
                f"backbone.image_size: {self.config.image_size} differs from the vision tower's "
                f"image_size {tower_size} (its position table is fixed)"
            )

    @property
    def token_side(self) -> int:
        """Image tokens along each side of the (square) image."""
        raise NotImplementedError

    @property
    def num_image_tokens(self) -> int:
        return self.token_side**2

    @property
    def image_grid(self) -> tuple[int, int]:
        return self.token_side, self.token_side

    def save_assets(self, directory: Path) -> None:
        self._tokenizer.save_pretrained(directory / TOKENIZER_DIR)
        self.image_processor.save_pretrained(directory / PROCESSOR_DIR)

    def save_pretrained(self, directory: Path) -> bool:
        """A ``from_pretrained`` folder (safetensors weights, config with ``crystalkit_tokens``,
        and the family's processor: tokenizer, image processor, chat template): usable as
        ``backbone.name_or_path`` and by plain transformers (``AutoProcessor``,
        ``AutoModelForImageTextToText``) and the engines built on it."""
        self.model.save_pretrained(directory)
        self.hf_processor().save_pretrained(directory)
        return True

    def hf_processor(self) -> Any:
        """The family's own transformers processor (image processor + tokenizer + chat
        template), configured to expand an image into the placeholders crystalkit feeds."""
        raise NotImplementedError

    # -- the Backbone interface ---------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.visual

    def build_prompt(self, source: str) -> PromptParts:
        """The text around the image and the question: cut from the chat template
        (``prompt: chat_template``; ``source`` names the checkpoint in errors), or the family's
        fixed text (``prompt: plain``)."""
        if self.config.prompt == "plain":
            prefix, suffix = self.config.prompt_prefix, self.config.question_suffix
            return PromptParts(
                prefix=self.plain_prefix if prefix is None else prefix,
                between="",
                suffix=self.default_suffix if suffix is None else suffix,
            )
        parts = split_chat_template(self.tokenizer, self.chat_image_markup, source)
        return replace(parts, bos=leading_bos(self.tokenizer, parts.prefix))

    @property
    def plain_prefix(self) -> str:
        """``prompt: plain``: the family's fixed text opening every prompt."""
        return self.default_prefix

    @property
    def prompt_prefix(self) -> str:
        return self._prompt.bos + self._prompt.prefix

    def process_each(self, images: Sequence[torch.Tensor], **kwargs: Any) -> list[torch.Tensor]:
        """Each image through the image processor on its own (images of different sizes share no
        call): ``uint8`` rescaled there, [0, 1] floats as they are; the processor's own resize
        unless ``kwargs`` say otherwise. One ``pixel_values`` tensor per image."""
        rows = []
        for image in images:
            rescale = image.dtype == torch.uint8
            out = self.image_processor(
                images=[image if rescale else image.float()],
                do_rescale=rescale,
                return_tensors="pt",
                **kwargs,
            )
            rows.append(out["pixel_values"])
        return rows

    def prompt_ids(
        self, question: str, question_first: bool = False
    ) -> tuple[list[int], list[int], list[int]]:
        """Under ``prompt: chat_template``, the prompt encoded as the family's processor encodes
        ``apply_chat_template``'s text: as one string, with the image markup where the template
        writes it (split off afterwards), and the bos token added as an id. A SentencePiece
        tokenizer marks the start of a string (Metaspace) or of every span between special
        tokens (the legacy ``Prepend`` normalizer), so text encoded in pieces would differ at
        their seams. ``prompt: plain`` encodes its pieces one by one, as it always has."""
        if self.config.prompt == "plain":
            return super().prompt_ids(question, question_first)
        if question_first:
            raise UsageError(
                "prompt.question_first: backbone.prompt: chat_template renders the image before "
                "the question; set backbone.prompt: plain to put the question first"
            )
        tokenizer, parts, markup = self.tokenizer, self._prompt, self.chat_image_markup
        text = parts.prefix + markup + parts.between + question + parts.suffix
        ids = tokenizer.encode(text, add_special_tokens=False)
        marks = tokenizer.encode(markup, add_special_tokens=False)
        at = next(
            (i for i in range(len(ids) - len(marks) + 1) if ids[i : i + len(marks)] == marks),
            None,
        )
        if at is None:
            raise UsageError(
                f"backbone.prompt: the tokenizer merges the image markup {markup!r} with the text "
                "around it (expected special tokens); set backbone.prompt: plain"
            )
        lead = [tokenizer.bos_token_id] if parts.bos else []
        return [*lead, *ids[:at]], [], ids[at + len(marks) :]

    @property
    def image_suffix(self) -> str:
        return self._prompt.between

    @property
    def question_suffix(self) -> str:
        return self._prompt.suffix

    @property
    def token_model(self) -> PreTrainedModel:
        return self.model

    def embed(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.embed_inputs(input_ids, pixel_values)[0]

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        embeds = self.model.get_input_embeddings()(input_ids)
        if pixel_values is None:
            return embeds, None
        grid = {} if image_grid is None else {"image_grid": image_grid}
        features, per_layer = self.image_features(pixel_values, **grid)
        is_image = input_ids == self.image_token_id
        embeds = scatter_image_features(embeds, is_image, features, len(pixel_values))
        if not per_layer:
            return embeds, None
        layers = [
            torch.zeros_like(embeds).masked_scatter(is_image[..., None], f.to(embeds.dtype))
            for f in per_layer
        ]
        return embeds, torch.stack(layers)

    def image_features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``[N images, ...]`` pixel values -> ``[N * tokens, D]`` features in placeholder order,
        and per-layer features of the same shape (empty unless the family has them). Families
        with ``resolution: processor`` also take ``image_grid`` ``[N, 3]`` (one per image)."""
        raise NotImplementedError

    def output_logits(self, output: Any) -> torch.Tensor:
        """The language model is the decoder alone: the head sits on the whole model."""
        return self.model.lm_head(output.last_hidden_state)
