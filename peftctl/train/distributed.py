"""Data-parallel training over several processes (`torchrun --nproc_per_node=N -m peftctl train ...`).

Every rank holds the whole model and trains the same adapter on its share of each optimizer step's
micro-batches. Only the adapter trains, so its gradients are small: after the local backward passes
they are summed across ranks in ONE all-reduce of a flat buffer, instead of wrapping the model in
DistributedDataParallel (no bucket hooks, no find_unused_parameters, nothing method-specific, works
with gradient checkpointing and bitsandbytes layers). The loss is normalised by the token count of
the whole global batch, which every rank knows (all ranks read the same data), so N ranks with
``batch_size=b, grad_accum=k`` take exactly the step of one process with ``batch_size=b,
grad_accum=N·k`` (tests/integration/test_distributed.py checks this).

Rank 0 alone writes the run directory (config, metrics, checkpoints, adapter, plots); the other
ranks' RNG states are gathered into each checkpoint so a resumed run continues every rank's stream.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistInfo()


def launched_world_size() -> int:
    """WORLD_SIZE as set by torchrun (1 when started as a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device_kind: str) -> DistInfo:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPUs); SINGLE when not launched so."""
    if launched_world_size() <= 1:
        return SINGLE
    info = DistInfo(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )
    if not dist.is_initialized():
        if device_kind == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return info


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        torch.distributed.barrier()


def broadcast_object(value: Any, info: DistInfo) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not info.enabled:
        return value
    holder = [value]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_objects(value: Any, info: DistInfo) -> list[Any] | None:
    """Every rank's ``value``, in rank order, on rank 0 (None elsewhere)."""
    if not info.enabled:
        return [value]
    gathered: list[Any] | None = [None] * info.world_size if info.is_main else None
    torch.distributed.gather_object(value, gathered, dst=0)
    return gathered


def broadcast_parameters(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Start every rank from rank 0's trainable weights (inits with randomness or GPU nondeterminism)."""
    if not info.enabled:
        return
    with torch.no_grad():
        for param in params:
            torch.distributed.broadcast(param.data, src=0)


def sum_gradients(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """grad ← Σ_ranks grad, in one all-reduce per dtype of a flat buffer (missing grads count as 0)."""
    if not info.enabled:
        return
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        by_dtype.setdefault(param.grad.dtype, []).append(param)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        offset = 0
        for param in group:
            count = param.grad.numel()
            param.grad.copy_(flat[offset : offset + count].view_as(param.grad))
            offset += count


def sum_values(values: list[float], device: torch.device, info: DistInfo) -> list[float]:
    """Element-wise sum of a few scalars across ranks (loss, token counts, a non-finite flag)."""
    if not info.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor.tolist()
