"""k-bit training preparation (QLoRA, Dettmers et al., 2023).

* the base is frozen;
* norms go to fp32 only where the compute dtype is fp16: Llama-style RMSNorm already computes its
  statistics in fp32 internally, and a fp32 norm weight under bf16 would turn the whole residual
  stream into fp32 (every bnb layer returns its input's dtype), doubling activation memory and
  adding a cast per layer for nothing;
* with gradient checkpointing, the embedding output requires grad so that the checkpointed blocks
  (whose own parameters are all frozen apart from the adapters) still get a backward;
* ``cast_adapters`` (after the adapters exist) puts adapter weights in a given dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from peftctl.models.compat import enable_activation_checkpointing
from peftctl.models.modules import input_embeddings_require_grad
from peftctl.models.quantized import compute_dtype, is_quantized


def _compute_dtype(model: nn.Module) -> torch.dtype | None:
    for module in model.modules():
        if is_quantized(module):
            return compute_dtype(module)
    return None


def prepare_model_for_kbit_training(
    model: nn.Module, gradient_checkpointing: bool = True, upcast_norms: bool | None = None
) -> nn.Module:
    """Freeze the base, upcast norms where needed (default: when computing in fp16), enable input
    grads and non-reentrant gradient checkpointing."""
    for param in model.parameters():
        param.requires_grad_(False)
    if upcast_norms is None:
        upcast_norms = _compute_dtype(model) == torch.float16
    if upcast_norms:
        for module in model.modules():
            if "Norm" in type(module).__name__:
                for param in module.parameters(recurse=False):
                    param.data = param.data.to(torch.float32)
    if gradient_checkpointing:
        enable_activation_checkpointing(model)
        input_embeddings_require_grad(model)  # a reentrant checkpoint needs its input to require a gradient
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False
    return model


def cast_adapters(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast every trainable parameter (the adapters) to ``dtype``; returns how many were cast."""
    count = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)
            count += 1
    return count
