"""Early stopping and the best eval step (`train.early_stopping_*`, `train.save_best`)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class BestTracker:
    """Follows an eval metric where lower is better (eval_loss).

    ``patience``: stop after that many evals in a row without an improvement of more than
    ``min_delta`` on the best value so far (0: never stop)."""

    patience: int = 0
    min_delta: float = 0.0
    best_value: float = math.inf
    best_step: int | None = None
    evals_without_improvement: int = 0
    last_value: float = math.nan

    def update(self, value: float, step: int) -> bool:
        """Record one eval; True when it is the new best."""
        self.last_value = value
        if value < self.best_value - self.min_delta:
            self.best_value, self.best_step, self.evals_without_improvement = value, step, 0
            return True
        self.evals_without_improvement += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.evals_without_improvement >= self.patience

    def stop_message(self, metric: str, step: int) -> str:
        return (
            f"early stopping at step {step}: {metric} did not improve by more than {self.min_delta:g} "
            f"for {self.patience} evals "
            f"(best {self.best_value:.4f} at step {self.best_step})"
        )
