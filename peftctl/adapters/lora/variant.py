"""LoraVariant: how a LoRA variant changes one adapter of a LoRA layer (the way peft's LoraVariant
states it). Plain LoRA has no variant; DoRA (dora.py) is one. A layer holds one variant object per
adapter in ``layer.lora_variant`` and calls it instead of branching on the variant's options."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from peftctl.adapters.lora.layer import LoraLayer


class LoraVariant:
    def init(self, layer: LoraLayer, adapter_name: str) -> None:
        """Create the variant's own parameters, after A and B are initialised."""
        raise NotImplementedError  # pragma: no cover - abstract

    def forward(self, layer: LoraLayer, x: torch.Tensor, result: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The layer output with this adapter applied to ``result`` (the output so far)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def merged_weight(self, layer: LoraLayer, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The weight (in (out, in, ...) layout) with this adapter merged in."""
        raise NotImplementedError  # pragma: no cover - abstract

    def unmerged_weight(self, layer: LoraLayer, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """Inverse of merged_weight."""
        raise NotImplementedError  # pragma: no cover - abstract
