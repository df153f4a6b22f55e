"""What the loop reports about a step: its metrics.jsonl row and the one-line eval summary."""

from __future__ import annotations

import time
from typing import Any

import torch


class ThroughputWindow:
    """Tokens per second since the last logged step (the window restarts at each logged row)."""

    def __init__(self, tokens: int) -> None:
        self.restart(tokens)

    def restart(self, tokens: int) -> None:
        self.started, self.tokens = time.perf_counter(), tokens

    def tokens_per_s(self, tokens: int) -> float:
        return (tokens - self.tokens) / max(time.perf_counter() - self.started, 1e-9)


def step_record(
    step: int,
    epoch: float,
    loss: float,
    lr: float,
    grad_norm: float,
    tokens_per_s: float,
    step_metrics: dict[str, float],
    device: torch.device,
) -> dict[str, Any]:
    """A training row of metrics.jsonl (+ a preference objective's metrics, + peak GPU memory on CUDA)."""
    record = {
        "step": step,
        "epoch": round(epoch, 4),
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": tokens_per_s,
    }
    record.update(step_metrics)
    if device.type == "cuda":
        record["memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return record


def eval_summary(evaluation: dict[str, float]) -> str:
    """`eval_loss 0.1234  eval_exact_match 0.9000` (loss and task metrics; not the rewards/* detail)."""
    shown = [k for k in evaluation if k == "eval_loss" or not k.startswith(("eval_rewards", "eval_logps"))]
    return "  ".join(f"{key} {evaluation[key]:.4f}" for key in shown)
