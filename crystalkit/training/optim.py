"""AdamW with warmup + decay, decoupled weight decay only on matrices (not norms, biases, or the
learned position table), as is standard for transformer training."""

from __future__ import annotations

import torch
from transformers import get_scheduler

from crystalkit.config.schema import TrainConfig


def build_optimizer(
    model: torch.nn.Module, cfg: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 and not name.endswith("image_pos") else no_decay).append(param)
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
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
