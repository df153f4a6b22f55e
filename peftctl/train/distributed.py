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

No rank may wait for a collective another rank never enters. So, by construction: every rank runs
the same sequence of collectives (the loop's decisions depend only on the step number and on values
every rank has after an all-reduce); work done by rank 0 alone (checkpoint, eval, final adapter) and
work that may fail on one rank (loading the inputs) is wrapped in ``on_main`` / ``settle``, a status
exchange every rank enters whether or not its part failed, after which all ranks continue or all
raise; and every collective has a finite timeout (train.dist_timeout_s), so anything else is an error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch


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


def init_distributed(device_kind: str, timeout_s: float = 600, group_of_one: bool = False) -> DistInfo:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPUs); SINGLE when not launched so.

    On CUDA the group is bound to this rank's GPU (``device_id``), so NCCL never guesses a device for a
    barrier; every collective has a finite ``timeout_s``, so a rank left waiting fails instead of hanging.
    Control messages (objects, barriers, the status exchanges of ``settle``) go over a separate gloo
    group: they never touch a GPU stream and gloo's timeouts interrupt a blocked wait.

    ``group_of_one``: a single process still gets a process group (of one rank), for code that needs one
    (FSDP2 sharding over one rank, train/fsdp.py); the returned DistInfo is SINGLE all the same."""
    import datetime

    import torch.distributed as dist

    global _CONTROL, _OWN_GROUP
    if launched_world_size() <= 1:
        if group_of_one and not dist.is_initialized():
            _init_group_of_one(device_kind, datetime.timedelta(seconds=timeout_s))
        return SINGLE
    info = DistInfo(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        if device_kind == "cuda":
            device = torch.device("cuda", info.local_rank)
            torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl", device_id=device, timeout=timeout)
        else:
            dist.init_process_group(backend="gloo", timeout=timeout)
        _OWN_GROUP = True
    _CONTROL = dist.new_group(backend="gloo", timeout=timeout) if dist.get_backend() != "gloo" else None
    return info


_CONTROL: Any = None  # the gloo group of control messages (None: the default group is gloo already)
_OWN_GROUP = False  # whether init_distributed created the default group (then shutdown destroys it)


def _init_group_of_one(device_kind: str, timeout: Any) -> None:
    """A one-rank default group: torchrun's rendezvous when launched with one rank, else an in-memory store."""
    import torch.distributed as dist

    global _OWN_GROUP
    if device_kind == "cuda":
        torch.cuda.set_device(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if "MASTER_ADDR" in os.environ and "RANK" in os.environ:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    _OWN_GROUP = True


def shutdown(info: DistInfo) -> None:
    import torch.distributed as dist

    global _CONTROL, _OWN_GROUP
    if _OWN_GROUP and dist.is_initialized():  # a group the caller set up stays theirs
        dist.destroy_process_group()
    _CONTROL, _OWN_GROUP = None, False


def barrier(info: DistInfo) -> None:
    if info.enabled:
        torch.distributed.barrier(group=_CONTROL)


def broadcast_object(value: Any, info: DistInfo) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not info.enabled:
        return value
    holder = [value]
    torch.distributed.broadcast_object_list(holder, src=0, group=_CONTROL)
    return holder[0]


def gather_objects(value: Any, info: DistInfo) -> list[Any] | None:
    """Every rank's ``value``, in rank order, on rank 0 (None elsewhere)."""
    if not info.enabled:
        return [value]
    gathered: list[Any] | None = [None] * info.world_size if info.is_main else None
    torch.distributed.gather_object(value, gathered, dst=0, group=_CONTROL)
    return gathered


def all_objects(value: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not info.enabled:
        return [value]
    gathered: list[Any] = [None] * info.world_size
    torch.distributed.all_gather_object(gathered, value, group=_CONTROL)
    return gathered


# test-only fault injection (tests/integration/test_launch_and_collectives.py): PEFTCTL_TEST_FAIL_AT=<point>:<rank>
# raises on that rank where fail_point(<point>) is called ("inputs" raises a ConfigError, others a RuntimeError);
# <point>:<rank>:stall makes that rank stop there for an hour instead (a rank that hangs)
FAIL_ENV = "PEFTCTL_TEST_FAIL_AT"


def fail_point(point: str, info: DistInfo) -> None:
    """Raise (or stall) here on the rank PEFTCTL_TEST_FAIL_AT names for this point (tests only; a no-op otherwise)."""
    wanted = os.environ.get(FAIL_ENV)
    if wanted == f"{point}:{info.rank}:stall":
        import time

        time.sleep(3600)
    if wanted == f"{point}:{info.rank}":
        from peftctl.errors import ConfigError

        if point == "inputs":
            raise ConfigError(f"injected bad input on rank {info.rank} (test)")
        raise RuntimeError(f"injected failure at {point} on rank {info.rank} (test)")


def settle(failure: BaseException | None, info: DistInfo) -> None:
    """Every rank tells every other whether its part of a section failed; then either all ranks go on
    or all raise: the failing rank its own exception, the others the same error class (a
    PeftctlError keeps its exit code) with the failing rank's message. Call it on every rank, at
    the same point, so no rank is left waiting in a collective the failed one never reaches."""
    if not info.enabled:
        if failure is not None:
            raise failure
        return
    mine = None if failure is None else (type(failure).__name__, str(failure), getattr(failure, "exit_code", 1))
    outcomes = all_objects(mine, info)
    if failure is not None:
        if any(outcome is not None for outcome in outcomes[: info.rank]):
            failure.reported_elsewhere = True  # type: ignore[attr-defined]  # the lowest failing rank prints its line
        raise failure
    for rank, outcome in enumerate(outcomes):
        if outcome is not None:
            raise _error_from_other_rank(rank, *outcome)


def _error_from_other_rank(rank: int, kind: str, message: str, exit_code: int) -> Exception:
    from peftctl.errors import ConfigError, PeftctlError, TrainingError

    if kind in ("ConfigError",) or exit_code == 2:
        error: Exception = ConfigError(message)
    elif kind == "TrainingError":
        error = TrainingError(message)
    else:
        error = TrainingError(f"rank {rank} failed: {kind}: {message}")
    if isinstance(error, PeftctlError):
        error.reported_elsewhere = True  # type: ignore[attr-defined]  # cli: only the failing rank prints it
    return error


def on_main(action: Any, info: DistInfo) -> Any:
    """``action()`` on rank 0 alone (writing files, evaluating), then ``settle``: if it raised, every
    rank raises; otherwise its value on rank 0 (None elsewhere)."""
    value, failure = None, None
    if info.is_main:
        try:
            value = action()
        except Exception as exc:  # handed to settle, which re-raises it here
            failure = exc
    settle(failure, info)
    return value


def on_all_ranks(action: Any, info: DistInfo) -> None:
    """``action()`` on every rank, then ``settle``: if it raised on any rank, every rank raises."""
    failure = None
    try:
        action()
    except Exception as exc:  # handed to settle, which re-raises it here
        failure = exc
    settle(failure, info)


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
