"""Early stopping and the best eval step (`train.early_stopping_*`, `train.save_best`)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class BestTracker:
    """Follows an eval metric: lower is better (eval_loss), or higher with ``higher_is_better``
    (an eval.metrics task metric such as eval_exact_match).

    ``patience``: stop after that many evals in a row without an improvement of more than
    ``min_delta`` on the best value so far (0: never stop)."""

    patience: int = 0
    min_delta: float = 0.0
    higher_is_better: bool = False
    best_value: float = math.nan
    best_step: int | None = None
    evals_without_improvement: int = 0
    last_value: float = math.nan

    def _improves(self, value: float) -> bool:
        if self.best_step is None:
            return not math.isnan(value)
        if self.higher_is_better:
            return value > self.best_value + self.min_delta
        return value < self.best_value - self.min_delta

    def update(self, value: float, step: int) -> bool:
        """Record one eval; True when it is the new best."""
        self.last_value = value
        if self._improves(value):
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
