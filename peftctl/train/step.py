"""One optimizer step: forward / backward over this rank's micro-batches, then clip, step, schedule.

The loss of each micro-batch is its loss sum divided by the label tokens of the WHOLE (global) step,
so the accumulated gradient is that of one batch of every micro-batch of every rank. Two ways to
accumulate the same step:

* ``accumulate``: reads each micro-batch's loss on the host, skips the backward of a non-finite one
  (FSDP: runs it anyway, see replicas.py), and sums the figures across ranks;
* ``accumulate_on_device`` (deferred host sync, train/host_sync.py): sums the loss and a non-finite
  flag on the device and reads nothing back; tokens are counted on the host-side batch.

The method's training hooks (AdaLoRA's rank allocator) see the loss (``on_loss``, may change it), the
summed gradients (``after_backward``) and the update (``after_step``).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from peftctl.data.tokenize import Example
from peftctl.train.distributed import sum_values
from peftctl.train.objectives import finish_metrics
from peftctl.train.offload import ActivationOffloader, offload_context
from peftctl.train.replicas import Replicas

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> Any:
    """Mixed-precision autocast for train.precision bf16 / fp16; a no-op context for fp32."""
    if precision in AUTOCAST_DTYPES:
        return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])
    return nullcontext()


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch on ``device``; to CUDA through pinned host memory, so the copy does not block the host."""
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def trainable_parameters(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def hooked_loss(hooks: Sequence[Any], loss: torch.Tensor, step: int) -> torch.Tensor:
    """The loss after every hook's ``on_loss(loss, step)`` (each may add a term, e.g. a regulariser)."""
    for hook in hooks:
        on_loss = getattr(hook, "on_loss", None)
        if on_loss is not None:
            loss = on_loss(loss, step)
    return loss


def notify_hooks(hooks: Sequence[Any], event: str, step: int) -> None:
    """``hook.<event>(step)`` for every hook that has it (after_backward, after_step)."""
    for hook in hooks:
        function = getattr(hook, event, None)
        if function is not None:
            function(step)


def add_metrics(sums: dict[str, float], metrics: dict[str, Any]) -> None:
    """Preference objectives' per-micro-batch metric sums (read on the host every step)."""
    for key, value in metrics.items():
        sums[key] = sums.get(key, 0.0) + float(value)


@dataclass
class Accumulated:
    """A step's figures after its backward passes: floats (``accumulate``, summed over the ranks) or,
    for ``loss`` and ``non_finite``, 0-d device tensors (``accumulate_on_device``)."""

    loss: Any  # the step's mean loss
    tokens: int  # real (attention-mask) tokens of the micro-batches
    metrics: dict[str, float]  # per pair / example means over the step (preference objectives), else {}
    non_finite: Any  # accumulate: the bad loss value (or a note that another rank had it), or None


@dataclass
class StepRunner:
    """What a step needs: the model and objective, the optimizer side, and how the ranks share the work."""

    model: Any
    objective: Any  # train/objectives.py: sft's task loss, or a preference objective
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler  # fp16 loss scaling; created disabled otherwise (every call passes through)
    hooks: Sequence[Any]
    offloader: ActivationOffloader | None  # train.gradient_checkpointing=offload
    replicas: Replicas
    device: torch.device
    pad_id: int
    precision: str
    max_grad_norm: float

    def _forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        with autocast(self.device, self.precision), offload_context(self.offloader):
            loss_sum, _, metrics = self.objective.loss(self.model, batch)
        return loss_sum, metrics

    def accumulate(self, group: list[list[Example]], n_tokens: int, step: int) -> Accumulated:
        """Forward / backward of each micro-batch with its figures read on the host, then summed over the
        ranks. ``step``: optimizer steps done before this one."""
        loss_total, tokens, bad_loss, metric_sums = 0.0, 0, None, {}
        for micro in group:
            batch = to_device(self.objective.collate(micro, self.pad_id), self.device)
            loss_sum, metrics = self._forward(batch)
            add_metrics(metric_sums, metrics)
            loss = hooked_loss(self.hooks, loss_sum / n_tokens, step)  # token-weighted over the whole step
            if not torch.isfinite(loss):
                bad_loss = float(loss.detach())
                if not self.replicas.backward_non_finite:
                    continue  # no backward of a non-finite loss; every rank stops after the exchange below
            self.scaler.scale(loss).backward()
            loss_total += float(loss.detach()) if bad_loss is None else 0.0
            tokens += int(batch["attention_mask"].sum())
        dist = self.replicas.dist
        loss_total, tokens, n_bad = sum_values([loss_total, tokens, float(bad_loss is not None)], self.device, dist)
        step_metrics: dict[str, float] = {}
        if metric_sums:  # per pair / example means over the whole (global) step
            keys = sorted(metric_sums)
            summed = sum_values([metric_sums[k] for k in keys], self.device, dist)
            step_metrics = finish_metrics(dict(zip(keys, summed)), n_tokens)
        non_finite = (bad_loss if bad_loss is not None else "non-finite on another rank") if n_bad else None
        return Accumulated(loss_total, int(tokens), step_metrics, non_finite)

    def accumulate_on_device(self, group: list[list[Example]], n_tokens: int, step: int) -> Accumulated:
        """``accumulate`` without reading anything back from the device (deferred host sync): the loss sum
        and the non-finite flag stay 0-d device tensors, and a non-finite loss is backpropagated (the
        flag is read later; nothing is saved before it is)."""
        loss_total = torch.zeros((), dtype=torch.float64, device=self.device)  # as accumulate's float sum
        non_finite = torch.zeros((), dtype=torch.bool, device=self.device)
        tokens, metric_sums = 0, {}
        for micro in group:
            host_batch = self.objective.collate(micro, self.pad_id)
            tokens += int(host_batch["attention_mask"].numpy().sum())  # counted on the host: no device read
            loss_sum, metrics = self._forward(to_device(host_batch, self.device))
            add_metrics(metric_sums, metrics)
            loss = hooked_loss(self.hooks, loss_sum / n_tokens, step)
            non_finite = non_finite | ~torch.isfinite(loss.detach())
            self.scaler.scale(loss).backward()
            loss_total = loss_total + loss.detach().double()
        step_metrics = finish_metrics(metric_sums, n_tokens) if metric_sums else {}
        return Accumulated(loss_total, tokens, step_metrics, non_finite)

    def clip_and_step(self, step: int) -> torch.Tensor:
        """Sum gradients across ranks, clip, optimizer / scheduler step; the grad norm (a 0-d tensor)."""
        params = trainable_parameters(self.optimizer)
        self.replicas.reduce_gradients(params)
        notify_hooks(self.hooks, "after_backward", step)
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm or float("inf"))
        self.scaler.step(self.optimizer)  # a disabled scaler just calls optimizer.step()
        self.scaler.update()
        self.scheduler.step()
        notify_hooks(self.hooks, "after_step", step)
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm
