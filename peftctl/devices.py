"""Which torch device a command runs on."""

from __future__ import annotations

import torch

from peftctl.errors import ConfigError


def pick_device(requested: str) -> torch.device:
    """``train.device``: auto (the GPU when one is visible), cpu, cuda or an explicit device."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA GPU is visible; use train.device=cpu or auto")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)
