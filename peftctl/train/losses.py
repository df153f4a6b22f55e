"""Per-task training losses: (sum over label positions, number of label positions).

Returning a sum and a count lets the loop take a token- (or example-) weighted mean over a whole
accumulated batch. Prompt-family methods return logits for their virtual tokens too; those extra
leading positions are dropped so that logits line up with the labels.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from peftctl.data.tokenize import IGNORE_INDEX
from peftctl.models.modules import no_cache_kwargs
from peftctl.train.chunked_ce import causal_lm_loss_sum  # chunked over the vocabulary

# (loss sum, count); the causal-LM count is a device tensor (no host sync): int() it where a number is needed
LossFn = Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, int | torch.Tensor]]


def scoring_inputs(model: Any, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The forward arguments of a padded batch for a forward that only scores (loss, metrics): ids and mask, and
    no key/value cache where the model would build one (models.modules.no_cache_kwargs)."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], **no_cache_kwargs(model)}


def _last(logits: torch.Tensor, length: int) -> torch.Tensor:
    """The last ``length`` positions (drops prepended virtual tokens, if any)."""
    return logits[:, -length:] if logits.shape[1] != length else logits


def seq2seq_loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Cross-entropy of the decoder's predictions of the target tokens (teacher forcing from labels)."""
    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).logits.float()
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, int((labels != IGNORE_INDEX).sum())


def seq_cls_loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Cross-entropy of the class logits (one label per example)."""
    labels = batch["labels"][:, 0]
    logits = model(**scoring_inputs(model, batch)).logits.float()
    return F.cross_entropy(logits, labels, reduction="sum"), int(labels.numel())


def token_cls_loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Cross-entropy of the tag logits on labelled sub-words (first sub-word of each word)."""
    labels = batch["labels"]
    logits = _last(model(**scoring_inputs(model, batch)).logits, labels.shape[1]).float()
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, int((labels != IGNORE_INDEX).sum())


TASK_LOSSES: dict[str, LossFn] = {
    "causal_lm": causal_lm_loss_sum,
    "seq2seq_lm": seq2seq_loss_sum,
    "seq_cls": seq_cls_loss_sum,
    "token_cls": token_cls_loss_sum,
}


def loss_fn(task_type: str) -> LossFn:
    return TASK_LOSSES[task_type]


def label_count(labels: list[int], task_type: str) -> int:
    """How many positions of one example's labels the loss counts (causal LM: shifted by one)."""
    if task_type == "seq_cls":
        return 1
    counted = labels[1:] if task_type == "causal_lm" else labels
    return sum(1 for label in counted if label != IGNORE_INDEX)
