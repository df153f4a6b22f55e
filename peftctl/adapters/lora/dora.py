"""DoRA (Liu et al., 2024): weight-decomposed LoRA, the LoraVariant a layer uses when ``use_dora=True``.

    W' = m · (W + s·BA) / ‖W + s·BA‖        (paper eq. 5; the norm per output channel, i.e. per
                                             column of the paper's (in, out) weight)

The norm is treated as a constant in the backward pass (paper section 4.3, "we detach ‖V + ΔV‖"),
so the forward can be written without materialising W':

    y = base(x) + (m/‖·‖ − 1) · (W x) + (m/‖·‖) · s · B(A(x))

The norm is not formed from W + s·BA either (an out × in temporary, per projection, every forward and
again in a checkpointed recompute). For row i of W (out × K, K = in, or in·kernel for convolutions):

    ‖W_i + s(BA)_i‖² = ‖W_i‖² + 2s · Σ_k B_ik (W Aᵀ)_ik + s² · B_i (A Aᵀ) B_iᵀ

‖W_i‖² is a constant of the frozen base, kept per layer (DoraNormCache); W Aᵀ (out × r) reads W once, in
the weight's own dtype (fp32 accumulation; measured against the fp32 formula: < 3e-5 relative for bf16
weights with ‖s·BA‖ up to 0.2‖W‖, < 3e-7 for fp32 weights), A Aᵀ is r × r; the rest is fp32. With
dropout > 0 in training, W x is recomputed on the dropped-out input (an extra matmul, as PEFT does).
In eval the whole norm is cached and recomputed only when W, A or B change (tensor version counters);
in training, and inside torch.compile, it is recomputed every forward (no Python bookkeeping in a graph).
Embeddings (table stored (vocab, dim), handled as fan_in_fan_out) have no bias and no dropout:
y = m/‖·‖ · (E[x] + s·B(A(x))), with the norm per embedding dimension (PEFT's DoraEmbeddingLayer).
Merging materialises W + s·BA anyway and uses the direct formula (``weight_norm``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from peftctl.adapters.lora.variant import LoraVariant

if TYPE_CHECKING:
    from peftctl.adapters.lora.layer import LoraLayer


def weight_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """‖W + ΔW‖ per output channel, for W in (out, in, ...) layout, formed directly (merge only);
    shape (out,), fp32, no grad."""
    with torch.no_grad():
        combined = weight.float() + delta.float()
        return combined.flatten(1).norm(p=2, dim=1)


def squared_row_norms(weight: torch.Tensor) -> torch.Tensor:
    """‖W_i‖² per output channel of W in (out, ...) layout (also a transposed view), fp32, no grad."""
    with torch.no_grad():
        return torch.linalg.vector_norm(weight.detach().flatten(1), dim=1, dtype=torch.float32).square()


def lowrank_weight_norm(
    weight: torch.Tensor, weight_sq: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float
) -> torch.Tensor:
    """‖W_i + s·(BA)_i‖ per row i of W (out × K; a transposed view is read in place), A (r × K),
    B (out × r), ‖W_i‖² given: no out × K tensor is formed (module docstring). (out,), fp32, no grad."""
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        weight, a, b = weight.detach().flatten(1), a.detach(), b.detach()
        wa = (weight @ a.to(weight.dtype).T).float()  # (out, r): the one pass over W
        a32, b32 = a.float(), b.float()
        cross = (b32 * wa).sum(dim=1)
        quadratic = ((b32 @ (a32 @ a32.T)) * b32).sum(dim=1)
        squared = weight_sq + (2 * scale) * cross + (scale * scale) * quadratic
        return squared.clamp_min(0).sqrt()  # rounding may take a vanishing norm just below 0


def tensor_key(tensor: torch.Tensor) -> tuple:
    """What identifies a tensor's current values without reading them: storage, in-place updates, dtype."""
    return (tensor.data_ptr(), tensor._version, tensor.dtype, tensor.device, tuple(tensor.shape))


def magnitude_layout(norm: torch.Tensor, weight_dim: int) -> torch.Tensor:
    """PEFT's shape of lora_magnitude_vector: (out,) for Linear, (1, out, 1, ...) for convolutions,
    which is also the shape that broadcasts against the layer's output."""
    if weight_dim == 2:
        return norm.clone()
    return norm.reshape((1, -1) + (1,) * (weight_dim - 2)).clone()


class DoraNormCache:
    """Per layer: ‖W_i‖² of the frozen base weight (while the weight is unchanged), and ‖W + ΔW‖ per
    adapter while the layer is in eval mode.

    The checks below read data pointers and version counters: Python bookkeeping that must not run
    inside a torch.compile graph. Inside one, ‖W_i‖² is the tensor filled eagerly beforehand
    (``LoraLayer.prime_dora_cache``, which the fast path calls before compiling, and
    ``on_weights_changed`` after merge, unmerge, loading: writes through .data that the version counters
    miss) and the full norm is always recomputed."""

    def __init__(self) -> None:
        self.weight_sq: torch.Tensor | None = None
        self.weight_key: tuple | None = None
        self.store: dict[str, tuple[tuple, torch.Tensor]] = {}

    def clear(self) -> None:
        self.weight_sq, self.weight_key = None, None
        self.store.clear()

    def squared_weight_norms(self, layer: "LoraLayer", weight: torch.Tensor | None = None) -> torch.Tensor:
        """‖W_i‖² of the layer's base weight (``weight``: that weight as dora_weight gives it, if at hand)."""
        if torch.compiler.is_compiling():
            if self.weight_sq is not None:
                return self.weight_sq
            return squared_row_norms(weight if weight is not None else layer.dora_weight())
        key = tensor_key(layer.weight)
        if self.weight_sq is None or self.weight_key != key:
            self.weight_sq = squared_row_norms(weight if weight is not None else layer.dora_weight())
            self.weight_key = key
        return self.weight_sq

    def norm(self, layer: "LoraLayer", adapter_name: str, weight: torch.Tensor | None = None) -> torch.Tensor:
        """‖W + ΔW‖ for one adapter: recomputed in training (and in compiled code), cached in eval."""
        if layer.training or torch.compiler.is_compiling():
            return dora_norm(layer, adapter_name, weight)
        key = tuple(tensor_key(t) for t in [layer.weight, *layer.adapter_parameters(adapter_name)])
        hit = self.store.get(adapter_name)
        if hit is not None and hit[0] == key:
            return hit[1]
        value = dora_norm(layer, adapter_name, weight)
        self.store[adapter_name] = (key, value)
        return value


def dora_norm(layer: "LoraLayer", adapter_name: str, weight: torch.Tensor | None = None) -> torch.Tensor:
    """‖W + s·BA‖ per output channel of one adapter, (out,) fp32, without an out × in temporary
    (``weight``: the layer's dora_weight(), when the caller has it already)."""
    weight = weight if weight is not None else layer.dora_weight()
    weight_sq = layer.dora_norm_cache.squared_weight_norms(layer, weight)
    a, b = layer.dora_factors(adapter_name)
    return lowrank_weight_norm(weight, weight_sq, a, b, layer.scaling[adapter_name])


def dora_output(layer: "LoraLayer", x: torch.Tensor, result: torch.Tensor, adapter_name: str) -> torch.Tensor:
    """The layer output with one DoRA adapter applied to ``result`` (the base output)."""
    magnitude = layer.lora_magnitude_vector[adapter_name]
    dropout = layer.lora_dropout[adapter_name]
    # dropout changes x, so W x must be recomputed on the dropped-out input (W: dequantized once here)
    recompute_base = layer.training and not isinstance(dropout, nn.Identity)
    weight = layer.dora_weight() if recompute_base else None
    norm = layer.dora_norm_cache.norm(layer, adapter_name, weight).reshape(magnitude.shape)
    # m/‖·‖ − 1 is formed in fp32 and only then cast: m/‖·‖ itself is ≈ 1, where bf16's spacing
    # (2^-7) would round away the magnitude's updates (and with them DoRA's effect in bf16 training)
    scale_minus_one = (magnitude.float() / norm.float() - 1).to(x.dtype)
    x_dropped = dropout(x)
    lora = layer.lora_path(x_dropped, adapter_name) * layer.scaling[adapter_name]
    if weight is not None:
        base = layer.base_no_bias(x_dropped, weight)
    else:
        bias = getattr(layer.base_layer, "bias", None)
        base = result if bias is None else result - bias.reshape(magnitude.shape if magnitude.dim() > 1 else (-1,))
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
        magnitude = dora_norm(layer, adapter_name)
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
