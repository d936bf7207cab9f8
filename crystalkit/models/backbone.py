"""The interface every backbone implements.

It is the smallest surface that both the CPU-sized embedded model and a real Hugging Face VLM
(Qwen2.5-VL, LLaVA, ...) can offer without forking the model: token embeddings, image features
merged at image-placeholder tokens, and a forward over ``inputs_embeds`` with an explicit 4-D mask,
position ids and a KV cache that returns logits and hidden states. Latent reasoning is built on
top of exactly this: writing vectors into ``inputs_embeds`` and reading hidden states back.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn
from transformers import PreTrainedModel

from crystalkit.models.compat import cache_kwargs, enable_checkpointing, output_cache
from crystalkit.models.masks import as_additive


def resize_unit(images: torch.Tensor | Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """``uint8`` or [0, 1] float images -> float [0, 1] ``[B, 3, size, size]`` (antialiased
    bilinear, whose non-negative weights keep values in [0, 1]). ``images`` is a ``[B, 3, H, W]``
    batch or a sequence of ``[3, H, W]`` of any sizes (a dataset that keeps native sizes: each is
    resized on its own, after the corruption)."""
    if not isinstance(images, torch.Tensor):
        if len({tuple(image.shape) for image in images}) > 1:
            return torch.cat([resize_unit(image[None], size) for image in images])
        images = torch.stack(list(images))
    pixels = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
    if pixels.shape[-2:] != (size, size):
        pixels = nn.functional.interpolate(
            pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    return pixels


def scatter_image_features(
    embeds: torch.Tensor, is_image: torch.Tensor, features: torch.Tensor, num_images: int
) -> torch.Tensor:
    """``embeds`` with ``features`` ``[num_images * tokens, D]`` written at the image-placeholder
    positions ``is_image`` (in row-major order); a count mismatch is a ``ValueError``."""
    found = int(is_image.sum())
    if found != features.shape[0]:
        raise ValueError(
            f"{found} image placeholder tokens for {num_images} images of "
            f"{features.shape[0] // max(num_images, 1)} tokens each"
        )
    return embeds.masked_scatter(is_image[..., None], features.to(embeds.dtype))


@dataclass
class BackboneOutput:
    """``logits`` ``[B, T, V]``; ``hidden_states`` one ``[B, T, D]`` per layer (embeddings first,
    last layer last) when requested; ``past_key_values`` the updated cache when ``use_cache``."""

    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    past_key_values: Any = None


class Backbone(nn.Module, ABC):
    """A multimodal causal LM as crystalkit drives it."""

    Config: type[BaseModel]

    #: the image placeholder token: the packer lays out ``num_image_tokens`` of them per image,
    #: whose embeddings the backbone replaces with the vision tower's features
    image_token: str = "<image>"

    @classmethod
    @abstractmethod
    def create(
        cls,
        config: BaseModel,
        *,
        corpus: Sequence[str],
        assets: Path | None = None,
        device: torch.device | None = None,
    ) -> Backbone:
        """Build the model. ``assets`` is a run directory whose saved assets (tokenizer, ...) must
        be reused; otherwise fresh ones are made (``corpus`` lists the dataset's words).
        ``device``: where the caller will move the model; a backbone that reads pretrained
        weights may read them straight onto it, so that no process holds a host copy of a
        model it trains on a GPU (randomly initialised weights are built on the CPU, whose
        seeded init does not depend on the device)."""

    @abstractmethod
    def save_assets(self, directory: Path) -> None:
        """Write what :meth:`create` needs besides weights (tokenizer, processor config)."""

    @property
    @abstractmethod
    def tokenizer(self) -> Any:
        """A ``transformers`` tokenizer (``encode``/``decode``, special token ids)."""

    @property
    @abstractmethod
    def num_image_tokens(self) -> int:
        """Placeholder tokens per image."""

    @property
    def image_grid(self) -> tuple[int, int] | None:
        """``(rows, cols)`` of the image tokens in raster order, when they form a grid over the
        whole image (attention maps are drawn on it); ``None`` otherwise."""
        return None

    @property
    def vision_feature_channels(self) -> int | None:
        """Channels of :meth:`vision_features`; ``None`` when the backbone exposes no feature
        map (dense perception pretraining then cannot train it)."""
        return None

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The vision tower's feature map ``[B, C, rows, cols]`` over :attr:`image_grid`, before
        the projection into the language model (what ``method: perceive`` trains)."""
        raise NotImplementedError(f"{type(self).__name__} exposes no vision feature map")

    @property
    def resizes_itself(self) -> bool:
        """Whether images reach :meth:`preprocess_images` at their own size (each gets its own
        grid, :meth:`image_grid_of`) instead of one square size for all."""
        return False

    @property
    def per_image_grids(self) -> bool:
        """Whether images get grids of their own (:meth:`image_grid_of`), so that two images may
        hold different numbers of tokens and cannot trade places in a batch."""
        return False

    def input_size(self, height: int, width: int) -> tuple[int, int] | None:
        """``(height, width)`` the vision tower sees for an image of this size (what
        ``crystal.corrupt_at: model_input`` resizes to before corrupting): by default the
        square ``config.image_size``; ``None`` when the backbone has none."""
        size = getattr(getattr(self, "config", None), "image_size", None)
        return None if size is None else (size, size)

    def image_grid_of(self, height: int, width: int) -> torch.Tensor | None:
        """The grid ``(t, h, w)`` of an image of this size when images have grids of their own
        (:attr:`resizes_itself`), else ``None``."""
        return None

    def grid_tokens(self, grid: torch.Tensor) -> int:
        """Placeholder tokens of an image with this grid."""
        raise NotImplementedError

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    @abstractmethod
    def preprocess_images(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """``[B, 3, H, W]`` images, or a sequence of ``[3, H, W]`` of any sizes (``uint8``, or
        float in [0, 1] after a corruption) -> model pixel values (:func:`resize_unit` brings each
        to the backbone's square; with :attr:`resizes_itself`, each keeps its own grid)."""

    @abstractmethod
    def embed(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token embeddings, with image features written at the image-placeholder positions."""

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`embed` plus per-layer additions ``[L, B, T, D]`` that the model adds to the
        outputs of its first ``L`` decoder layers (Qwen3-VL's deepstack visual features; zero off
        the image tokens), or ``None``. Both are column-aligned with ``input_ids``, so a layout
        can cut paths and chunks out of them and hand them to :meth:`forward`. ``image_grid``
        ``[N, 3]``: each image's grid, when images have their own (:attr:`resizes_itself`).
        The one embedding entry point crystalkit calls: FSDP registers it as a forward, so the
        weights it reads outside :meth:`forward` are gathered first."""
        if image_grid is not None:
            raise ValueError(f"{type(self).__name__} has no per-image grids")
        return self.embed(input_ids, pixel_values), None

    def position_ids(
        self,
        input_ids: torch.Tensor,
        order: torch.Tensor,
        valid: torch.Tensor,
        image_grid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Position ids of a laid-out batch. ``order`` ``[B, T]`` is each token's index on its own
        path (tied columns share it: the packed sequence's intact image and corrupted image, its
        two answers); ``valid`` marks non-padding. Plain RoPE models use ``order`` itself;
        multimodal-RoPE models return ``[3, B, T]`` from their own rope-index function (with
        ``image_grid`` ``[B, 3]``, each row's image grid, when images have their own)."""
        return order

    @property
    def prompt_prefix(self) -> str:
        """Text that opens every prompt (the bos token, or a chat template's user-turn header)."""
        return self.tokenizer.bos_token

    @property
    def image_suffix(self) -> str:
        """Text between the image and the question (what a chat template writes there)."""
        return ""

    @property
    def question_suffix(self) -> str:
        """Text between the question and the latent block (a chat template's assistant-turn
        header); the answer ends with ``tokenizer.eos_token``."""
        return ""

    def prompt_ids(
        self, question: str, question_first: bool = False
    ) -> tuple[list[int], list[int], list[int]]:
        """``(prefix, ids before the image, ids after it)`` of the prompt around ``question``
        (through :attr:`question_suffix`): :attr:`prompt_prefix`, then :attr:`image_suffix` with
        the question, then :attr:`question_suffix`, each encoded on its own. ``question_first``
        moves the question before the image (:attr:`image_suffix` still follows the image)."""

        def encode(text: str) -> list[int]:
            return self.tokenizer.encode(text, add_special_tokens=False) if text else []

        prefix, suffix = encode(self.prompt_prefix), encode(self.question_suffix)
        if question_first:
            return prefix, encode(question), [*encode(self.image_suffix), *suffix]
        return prefix, [], [*encode(self.image_suffix + question), *suffix]

    def image_prompt_ids(self, grid: torch.Tensor | None = None) -> list[int]:
        """The token ids one image occupies in a prompt (placeholders, plus any markers around
        them that the model expects); ``grid``: that image's own (:meth:`image_grid_of`)."""
        count = self.num_image_tokens if grid is None else self.grid_tokens(grid)
        return [self.image_token_id] * count

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: Any = None,
        use_cache: bool = False,
        output_hidden_states: bool = False,
        layer_inputs: torch.Tensor | None = None,
    ) -> BackboneOutput:
        """Run the language model. ``attention_mask`` is additive ``[B, 1, Q, K]`` (a boolean
        "may attend" mask is converted, :func:`~crystalkit.models.masks.as_additive`);
        ``position_ids`` as :meth:`position_ids` gives them; ``layer_inputs`` as
        :meth:`embed_inputs` gives them (for these columns). By default :attr:`language_model`
        runs on them as it is (with :meth:`layer_input_kwargs`) and :meth:`output_logits`
        reads its output, so that every backbone passes the mask, positions and cache alike."""
        lm = self.language_model
        out = lm(
            inputs_embeds=inputs_embeds,
            attention_mask=as_additive(attention_mask, inputs_embeds.dtype),
            position_ids=position_ids,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **self.layer_input_kwargs(layer_inputs),
            **cache_kwargs(lm, past_key_values),
        )
        return BackboneOutput(self.output_logits(out), out.hidden_states, output_cache(out))

    def output_logits(self, output: Any) -> torch.Tensor:
        """The logits of a :attr:`language_model` output: its own, as a causal LM returns them
        (a decoder without the output head overrides this to apply it)."""
        return output.logits

    def layer_input_kwargs(self, layer_inputs: torch.Tensor | None) -> dict[str, Any]:
        """Language-model keyword arguments that carry ``layer_inputs`` (none by default)."""
        if layer_inputs is not None:
            raise ValueError(f"{type(self).__name__} has no per-layer inputs")
        return {}

    @property
    @abstractmethod
    def token_model(self) -> PreTrainedModel:
        """The ``transformers`` model that owns the input embedding and the output head (the
        causal LM, or the whole VLM): its token matrices grow with new tokens."""

    def add_tokens(self, tokens: Sequence[str], init_from: str) -> list[int]:
        """Add special tokens (latent slots, block markers) and return their ids. New embedding
        (and output) rows start as copies of ``init_from``'s row, as Coconut does: random rows
        with norms unlike the trained ones destabilise early training. The matrices grow only
        when they have fewer rows than the tokenizer has tokens (pretrained checkpoints often
        carry spare rows); the ``{token: id}`` map is kept on the model config as
        ``crystalkit_tokens``, so saved checkpoints say which rows are latent tokens."""
        tokenizer = self.tokenizer
        if init_from not in tokenizer.get_vocab():
            raise ValueError(
                f"cannot initialise new tokens from {init_from!r}: not in the vocabulary"
            )
        source = tokenizer.convert_tokens_to_ids(init_from)
        new = [t for t in tokens if t not in tokenizer.get_vocab()]
        if new:
            tokenizer.add_tokens(new, special_tokens=True)
        model = self.token_model
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        if new:
            fresh = tokenizer.convert_tokens_to_ids(new)
            with torch.no_grad():
                for matrix in self.token_matrices():
                    matrix[fresh] = matrix[source].clone()
        ids = tokenizer.convert_tokens_to_ids(list(tokens))
        recorded = getattr(model.config, "crystalkit_tokens", None) or {}
        model.config.crystalkit_tokens = recorded | dict(zip(tokens, ids, strict=True))
        return ids

    @property
    @abstractmethod
    def language_model(self) -> nn.Module:
        """The unmodified ``transformers`` causal LM inside (its attention gets captured, its
        embedding rows grow with new tokens)."""

    @property
    def vision_tower(self) -> nn.Module | None:
        """The modules that turn pixels into image-token embeddings (encoder, projector or
        merger), as one module; ``None`` when there is none. LoRA's ``vision_tower`` option
        adapts its linear layers, and they never match the language model's target names."""
        return None

    def lora_targets(self, target_modules: Sequence[str], vision_tower: bool) -> list[str]:
        """Names of the modules LoRA adapts, as :meth:`named_modules` spells them: modules of
        :attr:`language_model` whose name is or ends with ``.NAME`` for a NAME in
        ``target_modules`` (``q_proj``, ``mlp.down_proj``, ...), plus, with ``vision_tower``,
        every ``nn.Linear`` of :attr:`vision_tower` (which is excluded from the name match, so
        a ViT's ``mlp.down_proj`` is adapted only when asked for). Override when a family's
        layout needs another rule."""
        tower = self.vision_tower
        vision = {id(m) for m in tower.modules()} if tower is not None else set()
        language = {id(m) for m in self.language_model.modules()}
        names = []
        for name, module in self.named_modules():
            if id(module) in vision:
                if vision_tower and isinstance(module, nn.Linear):
                    names.append(name)
            elif id(module) in language and any(
                name == t or name.endswith("." + t) for t in target_modules
            ):
                names.append(name)
        return names

    @property
    def num_layers(self) -> int:
        return self.language_model.config.num_hidden_layers

    def token_matrices(self) -> list[nn.Parameter]:
        """The input embedding and output head weights (one matrix when they are tied)."""
        model = self.token_model
        matrices = [model.get_input_embeddings().weight, model.get_output_embeddings().weight]
        return list({id(m): m for m in matrices}.values())

    def enable_attention_capture(self) -> None:
        """Let :func:`~crystalkit.models.attention_capture.record_attention` read attention rows."""
        from crystalkit.models.attention_capture import enable_attention_capture

        enable_attention_capture(self.language_model)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute decoder layers in backward instead of storing their activations. Uses
        non-reentrant checkpointing with a context that replays attention recording, so the
        alignment rows keep exact gradients (see :mod:`crystalkit.models.attention_capture`)."""
        from crystalkit.models.attention_capture import checkpoint_context

        kwargs = {"use_reentrant": False, "context_fn": checkpoint_context}
        enable_checkpointing(self.language_model, kwargs)

    def save_pretrained(self, directory: Path) -> bool:
        """Write the model in its library's own format (weights, config, tokenizer, processor)
        when it has one, so other tools can load the result; ``False`` when it has none."""
        return False

    def new_cache(self) -> Any:
        """An empty KV cache for incremental decoding."""
        from transformers import DynamicCache

        return DynamicCache()
