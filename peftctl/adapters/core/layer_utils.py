"""Facts about base layer types that several methods need."""

from __future__ import annotations

from torch import nn


def is_gpt2_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 `Conv1D`: a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_in_out(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of nn.Linear or GPT-2's Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_gpt2_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    raise TypeError(type(module).__name__)
