"""Deferred host syncs: on CUDA the loop leaves a step's figures on the GPU until something reads them.

Why: reading a CUDA tensor on the host (``float(loss)``, ``bool(torch.isfinite(loss))``) waits for every
kernel queued so far. Read once per micro-batch, the host cannot queue the next step's work while the
GPU runs this one, and the GPU idles between steps (for a small adapter a large share of the step).
So with ``defer_host_sync`` a step keeps its loss sum, grad norm and a non-finite flag on the device
(``PendingStep``) and the loop reads them at a log step, an eval, a checkpoint or the end: all the
pending steps' flags in one transfer (``PendingChecks.check``).

The cost: a non-finite loss is reported at the next read, not at once. The backward and update of
that step (and of the steps after it) have run by then, since skipping them would need the flag on
the host, but nothing is saved from them: every eval, checkpoint and the final adapter first runs the
check (and the weights' own finite check, train/non_finite.py). The error names the first bad step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from peftctl.train.distributed import DistInfo
from peftctl.train.non_finite import loss_error


def defer_host_sync(device: torch.device, dist: DistInfo) -> bool:
    """Whether the loop keeps each step's figures on the device until a log step (Trainer.deferred_sync).

    CUDA, one process only: on the CPU a read costs no wait; several ranks exchange the figures every
    step anyway (distributed.sum_values); an FSDP run (the Trainer checks) must stop before the update."""
    return device.type == "cuda" and not dist.enabled


@dataclass
class PendingStep:
    """A step whose loss / grad norm / non-finite flag are still on the device (deferred sync)."""

    step: int
    loss: torch.Tensor
    grad_norm: torch.Tensor
    non_finite: torch.Tensor


class PendingChecks:
    """The deferred steps not yet checked for a non-finite loss."""

    def __init__(self) -> None:
        self.steps: list[PendingStep] = []

    def add(self, step: PendingStep) -> None:
        self.steps.append(step)

    def clear(self) -> None:
        self.steps.clear()

    def check(self, current_step: int, last_checkpoint: Path | None) -> None:
        """Read the pending steps' non-finite flags (one transfer); TrainingError naming the first bad step."""
        if not self.steps:
            return
        pending, self.steps = self.steps, []
        flags = torch.stack([p.non_finite for p in pending]).cpu()
        if not bool(flags.any()):
            return
        first = pending[int(flags.to(torch.int8).argmax())]
        raise loss_error(float(first.loss), first.step, last_checkpoint, stopped_at=current_step)
