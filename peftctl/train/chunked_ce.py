"""Causal-LM loss without materialising the full fp32 logits (the loop's causal-LM loss).

For a 128k vocabulary and 2048 tokens the logits are 1 GiB in fp32 (plus as much again for their
gradient). Here the model runs with its output head swapped for an identity, so it returns hidden
states; the head and the cross-entropy then run over chunks of tokens, each chunk recomputed in the
backward pass (activation checkpointing), so at most one chunk of logits is alive at a time.
The sum is the same as ``cross_entropy(logits.float(), labels, reduction="sum")``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from peftctl.data.packing import model_inputs
from peftctl.models.modules import find_hf_model

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 2**26  # logits per chunk: 64M fp32 = 256 MiB


@contextmanager
def head_as_identity(model: nn.Module) -> Iterator[nn.Module | None]:
    """Temporarily replace the output head by an identity; yields the head (None: not possible)."""
    hf = find_hf_model(model)
    head = hf.get_output_embeddings() if hf is not None and hasattr(hf, "get_output_embeddings") else None
    name = next((n for n, m in hf.named_children() if m is head), None) if head is not None else None
    if name is None or getattr(hf.config, "final_logit_softcapping", None) or getattr(hf.config, "logit_scale", None):
        yield None
        return
    setattr(hf, name, nn.Identity())
    try:
        yield head
    finally:
        setattr(hf, name, head)


def _chunk_loss(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_lm_loss_sum(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, vocab_size: int) -> torch.Tensor:
    """Σ CE(head(hidden), labels) over rows, computed chunk by chunk (hidden: (N, H), labels: (N,))."""
    rows = max(1, CHUNK_ELEMENTS // max(vocab_size, 1))
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.size(0), rows):
        h, y = hidden[start : start + rows], labels[start : start + rows]
        if torch.is_grad_enabled() and hidden.requires_grad:
            total = total + checkpoint(_chunk_loss, h, y, head, use_reentrant=False)
        else:
            total = total + _chunk_loss(h, y, head)
    return total


def _chunk_token_nll(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")


def chunked_token_nll(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, vocab_size: int) -> torch.Tensor:
    """Per-token CE(head(hidden), labels) (0 where ignored), chunk by chunk as chunked_lm_loss_sum."""
    rows = max(1, CHUNK_ELEMENTS // max(vocab_size, 1))
    parts = []
    for start in range(0, hidden.size(0), rows):
        h, y = hidden[start : start + rows], labels[start : start + rows]
        if torch.is_grad_enabled() and hidden.requires_grad:
            parts.append(checkpoint(_chunk_token_nll, h, y, head, use_reentrant=False))
        else:
            parts.append(_chunk_token_nll(h, y, head))
    return torch.cat(parts)


def causal_lm_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over label tokens, and their count."""
    labels = batch["labels"]
    shift_labels = labels[:, 1:]
    count = int((shift_labels != IGNORE_INDEX).sum())
    with head_as_identity(model) as head:
        output = model(**model_inputs(batch)).logits  # packed rows: position_ids instead of the mask
        output = output[:, -labels.shape[1] :]  # prompt-family methods prepend virtual-token positions
        if head is not None and output.size(-1) == getattr(head, "in_features", -1):
            hidden = output[:, :-1, :].reshape(-1, output.size(-1))
            return chunked_lm_loss_sum(hidden, shift_labels.reshape(-1), head, head.out_features), count
    logits = output if head is None else head(output)
    shift_logits = logits[:, :-1, :].float()
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, count
