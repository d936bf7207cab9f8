"""LLaVA-style models: a vision encoder, a projector, and a plain-RoPE language model.

* ``llava`` — ``LlavaForConditionalGeneration`` with a CLIP or SigLIP vision tower (whichever
  ``vision_config.model_type`` names). CLIP's class token is dropped
  (``vision_feature_select_strategy: default``); SigLIP has none (``full``). Under ``resolution:
  processor`` each image keeps its native size until the image processor resizes it as the
  checkpoint's processor does (CLIP: shortest edge to ``image_size``, then a centre crop; SigLIP:
  to the square); every image still gets the same ``image_size`` square and token count.
* ``idefics3`` / ``smolvlm`` — ``Idefics3ForConditionalGeneration`` / ``SmolVLMForConditionalGeneration``:
  a SigLIP encoder and a pixel-shuffle connector. crystalkit feeds one global view per image
  (no tiling), so every image has the same tokens:
  ``<fake_token_around_image> <global-img> <image> * N <fake_token_around_image>``.

Positions are ordinary 1-D ids, so the :class:`~crystalkit.models.backbone.Backbone` default
(each token's index on its own path) is already right.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    CLIPImageProcessor,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessor,
    Idefics3Processor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    SiglipImageProcessor,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
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


FAKE, GLOBAL = "<fake_token_around_image>", "<global-img>"


class _Idefics3Family(HFBackbone):
    image_token = "<image>"
    offline_eos = "<end_of_utterance>"
    offline_pad = "<|endoftext|>"
    offline_bos = "<|im_start|>"
    offline_specials = (FAKE, GLOBAL, "<image>")
    default_prefix = "<|im_start|>User:"
    default_suffix = "<end_of_utterance>\nAssistant:"

    @classmethod
    def token_fields(cls) -> list[tuple[str, str]]:
        return [("image_token_id", "<image>")]

    @classmethod
    def load_processor(cls, path: str | Path, config: HFConfig) -> Any:
        processor = super().load_processor(path, config)
        processor.do_image_splitting = False  # one global view: a fixed token count per image
        return processor

    @classmethod
    def build_processor(cls, model_config: Any, config: HFConfig) -> Any:
        size = config.image_size
        return Idefics3ImageProcessor(
            do_image_splitting=False,
            size={"longest_edge": size},
            max_image_size={"longest_edge": size},
        )

    def hf_processor(self) -> Any:
        """Idefics3's processor (SmolVLM's needs the num2words package and expands a single
        global view the same way)."""
        return Idefics3Processor(
            image_processor=self.image_processor,
            tokenizer=self.tokenizer,
            image_seq_len=self.num_image_tokens,
            chat_template=self.tokenizer.chat_template,
        )

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.text_model

    @property
    def vision_tower(self) -> nn.Module:
        return nn.ModuleList([self.model.model.vision_model, self.model.model.connector])

    @property
    def token_side(self) -> int:
        vision = self.model.config.vision_config
        return self.config.image_size // vision.patch_size // self.model.config.scale_factor

    def check_image_size(self) -> None:
        vision = self.model.config.vision_config
        self.check_fixed_tower_size(vision.image_size)
        step = vision.patch_size * self.model.config.scale_factor
        if self.config.image_size % step:
            raise UsageError(
                f"backbone.image_size: {self.config.image_size} is not a multiple of patch_size "
                f"x scale_factor = {step}"
            )

    def image_prompt_ids(self) -> list[int]:
        fake, glob = self.tokenizer.convert_tokens_to_ids([FAKE, GLOBAL])
        return [fake, glob, *super().image_prompt_ids(), fake]

    def preprocess_images(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """-> ``[B, 1, 3, S, S]`` (one view per image)."""
        pixels = resize_unit(images, self.config.image_size)
        out = self.image_processor(
            images=[[p] for p in pixels], do_resize=False, do_rescale=False, return_tensors="pt"
        )
        return out["pixel_values"]

    def image_features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        # the model casts the views to its dtype, then drops all-zero ones as padding; a
        # corruption may produce one (a uniform mid-grey image normalises to zeros), so nudge such
        # views by the smallest normal number *of the model's dtype*: float32's would become 0 in
        # float16 (still far below one 8-bit grey level, ~8e-3 after normalisation)
        flat = pixel_values.flatten(2).abs().amax(-1) == 0
        if bool(flat.any()):
            pixel_values = pixel_values.clone()
            pixel_values[flat] = torch.finfo(self.model.dtype).tiny
        out = self.model.model.get_image_features(pixel_values)
        return torch.cat(list(out.pooler_output)), []


@BACKBONES.register("idefics3")
class Idefics3Backbone(_Idefics3Family):
    """``Idefics3ForConditionalGeneration``."""

    model_class = Idefics3ForConditionalGeneration
    config_class = Idefics3Config
    chat_family = "idefics3"
    # a Llama-3 tokenizer, whose template opens with its bos; <|im_start|> keeps prompt: plain
    offline_bos = "<|begin_of_text|>"
    offline_adds_bos = True
    offline_specials = (FAKE, GLOBAL, "<image>", "<|im_start|>")


@BACKBONES.register("smolvlm")
class SmolVLMBackbone(_Idefics3Family):
    """``SmolVLMForConditionalGeneration`` (SmolVLM / SmolVLM2)."""

    model_class = SmolVLMForConditionalGeneration
    config_class = SmolVLMConfig
    chat_family = "smolvlm"
