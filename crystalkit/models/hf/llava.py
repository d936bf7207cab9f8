"""LLaVA: a vision encoder, a projector, and a plain-RoPE language model.

``llava`` is ``LlavaForConditionalGeneration`` with a CLIP or SigLIP vision tower (whichever
``vision_config.model_type`` names). CLIP's class token is dropped
(``vision_feature_select_strategy: default``); SigLIP has none (``full``). Under ``resolution:
processor`` each image keeps its native size until the image processor resizes it as the
checkpoint's processor does (CLIP: shortest edge to ``image_size``, then a centre crop; SigLIP: to
the square); every image still gets the same ``image_size`` square and token count.

Positions are ordinary 1-D ids, so the :class:`~crystalkit.models.backbone.Backbone` default
(each token's index on its own path) is already right.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import (
    CLIPImageProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    SiglipImageProcessor,
)

from crystalkit.errors import UsageError
from crystalkit.models.backbone import resize_unit
from crystalkit.models.hf.base import HFBackbone, HFConfig
from crystalkit.registries import BACKBONES

IMAGE = "<image>"


@BACKBONES.register("llava")
class LlavaBackbone(HFBackbone):
    """``LlavaForConditionalGeneration`` (CLIP or SigLIP vision tower)."""

    model_class = LlavaForConditionalGeneration
    config_class = LlavaConfig
    image_token = IMAGE
    offline_eos = "</s>"
    offline_pad = "<pad>"
    offline_bos = "<s>"
    offline_adds_bos = True  # a Llama tokenizer: its processor prompts start with <s>
    offline_specials = (IMAGE,)
    chat_family = "llava"
    default_prefix = "USER: "
    default_suffix = " ASSISTANT:"
    processor_resolution = True

    @classmethod
    def check_resolution(cls, config: HFConfig) -> None:
        super().check_resolution(config)
        if config.min_pixels is not None or config.max_pixels is not None:
            raise UsageError(
                "backbone.min_pixels / max_pixels: LLaVA's image processor has no pixel bounds "
                "(it resizes to image_size; remove them)"
            )

    @property
    def resizes_itself(self) -> bool:
        return self.config.resolution == "processor"

    @property
    def _crops(self) -> bool:
        """Whether the image processor centre-crops after its resize (CLIP; SigLIP squashes)."""
        return not isinstance(self.image_processor, SiglipImageProcessor)

    @property
    def image_grid(self) -> tuple[int, int] | None:
        """``None`` under ``processor``: the grid covers the centre crop, not the whole image."""
        return None if self.resizes_itself and self._crops else super().image_grid

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """``processor``: the size the image processor resizes to before its crop (CLIP: the
        shortest edge to ``image_size``, as ``get_resize_output_image_size`` computes it)."""
        size = self.config.image_size
        if not (self.resizes_itself and self._crops):
            return size, size
        short, long = sorted((height, width))
        resized = (size, int(size * long / short))
        return resized if height <= width else resized[::-1]

    @classmethod
    def token_fields(cls) -> list[tuple[str, str]]:
        return [("image_token_id", IMAGE)]

    @classmethod
    def build_processor(cls, model_config: Any, config: HFConfig) -> Any:
        size = config.image_size
        if model_config.vision_config.model_type.startswith("siglip"):
            return SiglipImageProcessor(size={"height": size, "width": size})
        return CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )

    def hf_processor(self) -> Any:
        config = self.model.config
        strategy = config.vision_feature_select_strategy
        return LlavaProcessor(
            image_processor=self.image_processor,
            tokenizer=self.tokenizer,
            patch_size=config.vision_config.patch_size,
            vision_feature_select_strategy=strategy,
            num_additional_image_tokens=1 if strategy == "default" else 0,  # CLIP's class token
            chat_template=self.tokenizer.chat_template,
        )

    @property
    def vision_tower(self) -> nn.Module:
        return nn.ModuleList(
            [self.model.model.vision_tower, self.model.model.multi_modal_projector]
        )

    @property
    def token_side(self) -> int:
        return self.config.image_size // self.model.config.vision_config.patch_size

    def check_image_size(self) -> None:
        vision = self.model.config.vision_config
        self.check_fixed_tower_size(vision.image_size)
        has_cls = not vision.model_type.startswith("siglip")
        strategy = self.model.config.vision_feature_select_strategy
        if has_cls != (strategy == "default"):
            expected = "default" if has_cls else "full"
            raise UsageError(
                f"backbone.config.vision_feature_select_strategy: a {vision.model_type} tower "
                f"needs {expected!r}, got {strategy!r}"
            )

    @property
    def plain_prefix(self) -> str:
        return (self.tokenizer.bos_token or "") + self.default_prefix

    def preprocess_images(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """-> ``[B, 3, S, S]``: resized to the square by crystalkit (``fixed``), or, under
        ``processor``, by the image processor itself, one image at a time (``uint8`` or [0, 1]
        float, any size)."""
        if not self.resizes_itself:
            pixels = resize_unit(images, self.config.image_size)
            out = self.image_processor(
                images=list(pixels),
                do_resize=False,
                do_center_crop=False,
                do_rescale=False,
                return_tensors="pt",
            )
            return out["pixel_values"]
        return torch.cat(self.process_each(images))

    def image_features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        cfg = self.model.config
        out = self.model.model.get_image_features(
            pixel_values,
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        )
        features = out.pooler_output
        if isinstance(features, (list, tuple)):
            features = torch.cat(list(features))
        return features.reshape(-1, features.shape[-1]), []
