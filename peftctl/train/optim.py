"""Optimizers and learning-rate schedules."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from peftctl.config.schema import TrainConfig
from peftctl.errors import ConfigError
from peftctl.train.optim_8bit import lean_bitsandbytes_optimizer


def build_optimizer(params: Iterable[torch.nn.Parameter], train_cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ConfigError(
            "the adapter has no trainable parameters; check adapter.target_modules and adapter.inference_mode"
        )
    kwargs = dict(
        lr=train_cfg.lr,
        betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
        eps=train_cfg.adam_eps,
        weight_decay=train_cfg.weight_decay,
    )
    if train_cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs, **fused_adamw_option(params))
    try:
        import bitsandbytes as bnb  # optional dependency
    except ImportError:
        raise ConfigError(
            f"train.optimizer={train_cfg.optimizer} needs bitsandbytes: pip install 'peftctl[quant]'"
        ) from None
    classes = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    }
    return lean_bitsandbytes_optimizer(classes[train_cfg.optimizer])(params, **kwargs)


def fused_adamw_option(params: list[torch.Tensor]) -> dict[str, bool]:
    """``fused=True`` (one multi-tensor CUDA kernel per step instead of a loop of foreach kernels)
    when every parameter is a floating-point CUDA tensor; elsewhere nothing, i.e. torch's default
    AdamW, exactly as before (the CPU path is unchanged)."""
    if params and all(p.device.type == "cuda" and p.is_floating_point() for p in params):
        return {"fused": True}
    return {}


def warmup_steps(train_cfg: TrainConfig, total_steps: int) -> int:
    return train_cfg.warmup_steps or int(math.ceil(train_cfg.warmup_ratio * total_steps))


def lr_multiplier(step: int, total_steps: int, warmup: int, kind: str) -> float:
    """Linear warmup to 1, then linear decay to 0, half-cosine to 0, or constant."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def build_scheduler(
    optimizer: torch.optim.Optimizer, train_cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = warmup_steps(train_cfg, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, warmup, train_cfg.scheduler)
    )
