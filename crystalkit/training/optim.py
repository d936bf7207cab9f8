"""AdamW with warmup + decay, decoupled weight decay only on matrices (not norms, biases, the
learned position table, or peft's trainable token rows), as is standard for transformer training;
the vision tower's parameters get ``lr * train.vision_lr_scale`` (a smaller rate keeps a vision
encoder's features while the language model learns to read them).

peft's token-row table (LoRA runs) holds the latent tokens' rows themselves, not a difference to
them: decay would pull the latent embeddings towards zero instead of towards the base model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import get_scheduler

from crystalkit.config.schema import TrainConfig


def build_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, no_decay: Sequence[torch.nn.Parameter] = ()
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """``no_decay``: further parameters kept out of weight decay (matrices trained only in some
    rows must not shrink elsewhere)."""
    excluded = {id(p) for p in no_decay}
    tower = getattr(model, "vision_tower", None) if cfg.vision_lr_scale != 1 else None
    vision = {id(p) for p in tower.parameters()} if isinstance(tower, torch.nn.Module) else set()
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        matrix = (
            param.ndim >= 2
            and not name.endswith("image_pos")
            and ".trainable_tokens_delta." not in name
            and id(param) not in excluded
        )
        groups.setdefault((id(param) in vision, matrix), []).append(param)
    optimizer = torch.optim.AdamW(
        [
            {
                "params": params,
                "weight_decay": cfg.weight_decay if matrix else 0.0,
                "lr": cfg.lr * (cfg.vision_lr_scale if in_vision else 1.0),
            }
            for (in_vision, matrix), params in sorted(groups.items(), key=_group_order)
        ],
        lr=cfg.lr,
        betas=cfg.betas,
    )
    scheduler = get_scheduler(
        cfg.lr_schedule if cfg.lr_schedule != "constant" else "constant_with_warmup",
        optimizer,
        num_warmup_steps=round(cfg.warmup_ratio * cfg.steps),
        num_training_steps=cfg.steps,
    )
    return optimizer, scheduler


def _group_order(item: tuple[tuple[bool, bool], list]) -> tuple[bool, bool]:
    """Language-model groups first, decayed matrices before the rest: with ``vision_lr_scale``
    1 there are just the decayed and the plain group, in that order, as in earlier versions, so
    a run's optimizer state still loads (and resumes) as before."""
    (in_vision, matrix), _ = item
    return in_vision, not matrix
