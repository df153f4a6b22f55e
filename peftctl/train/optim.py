"""Optimizers and learning-rate schedules."""

from __future__ import annotations

import functools
import math
from typing import Any, Iterable

import torch

from peftctl.config.schema import TrainConfig
from peftctl.errors import ConfigError


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
    return without_per_parameter_sync(classes[train_cfg.optimizer])(params, **kwargs)


class _StepWithoutPerParameterSync:
    """bitsandbytes' Optimizer8bit.step, the same updates in the same order, without the
    ``torch.cuda.synchronize()`` it issues after every parameter.

    Each of those waits for the GPU to drain before the next ~5 µs update kernel is launched: 448 per
    step for QLoRA on all linear layers of an 8B model (a profile counted 903 device synchronizes in two
    steps; benchmarks/RESULTS.md, round 6), and no overlap of the host's launches with the GPU's work.
    The update kernels are ordered on the stream like any other, so the next forward sees the new
    weights without them. Paged states (unified memory) keep one synchronize at the end of the step,
    as bitsandbytes has, before the host could touch them."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        last = None
        for group_index, group in enumerate(self.param_groups):
            for param_index, param in enumerate(group["params"]):
                if param.grad is None:
                    continue
                if len(self.state[param]) == 0:
                    self.init_state(group, param, group_index, param_index)
                self.prefetch_state(param)
                self.update_step(group, param, group_index, param_index)
                last = param
        if self.is_paged and last is not None and last.device.type == "cuda":
            torch.cuda.synchronize(last.device)
        return loss


_BITSANDBYTES_STEP_PARTS = ("check_overrides", "to_gpu", "init_state", "prefetch_state", "update_step")


@functools.cache
def without_per_parameter_sync(cls: type) -> type:
    """``cls`` (a bitsandbytes optimizer) with _StepWithoutPerParameterSync's step, when ``cls`` has the
    parts that step calls (else ``cls`` itself: another bitsandbytes version keeps its own step)."""
    if not all(hasattr(cls, part) for part in _BITSANDBYTES_STEP_PARTS):
        return cls
    return type(cls.__name__, (_StepWithoutPerParameterSync, cls), {"__module__": __name__})


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
