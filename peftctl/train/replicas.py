"""How the ranks share the loop's work: whole copies of the model, or FSDP shards of it.

Everything the Trainer does differently for a model sharded with FSDP2 (train/fsdp.py) is one method
of ``Sharded`` here, next to what ``Replicated`` (one process, or ``train.distributed=ddp``) does
instead (each line below: Replicated | Sharded); the loop asks which it has only to keep deferred host
syncs (train/host_sync.py) off a sharded run:

* start: every rank takes rank 0's adapter weights | nothing (run.py broadcast them before sharding);
* a non-finite loss: no backward (every rank stops before it) | a backward anyway (its collectives need
  every rank), the update is refused after it;
* gradients: summed here in one all-reduce | already reduce-scattered by FSDP2 in the backward;
* evaluation: rank 0 evaluates and records | every rank evaluates (each forward gathers every block
  from every rank), rank 0 records;
* checkpoints: rank 0 writes the tensors and optimizer state | every rank writes its shards to a
  staging folder that rank 0's write moves in; the number of ranks and the accumulation are saved.

Both keep ``distributed.py``'s rule: every rank enters every collective in the same order, and work
done by one rank ends in a status exchange (``on_main`` / ``on_all_ranks``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from peftctl.train import fsdp
from peftctl.train.distributed import (
    DistInfo,
    broadcast_parameters,
    fail_point,
    on_all_ranks,
    on_main,
    sum_gradients,
)

Evaluation = dict[str, float]
# FSDP: (the gathered adapter tensors, a function moving the ranks' staged shards into a checkpoint folder)
StagedShards = tuple[dict[str, torch.Tensor], Callable[[Path], None]]


class Replicated:
    """Every rank holds the whole model (one process, or ddp); rank 0 alone evaluates and writes."""

    sharded = False
    backward_non_finite = False  # a non-finite loss gets no backward; every rank stops before the update

    def __init__(self, dist: DistInfo) -> None:
        self.dist = dist

    def share_initial_weights(self, params: list[torch.nn.Parameter]) -> None:
        broadcast_parameters(params, self.dist)

    def reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        sum_gradients(params, self.dist)

    def evaluate(self, evaluate: Callable[[], Evaluation], record: Callable[[Evaluation], Evaluation]) -> Any:
        """``record(evaluate())`` on rank 0 (its value there, None elsewhere); every rank leaves or raises together."""

        def run() -> Evaluation:
            fail_point("eval", self.dist)
            return record(evaluate())

        return on_main(run, self.dist)

    def checkpoint_layout(self, grad_accum: int) -> dict[str, int]:
        return {}

    def stage_shards(self, run_dir: Path, step: int, model: Any, adapter_name: str, optimizer: Any) -> None:
        return None  # rank 0 saves the model's own tensors and the optimizer state

    def load_shards(self, checkpoint: Path, model: Any, optimizer: Any) -> None:
        return None  # load_checkpoint reads the tensors and the optimizer state


class Sharded:
    """FSDP2: each rank holds 1/N of every tensor and every rank runs every forward."""

    sharded = True
    backward_non_finite = True  # the backward's collectives need every rank; the update is refused after it

    def __init__(self, dist: DistInfo) -> None:
        self.dist = dist

    def share_initial_weights(self, params: list[torch.nn.Parameter]) -> None:
        return None  # run.py broadcast rank 0's weights before sharding

    def reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        return None  # FSDP2 reduce-scattered them during the backward

    def evaluate(self, evaluate: Callable[[], Evaluation], record: Callable[[Evaluation], Evaluation]) -> Any:
        """Every rank evaluates (each forward is collective); ``record`` runs on rank 0 (its value there)."""
        on_all_ranks(lambda: fail_point("eval", self.dist), self.dist)
        evaluation = evaluate()
        return on_main(lambda: record(evaluation), self.dist)

    def checkpoint_layout(self, grad_accum: int) -> dict[str, int]:
        """Saved so that a resume on another number of ranks keeps the global batch (run.fsdp_accumulation)."""
        return {"world_size": self.dist.world_size, "grad_accum": grad_accum}

    def stage_shards(self, run_dir: Path, step: int, model: Any, adapter_name: str, optimizer: Any) -> StagedShards:
        """Every rank: the gathered adapter, and each rank's shards written to a staging folder that rank
        0's checkpoint write then moves in. Returns (adapter tensors, that move)."""
        tensors = fsdp.full_adapter_tensors(model, adapter_name)
        staging = fsdp.staging_dir(run_dir, step)
        on_main(lambda: fsdp.clear_staging(staging), self.dist)
        on_all_ranks(lambda: fsdp.save_shards(staging, model, optimizer), self.dist)
        return tensors, lambda checkpoint_tmp: fsdp.move_shards_into(staging, checkpoint_tmp)

    def load_shards(self, checkpoint: Path, model: Any, optimizer: Any) -> None:
        fsdp.load_shards(checkpoint, model, optimizer)  # every rank: its shards


Replicas = Replicated | Sharded


def replicas_of(model: Any, dist: DistInfo) -> Replicas:
    """Sharded when the model's parameters are FSDP2 DTensors (run.py sharded it), else Replicated."""
    return Sharded(dist) if fsdp.is_sharded(model) else Replicated(dist)
