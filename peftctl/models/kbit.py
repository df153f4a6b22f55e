"""k-bit training preparation (QLoRA): norms in fp32, input grads for gradient checkpointing."""
from __future__ import annotations

import torch
from torch import nn


def prepare_model_for_kbit_training(model: nn.Module, gradient_checkpointing: bool = True) -> nn.Module:
    """Freeze the base, keep non-quantized small params (norms) in fp32, enable input grads so
    gradient checkpointing reaches the adapters through frozen embeddings."""
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if "Norm" in type(module).__name__:
            for param in module.parameters(recurse=False):
                param.data = param.data.to(torch.float32)
    if gradient_checkpointing:
        model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model
