"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: the paper's model family (Qwen2.5-VL-7B-Instruct).

Three things differ from a plain RoPE model, and each is handled through the model's public API:

* **M-RoPE positions.** Image tokens take ``(t, h, w)`` positions and the text after an image
  continues from the largest one. :meth:`QwenVLBackbone.position_ids` asks the model's own
  ``get_rope_index`` for each row's *path* (one image; a packed row's two images and two answers
  share their path positions) and gathers the result back onto the packed columns.
* **Image markers.** An image is ``<|vision_start|> <|image_pad|> * N <|vision_end|>``.
* **Deepstack (Qwen3-VL).** Features from intermediate vision layers are added to the outputs of
  the first decoder layers at the image tokens. They travel as per-layer inputs and are handed to
  the language model's ``deepstack_visual_embeds`` argument, so merging image features here loses
  nothing.

**Resolution.** ``resolution: fixed`` squashes every image to ``image_size`` x ``image_size`` (one
grid for all). ``resolution: processor`` lets the image processor resize each image itself
(``smart_resize``: aspect kept, between ``min_pixels`` and ``max_pixels``), so every image has its
own grid ``(t, h, w)`` and token count: pixel values are padded per image to the widest and the
grids travel with the layout (:meth:`image_features`, :meth:`position_ids` read them).

The top-level model caches ``rope_deltas`` between calls; crystalkit never calls that forward, so a
stale value (e.g. left by ``generate``) cannot shift positions — a test keeps it that way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from crystalkit.errors import UsageError
from crystalkit.models.backbone import resize_unit
from crystalkit.models.hf.base import HFBackbone, HFConfig
from crystalkit.registries import BACKBONES

VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD = (
    "<|vision_start|>",
    "<|image_pad|>",
    "<|vision_end|>",
    "<|video_pad|>",
)


class QwenVLBackbone(HFBackbone):
    """Shared by the Qwen-VL generations (registered per generation below)."""

    image_token = IMAGE_PAD
    offline_specials = ("<|im_start|>", VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD)
    chat_image_markup = VISION_START + IMAGE_PAD + VISION_END
    default_prefix = "<|im_start|>user\n"
    default_suffix = "<|im_end|>\n<|im_start|>assistant\n"

    @classmethod
    def token_fields(cls) -> list[tuple[str, str]]:
        return [
            ("image_token_id", IMAGE_PAD),
            ("video_token_id", VIDEO_PAD),
            ("vision_start_token_id", VISION_START),
            ("vision_end_token_id", VISION_END),
        ]

    #: ``resolution: processor`` is supported (the processor resizes each image itself)
    processor_resolution = True

    @classmethod
    def build_processor(cls, model_config: Any, config: HFConfig) -> Qwen2VLImageProcessor:
        vision = model_config.vision_config
        if config.resolution == "processor":  # the processor's own defaults, unless overridden
            default = Qwen2VLImageProcessor().size
            size = {
                "shortest_edge": config.min_pixels or default.shortest_edge,
                "longest_edge": config.max_pixels or default.longest_edge,
            }
        else:
            pixels = config.image_size**2
            size = {"shortest_edge": pixels, "longest_edge": pixels}
        return Qwen2VLImageProcessor(
            patch_size=vision.patch_size,
            temporal_patch_size=vision.temporal_patch_size,
            merge_size=vision.spatial_merge_size,
            size=size,
        )

    @classmethod
    def load_processor(cls, path: Any, config: HFConfig) -> Any:
        processor = super().load_processor(path, config)
        if config.resolution == "processor" and (config.min_pixels or config.max_pixels):
            size = processor.size
            processor.size = {
                "shortest_edge": config.min_pixels or size["shortest_edge"],
                "longest_edge": config.max_pixels or size["longest_edge"],
            }
        return processor

    @property
    def _vision(self) -> Any:
        return self.model.config.vision_config

    @property
    def token_side(self) -> int:
        return self.config.image_size // (self._vision.patch_size * self._vision.spatial_merge_size)

    @property
    def image_grid(self) -> tuple[int, int] | None:
        return None if self.resizes_itself else super().image_grid

    def check_image_size(self) -> None:
        step = self._vision.patch_size * self._vision.spatial_merge_size
        if not self.resizes_itself and self.config.image_size % step:
            raise UsageError(
                f"backbone.image_size: {self.config.image_size} is not a multiple of patch_size x "
                f"spatial_merge_size = {step}"
            )
        text = self.model.config.text_config
        section = (text.rope_parameters or {}).get("mrope_section")
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        if section is not None and sum(section) != head_dim // 2:
            raise UsageError(
                f"backbone.config.text_config.rope_parameters.mrope_section: {section} must sum "
                f"to head_dim / 2 = {head_dim // 2}"
            )

    #: the family's transformers processor and video processor classes
    processor_class: Any = Qwen2VLProcessor
    video_processor_class: Any = Qwen2VLVideoProcessor

    def hf_processor(self) -> Any:
        return self.processor_class(
            image_processor=self.image_processor,
            tokenizer=self.tokenizer,
            video_processor=self.video_processor_class(),
            chat_template=self.tokenizer.chat_template,
        )

    def processor_geometry(self) -> dict[str, tuple[Any, Any, str]]:
        processor, vision = self.image_processor, self._vision
        return {
            "patch_size": (processor.patch_size, vision.patch_size, "vision_config.patch_size"),
            "merge_size": (
                processor.merge_size,
                vision.spatial_merge_size,
                "vision_config.spatial_merge_size",
            ),
            "temporal_patch_size": (
                processor.temporal_patch_size,
                vision.temporal_patch_size,
                "vision_config.temporal_patch_size",
            ),
        }

    def image_prompt_ids(self, grid: torch.Tensor | None = None) -> list[int]:
        start, end = self.tokenizer.convert_tokens_to_ids([VISION_START, VISION_END])
        return [start, *super().image_prompt_ids(grid), end]

    @property
    def resizes_itself(self) -> bool:
        return self.config.resolution == "processor"

    @property
    def per_image_grids(self) -> bool:
        return self.resizes_itself

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        if not self.resizes_itself:
            return self.config.image_size, self.config.image_size
        size = self.image_processor.size
        return smart_resize(
            height,
            width,
            factor=self._vision.patch_size * self._vision.spatial_merge_size,
            min_pixels=size["shortest_edge"],
            max_pixels=size["longest_edge"],
        )

    def image_grid_of(self, height: int, width: int) -> torch.Tensor | None:
        """``(t, h, w)`` in patches of an image of this size (``resolution: processor``; the
        processor's own ``smart_resize``), ``None`` under ``resolution: fixed``."""
        if not self.resizes_itself:
            return None
        rows, cols = self.input_size(height, width)
        return torch.tensor([1, rows // self._vision.patch_size, cols // self._vision.patch_size])

    def grid_tokens(self, grid: torch.Tensor) -> int:
        return int(grid.prod()) // self._vision.spatial_merge_size**2

    @property
    def _grid_thw(self) -> torch.Tensor:
        side = self.config.image_size // self._vision.patch_size
        return torch.tensor([1, side, side])

    def preprocess_images(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """-> ``[B, patches, C * T * P * P]`` (the processor's flattened patches, per image).
        ``resolution: processor``: ``images`` may differ in size (a list; ``uint8`` or [0, 1]
        float); the processor resizes each, and each image's patches are zero-padded to the most
        (its grid, :meth:`image_grid_of`, says how many are real)."""
        if not self.resizes_itself:
            pixels = resize_unit(images, self.config.image_size)
            out = self.image_processor(
                images=list(pixels), do_resize=False, do_rescale=False, return_tensors="pt"
            )
            return out["pixel_values"].view(len(pixels), -1, out["pixel_values"].shape[-1])
        rows = self.process_each(images, do_resize=True)
        width = max(len(r) for r in rows)
        return torch.stack([torch.nn.functional.pad(r, (0, 0, 0, width - len(r))) for r in rows])

    def image_features(
        self, pixel_values: torch.Tensor, image_grid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if image_grid is None:
            grid = self._grid_thw.to(pixel_values.device).expand(pixel_values.shape[0], 3)
            flat = pixel_values.flatten(0, 1)
        else:  # per-image grids: the real patches of each padded row
            grid = image_grid.to(pixel_values.device)
            counts = grid.prod(-1).tolist()
            flat = torch.cat([row[:n] for row, n in zip(pixel_values, counts, strict=True)])
        out = self.model.model.get_image_features(flat, grid)
        per_layer = getattr(out, "deepstack_features", None) or []
        return torch.cat(out.pooler_output), [torch.cat(f) for f in per_layer]

    def position_ids(
        self,
        input_ids: torch.Tensor,
        order: torch.Tensor,
        valid: torch.Tensor,
        image_grid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[3, B, T]`` M-RoPE positions: the model's ``get_rope_index`` on each row's path,
        gathered back through ``order`` (so tied columns get identical positions). A path holds
        one image; ``image_grid`` ``[B, 3]`` gives each row's (``resolution: processor``)."""
        batch, width = input_ids.shape
        length = int(order[valid].max()) + 1 if bool(valid.any()) else 1
        path = torch.full((batch, length), self.tokenizer.pad_token_id, dtype=input_ids.dtype)
        path = path.to(input_ids.device)
        on_path = torch.zeros(batch, length, dtype=torch.long, device=input_ids.device)
        rows = torch.arange(batch, device=input_ids.device)[:, None].expand(batch, width)
        path[rows[valid], order[valid]] = input_ids[valid]
        on_path[rows[valid], order[valid]] = 1
        is_image = (path == self.image_token_id) & on_path.bool()
        starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
        if image_grid is None:
            grid = self._grid_thw.to(input_ids.device).expand(int(starts.sum()), 3)
        else:  # one grid per image start, in row order
            grid = image_grid.to(input_ids.device).repeat_interleave(starts.sum(1), dim=0)
        positions, _ = self.model.model.get_rope_index(
            path,
            mm_token_type_ids=is_image.int(),
            image_grid_thw=grid if len(grid) else None,
            attention_mask=on_path,
        )
        return positions.gather(2, order[None].expand(3, batch, width))


@BACKBONES.register("qwen2_vl")
class Qwen2VLBackbone(QwenVLBackbone):
    """``Qwen2VLForConditionalGeneration``."""

    model_class = Qwen2VLForConditionalGeneration
    config_class = Qwen2VLConfig
    chat_family = "qwen2_vl"


@BACKBONES.register("qwen2_5_vl")
class Qwen25VLBackbone(QwenVLBackbone):
    """``Qwen2_5_VLForConditionalGeneration`` (the paper's backbone)."""

    model_class = Qwen2_5_VLForConditionalGeneration
    config_class = Qwen2_5_VLConfig
    processor_class = Qwen2_5_VLProcessor
    chat_family = "qwen2_5_vl"


@BACKBONES.register("qwen3_vl")
class Qwen3VLBackbone(QwenVLBackbone):
    """``Qwen3VLForConditionalGeneration``, with its deepstack features as per-layer inputs."""

    model_class = Qwen3VLForConditionalGeneration
    config_class = Qwen3VLConfig
    processor_class = Qwen3VLProcessor
    video_processor_class = Qwen3VLVideoProcessor
    chat_family = "qwen3_vl"

    def layer_input_kwargs(self, layer_inputs: torch.Tensor | None) -> dict[str, Any]:
        if layer_inputs is None:
            return {}
        # zero off the image tokens: adding at every position equals adding at the image ones
        everywhere = torch.ones(
            layer_inputs.shape[1:3], dtype=torch.bool, device=layer_inputs.device
        )
        return {
            "visual_pos_masks": everywhere,
            "deepstack_visual_embeds": [layer.flatten(0, 1) for layer in layer_inputs],
        }
