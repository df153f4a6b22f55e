"""Causal-LM loss without materialising the full fp32 logits (the loop's causal-LM loss).

For a 128k vocabulary and 2048 tokens the logits are 1 GiB in fp32 (plus as much again for their
gradient). Here the model runs with its output head swapped for an identity, so it returns hidden
states; the head and the cross-entropy then run over chunks of tokens, so at most one chunk of logits
is alive at a time. The sum is the same as ``cross_entropy(logits.float(), labels, reduction="sum")``.

Two ways to get the gradient of the hidden states:

* a frozen ``nn.Linear`` head (the usual PEFT case): each chunk's gradient is computed right away in
  the forward ("fused linear cross-entropy"): with p = softmax(logits), d loss / d logits = p - onehot(label)
  (0 on ignored rows), so d loss / d hidden = (p - onehot) @ W. Only that (tokens x hidden) gradient is
  kept; the backward scales it by the incoming gradient. The head's matmul runs once per step. Without
  a gradient (evaluation, a preference objective's reference pass) the same code computes the values,
  so the reference and the policy pass round alike (equal log-probs: DPO's first step is exactly ln 2).
* a trainable head (LoRA on lm_head, modules_to_save, a tied trainable embedding) or another kind of
  head: each chunk runs under activation checkpointing and is recomputed in the backward, so the head
  matmul runs twice.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from peftctl.data.packing import model_inputs
from peftctl.models.modules import find_hf_model

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 2**26  # logits per chunk: 64M fp32 = 256 MiB
FUSED_CROSS_ENTROPY = "peftctl_fused_cross_entropy"  # head attribute: the fast path's compiled chunks


def output_head(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """(the transformers model inside ``model``, its output head); None for what it lacks."""
    hf = find_hf_model(model)
    head = hf.get_output_embeddings() if hf is not None and hasattr(hf, "get_output_embeddings") else None
    return hf, head


@contextmanager
def head_as_identity(model: nn.Module) -> Iterator[nn.Module | None]:
    """Temporarily replace the output head by an identity; yields the head (None: not possible)."""
    hf, head = output_head(model)
    name = next((n for n, m in hf.named_children() if m is head), None) if head is not None else None
    if name is None or getattr(hf.config, "final_logit_softcapping", None) or getattr(hf.config, "logit_scale", None):
        yield None
        return
    setattr(hf, name, nn.Identity())
    try:
        yield head
    finally:
        setattr(hf, name, head)


def frozen_linear_head(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of a head that computes exactly ``F.linear(x, weight, bias)`` and takes no gradient;
    None for anything else (trainable, quantized, sharded, wrapped or hooked heads take the checkpointed path)."""
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward or "forward" in vars(head):
        return None
    if head._forward_hooks or head._forward_pre_hooks or getattr(head, "_hf_hook", None) is not None:
        return None
    weight, bias = head.weight, head.bias
    if any(p is not None and (type(p) is not nn.Parameter or p.requires_grad) for p in (weight, bias)):
        return None
    return weight, bias


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's where it is on, else the weight's (as nn.Linear)."""
    kind = hidden.device.type
    if kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return weight.dtype


def row_nll(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row CE of (rows x vocab) logits in fp32 (0 on ignored rows) and the rows' logsumexp."""
    logits = logits.float()  # as the plain path's logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    return (lse - logits.gather(1, target).squeeze(1)) * valid, lse


def logit_grad(
    logits: torch.Tensor, lse: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """d CE / d logits = softmax(logits) - onehot(target) on valid rows (0 on ignored rows), in ``dtype``.
    Written elementwise (the one-hot as a comparison with the column index), so that under torch.compile
    it is one pass over the logits."""
    columns = torch.arange(logits.size(1), device=logits.device)
    probs = (logits.float() - lse.unsqueeze(1)).exp()
    onehot = (columns.unsqueeze(0) == target).to(probs.dtype)
    return ((probs - onehot) * valid.unsqueeze(1)).to(dtype)


@functools.cache
def compiled_chunk_functions() -> tuple[Any, Any]:
    """row_nll and logit_grad under torch.compile (the fast path's cross-entropy, ``fused_cross_entropy``).

    Eager, each chunk of logits (rows x 128k) makes about ten fp32 passes over memory: upcast, logsumexp's
    max / subtract / exp / sum, gather, softmax in place, scatter, downcast (16 ms of a 134 ms Llama-1B
    step at 4 x 2048 tokens, benchmarks/RESULTS.md round 7). Compiled, the logsumexp is one reduction kernel
    and the gradient one elementwise kernel over the bf16 logits. The arithmetic is the same: fp32
    logsumexp, softmax minus one-hot in fp32, one rounding to the compute dtype."""
    return torch.compile(row_nll), torch.compile(logit_grad)


def _frozen_head_nll(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: int,
    with_grad: bool,
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row CE(hidden @ W.T + b, label) in fp32 (0 on ignored rows) and, ``with_grad``, its gradient with
    respect to ``hidden`` (in the head's compute dtype), chunk by chunk. The values do not depend on
    ``with_grad``: a preference objective's reference pass (no gradient) rounds exactly like its policy pass.
    ``compiled``: the per-chunk elementwise work through compiled_chunk_functions (the fast path)."""
    dtype = _compute_dtype(hidden, weight)
    weight = weight.to(dtype)  # cast once, not per chunk
    bias = bias.to(dtype) if bias is not None else None
    nll = torch.empty(hidden.size(0), dtype=torch.float32, device=hidden.device)
    grad = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if with_grad else None
    chunk_nll, chunk_grad = compiled_chunk_functions() if compiled else (None, None)
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, hidden.size(0), rows):
            h, y = hidden[start : start + rows].to(dtype), labels[start : start + rows]
            logits = F.linear(h, weight, bias)
            valid = y != IGNORE_INDEX
            target = torch.where(valid, y, 0).unsqueeze(1)
            if compiled:
                nll[start : start + rows], lse = chunk_nll(logits, target, valid)
                if grad is not None:
                    torch.matmul(chunk_grad(logits, lse, target, valid, dtype), weight, out=grad[start : start + rows])
                continue
            logits = logits.float()  # fp32, as the plain path's logits.float()
            lse = torch.logsumexp(logits, dim=-1)
            nll[start : start + rows] = (lse - logits.gather(1, target).squeeze(1)) * valid
            if grad is None:
                continue
            probs = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place of the logits
            probs.scatter_add_(1, target, -valid.unsqueeze(1).to(probs.dtype))  # p - onehot(label)
            rows_grad = grad[start : start + rows]
            torch.matmul(probs.to(dtype), weight, out=rows_grad)
            rows_grad.mul_(valid.unsqueeze(1))  # ignored rows: no gradient (zeroed here: hidden << vocab)
    return nll, grad


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """CE over a frozen linear head whose hidden-state gradient is computed in the forward (module docstring)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        rows: int,
        compiled: bool,
    ) -> torch.Tensor:
        nll, grad = _frozen_head_nll(hidden, labels, weight, bias, rows, with_grad=True, compiled=compiled)
        ctx.save_for_backward(grad)  # through saved-tensor hooks: offloaded under gradient_checkpointing=offload
        ctx.hidden_dtype = hidden.dtype
        return nll

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        (grad,) = ctx.saved_tensors  # d nll_i / d hidden_i, one row per token: scaled by each token's weight
        return (grad * grad_output.unsqueeze(1).to(grad.dtype)).to(ctx.hidden_dtype), None, None, None, None, None


def _frozen_head_loss(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, rows: int) -> torch.Tensor | None:
    """Per-token loss over a frozen linear head (with or without a gradient wanted); None for other heads."""
    frozen = frozen_linear_head(head)
    if frozen is None:
        return None
    compiled = getattr(head, FUSED_CROSS_ENTROPY, False)
    if torch.is_grad_enabled() and hidden.requires_grad:
        return _FrozenHeadCrossEntropy.apply(hidden, labels, *frozen, rows, compiled)
    nll, _ = _frozen_head_nll(hidden.detach(), labels, *frozen, rows, with_grad=False, compiled=compiled)
    return nll


def enable_fused_cross_entropy(model: nn.Module) -> bool:
    """Mark ``model``'s output head for the compiled per-chunk cross-entropy (set by the CUDA fast path);
    whether it has a head to mark."""
    _, head = output_head(model)
    if head is None:
        return False
    setattr(head, FUSED_CROSS_ENTROPY, True)
    return True


def _chunk_token_nll(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")


def chunked_token_nll(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, vocab_size: int) -> torch.Tensor:
    """Per-token CE(head(hidden), labels) over rows (0 where ignored), chunk by chunk (hidden: (N, H),
    labels: (N,)): the frozen-head path where it applies, else each chunk checkpointed."""
    rows = max(1, CHUNK_ELEMENTS // max(vocab_size, 1))
    frozen_head = _frozen_head_loss(hidden, labels, head, rows)
    if frozen_head is not None:
        return frozen_head
    parts = []
    for start in range(0, hidden.size(0), rows):
        h, y = hidden[start : start + rows], labels[start : start + rows]
        if torch.is_grad_enabled() and hidden.requires_grad:
            parts.append(checkpoint(_chunk_token_nll, h, y, head, use_reentrant=False))
        else:
            parts.append(_chunk_token_nll(h, y, head))
    return torch.cat(parts)


def chunked_lm_loss_sum(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, vocab_size: int) -> torch.Tensor:
    """Σ CE(head(hidden), labels) over rows: the per-token values of chunked_token_nll, summed."""
    return chunked_token_nll(hidden, labels, head, vocab_size).sum()


def causal_lm_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy over label tokens, and their count: a 0-dim int64 tensor on the
    labels' device, not read back (on CUDA ``int()`` would wait for the GPU every micro-step; the training
    loop takes its token counts from the host-side batch, evaluation calls ``int()``)."""
    labels = batch["labels"]
    shift_labels = labels[:, 1:]
    count = (shift_labels != IGNORE_INDEX).sum()
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
