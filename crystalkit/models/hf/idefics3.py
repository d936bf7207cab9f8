"""Idefics3 and SmolVLM (the Idefics3 architecture): a SigLIP encoder and a pixel-shuffle connector.

* ``idefics3`` — ``Idefics3ForConditionalGeneration``.
* ``smolvlm`` — ``SmolVLMForConditionalGeneration`` (SmolVLM / SmolVLM2).

crystalkit feeds one global view per image (no tiling), so every image has the same tokens:
``<fake_token_around_image> <global-img> <image> * N <fake_token_around_image>``. Positions are
plain 1-D ids: the :class:`~crystalkit.models.backbone.Backbone` default serves.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessor,
    Idefics3Processor,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)

from crystalkit.errors import UsageError
from crystalkit.models.backbone import resize_unit
from crystalkit.models.hf.base import HFBackbone, HFConfig
from crystalkit.registries import BACKBONES

IMAGE, FAKE, GLOBAL = "<image>", "<fake_token_around_image>", "<global-img>"


class _Idefics3Family(HFBackbone):
    """What Idefics3 and SmolVLM share (registered per model class below)."""

    image_token = IMAGE
    offline_eos = "<end_of_utterance>"
    offline_pad = "<|endoftext|>"
    offline_bos = "<|im_start|>"
    offline_specials = (FAKE, GLOBAL, IMAGE)
    default_prefix = "<|im_start|>User:"
    default_suffix = "<end_of_utterance>\nAssistant:"

    @classmethod
    def token_fields(cls) -> list[tuple[str, str]]:
        return [("image_token_id", IMAGE)]

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
    offline_specials = (FAKE, GLOBAL, IMAGE, "<|im_start|>")


@BACKBONES.register("smolvlm")
class SmolVLMBackbone(_Idefics3Family):
    """``SmolVLMForConditionalGeneration`` (SmolVLM / SmolVLM2)."""

    model_class = SmolVLMForConditionalGeneration
    config_class = SmolVLMConfig
    chat_family = "smolvlm"
