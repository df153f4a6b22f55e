"""The loop's side of checkpoints (train/checkpoint.py writes and reads the files): which objects a
checkpoint holds, who writes it across the ranks, and the learning rate of a resume with a new train.lr."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from peftctl.train.checkpoint import checkpoint_dir, load_checkpoint, rng_state, save_checkpoint
from peftctl.train.distributed import fail_point, gather_objects, on_main
from peftctl.train.replicas import Replicas


@dataclass
class Checkpointer:
    """One list of what a checkpoint saves and resume restores: the adapter, the optimizer, scheduler and
    loss scaler, the method's training hooks, and every rank's RNG state (beside the loop's own state)."""

    run_dir: Path
    model: Any
    adapter_name: str
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    hooks: Sequence[Any]
    keep: int  # train.keep_checkpoints
    replicas: Replicas

    def write(self, state: dict[str, Any]) -> Path:
        """checkpoints/step-N with the loop's ``state`` (trainer_state.json); call on every rank: the RNG
        states are gathered and FSDP shards staged by every rank, then rank 0 writes (a failed write there
        ends every rank). Returns the checkpoint's folder."""
        dist = self.replicas.dist
        rank_rngs = gather_objects(rng_state(), dist)  # every rank's dropout stream, for resume
        shards = self.replicas.stage_shards(self.run_dir, state["step"], self.model, self.adapter_name, self.optimizer)

        def save() -> Path:
            fail_point("checkpoint", dist)
            return save_checkpoint(
                self.run_dir,
                self.model,
                self.adapter_name,
                self.optimizer,
                self.scheduler,
                self.scaler,
                state,
                self.keep,
                self.hooks,
                rank_rngs=rank_rngs,
                sharded=shards,
            )

        on_main(save, dist)
        return checkpoint_dir(self.run_dir, state["step"])

    def read(self, checkpoint: Path) -> dict[str, Any]:
        """Restore everything listed above from ``checkpoint`` (this rank's RNG stream); the loop's saved state."""
        self.replicas.load_shards(checkpoint, self.model, self.optimizer)
        return load_checkpoint(
            checkpoint,
            self.model,
            self.adapter_name,
            self.optimizer,
            self.scheduler,
            self.scaler,
            self.hooks,
            rank=self.replicas.dist.rank,
            sharded=self.replicas.sharded,
        )


def rebase_lr(optimizer: torch.optim.Optimizer, scheduler: Any, lr: float) -> None:
    """A resume with another train.lr: the restored schedule continues at the same point, scaled
    to the new peak lr (the optimizer / scheduler state otherwise restores the old one)."""
    if all(base == lr for base in scheduler.base_lrs):
        return
    scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    for group, multiplier in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * multiplier(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
