"""Scoring of each non-causal task type for `peftctl eval` (the causal LM's is in evaluate.py). The
metric functions live in train/task_metrics.py (the training loop logs them too) and are re-exported."""

from __future__ import annotations

import math
from typing import Any

import torch

from peftctl.config.schema import RunConfig
from peftctl.data.tokenize import Example
from peftctl.train.loop import evaluate_loss
from peftctl.train.task_metrics import (
    accuracy,
    classification_scores,
    entities,
    entity_f1,
    exact_match,
    macro_f1,
    task_metric_values,
    token_classification_scores,
)

__all__ = [
    "accuracy",
    "classification_scores",
    "entities",
    "entity_f1",
    "exact_match",
    "macro_f1",
    "task_scores",
    "token_classification_scores",
]


def task_scores(
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    cfg: RunConfig,
    device: torch.device,
    label_names: list[str] | None,
) -> dict[str, float]:
    """Loss plus the task's metric for seq2seq / classification / token classification."""
    task = cfg.model.task_type
    loss = evaluate_loss(model, examples, cfg.eval.batch_size, tokenizer.pad_token_id, device, task_type=task)
    scores = {"eval_loss": loss}
    if task == "seq2seq_lm":
        scores["perplexity"] = math.exp(min(loss, 50.0))
    scores.update(task_metric_values(model, tokenizer, examples, cfg, device, label_names))
    return scores
