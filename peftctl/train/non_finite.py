"""A run never saves NaN / inf: a non-finite loss or weight stops training with one line that names the
step, what went bad and the last good checkpoint (which is finite: every save checks first)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from peftctl.errors import TrainingError
from peftctl.train import fsdp

ADVICE = "Try a lower train.lr or train.precision=fp32"


def last_good_checkpoint(last_checkpoint: Path | None) -> str:
    return f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"


def loss_error(value: Any, step: int, last_checkpoint: Path | None, stopped_at: int | None = None) -> TrainingError:
    """The loss became ``value`` at ``step``; ``stopped_at``: the later step where a deferred check found it."""
    stopped = "training stopped" if stopped_at is None else f"training stopped at step {stopped_at}"
    return TrainingError(
        f"loss became {value} at step {step}; {stopped} ({last_good_checkpoint(last_checkpoint)}). {ADVICE}"
    )


def first_non_finite(model: Any, optimizer: torch.optim.Optimizer) -> str | None:
    """The name of the first trainable tensor (or optimizer state) holding NaN / inf, or None.
    Sharded (FSDP): this rank's shards, so no collective is needed (every rank checks its own)."""
    for name, param in model.named_parameters():
        if param.requires_grad and not bool(torch.isfinite(fsdp.local(param.detach())).all()):
            return name
    for param_state in optimizer.state.values():
        for key, value in param_state.items():
            if (
                isinstance(value, torch.Tensor)
                and value.is_floating_point()
                and not bool(torch.isfinite(fsdp.local(value)).all())
            ):
                return f"the optimizer state ({key})"
    return None


def require_finite(
    model: Any, optimizer: torch.optim.Optimizer, step: int, last_checkpoint: Path | None, what: str
) -> None:
    """TrainingError instead of saving ``what`` with non-finite weights: the last good checkpoint stays finite."""
    bad = first_non_finite(model, optimizer)
    if bad is not None:
        raise TrainingError(
            f"{bad} became non-finite by step {step}; training stopped without saving {what} "
            f"({last_good_checkpoint(last_checkpoint)}). {ADVICE}"
        )
