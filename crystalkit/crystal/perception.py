"""Dense perception pretraining (``method: perceive``): the stand-in for a pretrained vision tower.

The paper applies CrystaL to an instruct model whose vision tower already sees. The embedded
backbone starts from random weights, and its encoder does not learn to see from the answer's
gradient alone when a question first needs a retrieval (docs/testbed.md): shape questions stay at
chance. A ``perceive`` stage trains the vision tower the way detection and segmentation
pretraining do, with dense labels: every cell of its feature grid is classified, one linear head
per attribute, by the object whose box centre lies in the cell (or ``none``). The labels come
from the samples' ``meta["objects"]`` (a list of ``{"box": [x0, y0, x1, y1], attribute: value,
...}``); the values each attribute may take come from the dataset (``object_attributes``).

The heads live on the backbone as ``perception_heads`` (so checkpoints and resumed runs keep
them); they are read only by this stage.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from crystalkit.data.sample import Sample
from crystalkit.errors import UsageError
from crystalkit.models.backbone import Backbone

#: the attribute name under which the heads are kept on the backbone
HEADS = "perception_heads"


class PerceptionHeads(nn.ModuleDict):
    """One linear classifier per attribute over the feature channels: its values, then ``none``
    (no object centred in the cell)."""

    def __init__(self, channels: int, vocab: Mapping[str, Sequence[str]]):
        super().__init__(
            {name: nn.Linear(channels, len(values) + 1) for name, values in vocab.items()}
        )


def attach_heads(
    backbone: Backbone, attributes: Sequence[str], vocab: Mapping[str, Sequence[str]] | None
) -> PerceptionHeads:
    """The backbone's perception heads for ``attributes`` (built on first use; a later stage
    that perceives again shares them). One-line errors for a backbone without a feature map or
    a dataset without the attributes."""
    channels = backbone.vision_feature_channels
    if channels is None:
        raise UsageError(
            f"method perceive: backbone {type(backbone).__name__} exposes no vision feature map "
            "(expected the embedded backbone; pretrained backbones already see)"
        )
    vocab = vocab or {}
    missing = [a for a in attributes if a not in vocab]
    if missing:
        known = ", ".join(sorted(vocab)) or "none"
        raise UsageError(
            f"perception.attributes: the dataset lists no values for {missing[0]!r} (its object "
            f"attributes: {known})"
        )
    wanted = {a: list(vocab[a]) for a in attributes}
    heads = getattr(backbone, HEADS, None)
    if heads is None:
        heads = PerceptionHeads(channels, wanted)
        backbone.add_module(HEADS, heads)
    elif set(heads) != set(wanted):
        raise UsageError(
            f"perception.attributes: every perceive stage must classify the same attributes "
            f"(one has {sorted(heads)}, another {sorted(wanted)})"
        )
    return heads


def cell_labels(
    samples: Sequence[Sample],
    vocab: Mapping[str, Sequence[str]],
    grid: tuple[int, int],
) -> torch.Tensor:
    """``[B, A, rows * cols]`` class indices (raster order): the value of each attribute of the
    object whose box centre falls in the cell, ``len(values)`` where none does. A later object
    of ``meta["objects"]`` wins a shared cell."""
    rows, cols = grid
    names = list(vocab)
    labels = torch.tensor([len(vocab[n]) for n in names]).repeat(len(samples), rows * cols, 1)
    for i, sample in enumerate(samples):
        objects = sample.meta.get("objects")
        if not objects:
            raise UsageError(
                f"method perceive: sample {sample.index} lists no objects (expected "
                "meta['objects'] with a box and the attributes of each object)"
            )
        height, width = sample.image.shape[-2:]
        for obj in objects:
            x0, y0, x1, y1 = obj["box"]
            r = min(int((y0 + y1) / 2 * rows / height), rows - 1)
            c = min(int((x0 + x1) / 2 * cols / width), cols - 1)
            for a, name in enumerate(names):
                value = obj.get(name)
                if value not in vocab[name]:
                    raise UsageError(
                        f"method perceive: sample {sample.index} has an object whose {name!r} is "
                        f"{value!r} (expected one of {', '.join(vocab[name])})"
                    )
                labels[i, r * cols + c, a] = vocab[name].index(value)
    return labels.transpose(1, 2)


def perception_terms(
    backbone: Backbone, pixel_values: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The summed cross-entropy over attributes (each a mean over every cell of the batch, so a
    mean over samples too: every image has the same cells) and each attribute's term."""
    heads: PerceptionHeads = getattr(backbone, HEADS)
    features = backbone.vision_features(pixel_values).flatten(2).transpose(1, 2)  # [B, N, C]
    terms = {
        f"perceive_{name}": nn.functional.cross_entropy(
            head(features).flatten(0, 1), labels[:, a].flatten()
        )
        for a, (name, head) in enumerate(heads.items())
    }
    return sum(terms.values()), terms
