"""The embedded backbone: a multimodal LM small enough to train from scratch on a CPU.

A timm convolutional encoder (no pretrained weights) turns the image into a grid of features, a
projector with a learned 2-D position embedding maps them to the LM width, and an unmodified
``transformers`` causal LM (Qwen2 by default) reads them as ordinary input embeddings. It is the
default of every CPU recipe and implements the same :class:`Backbone` interface as the real VLM
adapters, so everything tested on it runs unchanged on those.

Two choices matter for learning from scratch (measured): a convolutional encoder (a from-scratch
ViT stays at chance for minutes) and Xavier-initialised LM projections (with the LM's default
``N(0, 0.02)`` init, attention to the image tokens barely learns). The encoder normalises each
image on its own (``encoder_norm: groupnorm1``): with batch norm, the intact and corrupted images
of a CrystaL step would share batch statistics, and its running statistics would mix sharp and
blurred images.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from einops import rearrange
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from crystalkit.errors import UsageError, one_line
from crystalkit.models.backbone import Backbone, resize_unit, scatter_image_features
from crystalkit.models.tokenizer import (
    IMAGE_TOKEN,
    TOKENIZER_FILE,
    build_word_tokenizer,
    load_word_tokenizer,
    save_word_tokenizer,
)
from crystalkit.registries import BACKBONES


class EmbeddedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image_size: int = Field(
        64, ge=16, le=4096, description="images are resized to this square size"
    )
    encoder: str = Field("resnet10t", description="timm model name (built without weights)")
    encoder_kwargs: dict[str, Any] = Field(
        default_factory=lambda: {"channels": [32, 64, 128, 256]},
        description="extra keyword arguments for timm.create_model",
    )
    encoder_norm: str | None = Field(
        "groupnorm1",
        description="timm norm_layer of the encoder; a per-sample norm (groupnorm1, "
        "layernorm2d) keeps the intact and corrupted images of a step independent, batchnorm "
        "couples them through batch statistics; null = the encoder's own",
    )
    feature_stride: int = Field(8, description="encoder stride of the feature map used as tokens")
    lm_type: str = Field("qwen2", description="transformers model_type of the language model")
    hidden_size: int = Field(128, ge=8, description="LM width")
    num_layers: int = Field(4, ge=1, description="LM decoder layers")
    num_heads: int = Field(4, ge=1, description="LM attention heads")
    intermediate_size: int = Field(512, ge=8, description="LM MLP width")
    max_positions: int = Field(1024, ge=16, description="LM maximum sequence length")
    lm_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="fields for the transformers LM config; override the ones above "
        "(e.g. num_key_value_heads for grouped-query attention)",
    )
    init: Literal["xavier", "default"] = Field(
        "xavier", description="initialisation of the LM's linear layers"
    )
    token_norm: bool = Field(
        False,
        description="LayerNorm on the projected image tokens: centred, unit-scale tokens whose "
        "content and position are not drowned by the bias every token shares",
    )
    image_position: Literal["learned", "sincos"] = Field(
        "learned",
        description="2-D position of each image token: a learned table (N(0, 0.02) at init), or "
        "a fixed 2-D sin-cos table at token scale plus a learned table",
    )


@BACKBONES.register("embedded")
class EmbeddedBackbone(Backbone):
    """timm CNN encoder + projector + small transformers causal LM; trains from scratch on CPU."""

    Config = EmbeddedConfig

    def __init__(self, config: EmbeddedConfig, tokenizer: Any):
        super().__init__()
        self.config = config
        self._tokenizer = tokenizer
        self.encoder = _timm_features(config)
        channels = self.encoder.feature_info.channels()[0]
        side = config.image_size // config.feature_stride
        self._num_image_tokens = side * side
        self.projector = nn.Sequential(
            nn.Linear(channels, config.hidden_size),
            nn.GELU(),
            nn.Linear(config.hidden_size, config.hidden_size),
        )
        self.token_norm = nn.LayerNorm(config.hidden_size) if config.token_norm else nn.Identity()
        self.image_pos = nn.Parameter(torch.zeros(self._num_image_tokens, config.hidden_size))
        fixed = (
            sincos_2d(side, config.hidden_size)
            if config.image_position == "sincos"
            else torch.zeros(self._num_image_tokens, config.hidden_size)
        )
        self.register_buffer("fixed_image_pos", fixed, persistent=False)
        lm_fields = {
            "vocab_size": len(tokenizer),
            "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_heads,
            "num_key_value_heads": config.num_heads,
            "intermediate_size": config.intermediate_size,
            "max_position_embeddings": config.max_positions,
            "tie_word_embeddings": True,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
        try:
            lm_config = AutoConfig.for_model(config.lm_type, **(lm_fields | config.lm_kwargs))
        except (ValueError, TypeError) as exc:  # an unknown model_type, a field of a wrong type
            message = str(exc).split(". Should contain")[0]  # not the list of every model type
            raise UsageError(f"backbone.lm_type / lm_kwargs: {one_line(message)}") from None
        lm_config._attn_implementation = "sdpa"
        self.lm = AutoModelForCausalLM.from_config(lm_config)
        if config.init == "xavier":
            for module in self.lm.model.layers.modules():
                if isinstance(module, nn.Linear):
                    nn.init.xavier_uniform_(module.weight)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
        nn.init.normal_(self.image_pos, std=0.02)

    @classmethod
    def create(
        cls,
        config: EmbeddedConfig,
        *,
        corpus: Sequence[str],
        assets: Path | None = None,
        device: torch.device | None = None,
    ) -> EmbeddedBackbone:
        if assets is not None and (assets / TOKENIZER_FILE).is_file():
            tokenizer = load_word_tokenizer(assets)
        else:
            tokenizer = build_word_tokenizer(corpus)
        return cls(config, tokenizer)

    def save_assets(self, directory: Path) -> None:
        save_word_tokenizer(self._tokenizer, directory)

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def num_image_tokens(self) -> int:
        return self._num_image_tokens

    image_token = IMAGE_TOKEN

    @property
    def language_model(self) -> nn.Module:
        return self.lm

    @property
    def token_model(self) -> PreTrainedModel:
        return self.lm

    @property
    def vision_tower(self) -> nn.Module:
        return nn.ModuleList([self.encoder, self.projector, self.token_norm])

    @property
    def image_grid(self) -> tuple[int, int]:
        side = self.config.image_size // self.config.feature_stride
        return side, side

    def preprocess_images(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        return (resize_unit(images, self.config.image_size) - 0.5) / 0.5

    @property
    def vision_feature_channels(self) -> int:
        return self.encoder.feature_info.channels()[0]

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixel_values)[0]

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` -> ``[B, N, D]`` image token embeddings."""
        features = self.vision_features(pixel_values)
        tokens = rearrange(features, "b c h w -> b (h w) c")
        return self.token_norm(self.projector(tokens)) + self.fixed_image_pos + self.image_pos

    def embed(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None
    ) -> torch.Tensor:
        embeds = self.lm.get_input_embeddings()(input_ids)
        if pixel_values is None:
            return embeds
        features = self.encode_images(pixel_values).flatten(0, 1)
        is_image = input_ids == self.image_token_id
        return scatter_image_features(embeds, is_image, features, len(pixel_values))


def sincos_2d(side: int, dim: int) -> torch.Tensor:
    """``[side * side, dim]`` fixed 2-D sin-cos position table (row-major, as MAE's): half the
    channels encode the row, half the column, each at ``dim / 4`` frequencies; every entry is in
    ``[-1, 1]``, the scale of a layer-normed token."""
    if dim % 4:
        raise UsageError(
            f"backbone.hidden_size: sincos image positions need a multiple of 4, got {dim}"
        )
    freqs = 1.0 / 100.0 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    coords = torch.arange(side, dtype=torch.float32)[:, None] * freqs  # [side, dim/4]
    axis = torch.cat([coords.sin(), coords.cos()], dim=1)  # [side, dim/2]
    rows = axis[:, None, :].expand(side, side, -1)
    cols = axis[None, :, :].expand(side, side, -1)
    return torch.cat([rows, cols], dim=-1).reshape(side * side, dim)


def _timm_features(config: EmbeddedConfig) -> nn.Module:
    kwargs = dict(config.encoder_kwargs)
    if config.encoder_norm is not None:
        kwargs.setdefault("norm_layer", config.encoder_norm)
    if isinstance(kwargs.get("channels"), list):
        kwargs["channels"] = tuple(kwargs["channels"])
    try:
        probe = timm.create_model(config.encoder, pretrained=False, features_only=True, **kwargs)
    except KeyError as exc:  # timm's norm-layer lookup
        raise UsageError(
            f"backbone.encoder_norm: timm has no norm layer {exc}; e.g. groupnorm1, layernorm2d, "
            "batchnorm"
        ) from None
    except (RuntimeError, TypeError) as exc:  # unknown model name or bad kwargs
        raise UsageError(f"backbone.encoder: timm cannot build {config.encoder!r}: {exc}") from None
    reductions = probe.feature_info.reduction()
    if config.feature_stride not in reductions:
        raise UsageError(
            f"backbone.feature_stride: {config.encoder!r} offers strides {reductions}, "
            f"got {config.feature_stride}"
        )
    index = reductions.index(config.feature_stride)
    if config.image_size % config.feature_stride:
        raise UsageError(
            f"backbone.image_size: {config.image_size} is not a multiple of feature_stride "
            f"{config.feature_stride}"
        )
    return timm.create_model(
        config.encoder, pretrained=False, features_only=True, out_indices=(index,), **kwargs
    )
