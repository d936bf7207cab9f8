"""AdamW with warmup + decay, decoupled weight decay only on matrices (not norms, biases, the
learned position table, or peft's trainable token rows), as is standard for transformer training.

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
    decay, plain = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        matrix = (
            param.ndim >= 2
            and not name.endswith("image_pos")
            and ".trainable_tokens_delta." not in name
            and id(param) not in excluded
        )
        (decay if matrix else plain).append(param)
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": plain, "weight_decay": 0.0},
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
