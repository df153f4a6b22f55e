"""DoRA (Liu et al., 2024): weight-decomposed LoRA, the LoraVariant a layer uses when ``use_dora=True``.

    W' = m · (W + s·BA) / ‖W + s·BA‖        (paper eq. 5; the norm per output channel, i.e. per
                                             column of the paper's (in, out) weight)

The norm is treated as a constant in the backward pass (paper section 4.3, "we detach ‖V + ΔV‖"),
so the forward can be written without materialising W':

    y = base(x) + (m/‖·‖ − 1) · (W x) + (m/‖·‖) · s · B(A(x))

ΔW = s·BA is materialised once per forward, without grad, only for the norm; in eval the norm is
cached and recomputed only when W, A or B change (tensor version counters).
Embeddings (table stored (vocab, dim), handled as fan_in_fan_out) have no bias and no dropout:
y = m/‖·‖ · (E[x] + s·B(A(x))), with the norm per embedding dimension (PEFT's DoraEmbeddingLayer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from peftctl.adapters.lora.variant import LoraVariant

if TYPE_CHECKING:
    from peftctl.adapters.lora.layer import LoraLayer


def weight_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """‖W + ΔW‖ per output channel, for W in (out, in, ...) layout; shape (out,), fp32, no grad."""
    with torch.no_grad():
        combined = weight.float() + delta.float()
        return combined.flatten(1).norm(p=2, dim=1)


def magnitude_layout(norm: torch.Tensor, weight_dim: int) -> torch.Tensor:
    """PEFT's shape of lora_magnitude_vector: (out,) for Linear, (1, out, 1, ...) for convolutions,
    which is also the shape that broadcasts against the layer's output."""
    if weight_dim == 2:
        return norm.clone()
    return norm.reshape((1, -1) + (1,) * (weight_dim - 2)).clone()


class DoraNormCache:
    """Caches ‖W + ΔW‖ per adapter while the layer is in eval mode."""

    def __init__(self) -> None:
        self.store: dict[str, tuple[tuple, torch.Tensor]] = {}

    def norm(self, layer: "LoraLayer", adapter_name: str) -> torch.Tensor:
        tensors = [layer.weight] + [p for p in layer.adapter_parameters(adapter_name)]
        key = tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)
        hit = self.store.get(adapter_name)
        if hit is not None and hit[0] == key and not layer.training:
            return hit[1]
        value = weight_norm(layer.oriented_weight(), layer.lora_delta(adapter_name))
        if layer.training:
            self.store.pop(adapter_name, None)
        else:
            self.store[adapter_name] = (key, value)
        return value


def dora_output(layer: "LoraLayer", x: torch.Tensor, result: torch.Tensor, adapter_name: str) -> torch.Tensor:
    """The layer output with one DoRA adapter applied to ``result`` (the base output)."""
    magnitude = layer.lora_magnitude_vector[adapter_name]
    norm = layer.dora_norm_cache.norm(layer, adapter_name).reshape(magnitude.shape)
    # m/‖·‖ − 1 is formed in fp32 and only then cast: m/‖·‖ itself is ≈ 1, where bf16's spacing
    # (2^-7) would round away the magnitude's updates (and with them DoRA's effect in bf16 training)
    scale_minus_one = (magnitude.float() / norm.float() - 1).to(x.dtype)
    dropout = layer.lora_dropout[adapter_name]
    x_dropped = dropout(x)
    lora = layer.lora_path(x_dropped, adapter_name) * layer.scaling[adapter_name]
    if isinstance(dropout, nn.Identity) or not layer.training:
        bias = getattr(layer.base_layer, "bias", None)
        base = result if bias is None else result - bias.reshape(magnitude.shape if magnitude.dim() > 1 else (-1,))
    else:
        # dropout changes x, so W x must be recomputed on the dropped-out input
        base = layer.base_no_bias(x_dropped)
    # (m/‖·‖ − 1)·Wx + (m/‖·‖)·lora, written so that no factor near 1 is rounded
    update = scale_minus_one * (base.to(x.dtype) + lora) + lora
    return result + update.to(result.dtype)


def dora_embedding_output(layer: "LoraLayer", x: torch.Tensor, result: torch.Tensor, adapter_name: str) -> torch.Tensor:
    """DoRA on an embedding (PEFT's DoraEmbeddingLayer): no bias, no dropout on ids, so
    y = m/‖E + ΔE‖ · (result + s·B(A(x))) with the norm per embedding dimension. ``result`` is the
    running output, so earlier active adapters are rescaled too (as PEFT, and as merging them)."""
    magnitude = layer.lora_magnitude_vector[adapter_name]
    norm = layer.dora_norm_cache.norm(layer, adapter_name)
    mag_scale = magnitude / norm.to(magnitude.dtype)
    lora = layer.lora_path(x, adapter_name) * layer.scaling[adapter_name]
    return (mag_scale * (result.to(mag_scale.dtype) + lora.to(mag_scale.dtype))).to(result.dtype)


def _factor(layer: "LoraLayer", adapter_name: str, norm: torch.Tensor, weight_dim: int) -> torch.Tensor:
    magnitude = layer.lora_magnitude_vector[adapter_name].detach().float().reshape(-1)
    return (magnitude / norm).reshape((-1,) + (1,) * (weight_dim - 1))


def _unmerged_base(layer: "LoraLayer", weight: torch.Tensor) -> torch.Tensor:
    """The base weight before the adapters already merged into ``weight`` (in (out, in) layout)."""
    for name in reversed(layer.merged_adapters):
        if name in layer.lora_magnitude_vector:
            weight = (
                weight.float() / _factor(layer, name, layer.dora_merge_norm[name], weight.dim())
                - layer.lora_delta(name).detach()
            )
        else:
            weight = weight.float() - layer.lora_delta(name).detach()
    return weight


def merged_weight(layer: "LoraLayer", weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
    """m/‖W+ΔW‖ · (W_cur + ΔW) for weights in (out, in, ...) layout; keeps the norm for an exact
    unmerge. W is the unmerged base weight, W_cur the weight with earlier adapters merged: the
    same as the forward, where the norm uses the base weight and the directional part the running
    output of the adapters applied before (PEFT's forward for several active adapters)."""
    delta = layer.lora_delta(adapter_name).detach()
    norm = weight_norm(_unmerged_base(layer, weight), delta)
    layer.dora_merge_norm[adapter_name] = norm
    return _factor(layer, adapter_name, norm, weight.dim()) * (weight.float() + delta)


def unmerged_weight(layer: "LoraLayer", weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
    """Inverse of merged_weight: W = W' · ‖W+ΔW‖/m − ΔW, with the norm kept at merge time."""
    delta = layer.lora_delta(adapter_name).detach()
    norm = layer.dora_merge_norm[adapter_name]
    return weight.float() / _factor(layer, adapter_name, norm, weight.dim()) - delta


class DoraVariant(LoraVariant):
    """DoRA on Linear / Conv1D / convolutions: the magnitude starts at ‖W + s·BA‖ (so the output is
    unchanged at init); forward and merge as above."""

    def init(self, layer: LoraLayer, adapter_name: str) -> None:
        magnitude = weight_norm(layer.oriented_weight(), layer.lora_delta(adapter_name))
        layer.lora_magnitude_vector[adapter_name] = nn.Parameter(magnitude_layout(magnitude, layer.weight.dim()))

    def forward(self, layer: LoraLayer, x: torch.Tensor, result: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return dora_output(layer, x, result, adapter_name)

    def merged_weight(self, layer: LoraLayer, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return merged_weight(layer, weight, adapter_name)

    def unmerged_weight(self, layer: LoraLayer, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return unmerged_weight(layer, weight, adapter_name)


class DoraEmbeddingVariant(DoraVariant):
    """DoRA on an embedding: no bias, no dropout on token ids (PEFT's DoraEmbeddingLayer)."""

    def forward(self, layer: LoraLayer, x: torch.Tensor, result: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return dora_embedding_output(layer, x, result, adapter_name)


DORA = DoraVariant()
DORA_EMBEDDING = DoraEmbeddingVariant()
