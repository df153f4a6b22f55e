"""NF4 base projections (QLoRA) written in torch ops, so that torch.compile sees through them.

bitsandbytes runs each 4-bit projection of a training step as opaque custom ops: ``gemm_4bit`` in the
forward (dequantize the 8-bit block scales, dequantize the weight, F.linear) and ``dequantize_4bit`` +
matmul in the backward. Every call goes through bitsandbytes' Python dispatch, tens of microseconds of
host time each (a profiled 8B QLoRA step: 142 µs per ``gemm_4bit``), 7 projections x 32 layers x
(forward, recompute, backward) per step, while the GPU idled a quarter of the step
(benchmarks/RESULTS.md, round 5 profile). On the fast path (``train.kernels=auto|fused``) the nf4
``Linear4bit`` layers inside the compiled decoder layers dequantize with the same arithmetic in torch
ops instead: Inductor turns each weight's dequantization into one fused kernel launched from the
compiled graph, next to the matmul.

Dequantization (Dettmers et al., 2023, "QLoRA", §3: 4-bit NormalFloat with double quantization):
    s_b = code2[c_b] · t_⌊b/256⌋ + offset     block scale b (one per 64 weights), itself stored as an 8-bit
                                               code c_b with one fp32 scale t per 256 blocks (nested only)
    W_i = round(nf4[q_i] · s_⌊i/64⌋)           element i of the row-major (out, in) weight, fp32 product
                                               rounded once to the compute dtype
q_i is a 4-bit code, two per byte, the even element in the high nibble. These are bitsandbytes' own
operations in its own order, so W is bit-for-bit its ``dequantize_4bit`` and the projection's forward
is its ``gemm_4bit`` wherever that dequantizes and calls F.linear: above 1536 tokens per call on CUDA (a
training step's 2k+ tokens); shorter calls keep bitsandbytes' own forward (``fast_class``).
tests/unit/test_nf4.py and tests/gpu/test_nf4_gpu.py check both.

The backward dequantizes again rather than keeping W (as bitsandbytes does): autograd keeps only the
packed 4-bit weight, which the model holds anyway.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

BLOCK_SCALES_PER_SCALE = 256  # bitsandbytes' blocksize for the nested (8-bit) block scales


def block_scales(
    absmax: torch.Tensor,
    absmax_code: torch.Tensor | None,
    absmax_scale: torch.Tensor | None,
    offset: torch.Tensor | None,
) -> torch.Tensor:
    """s_b, the fp32 scale of each block of weights: ``absmax`` as stored, or decoded from its 8-bit codes."""
    if absmax_code is None:
        return absmax.float()
    blocks = torch.arange(absmax.numel(), device=absmax.device) // BLOCK_SCALES_PER_SCALE
    return absmax_code[absmax.long()] * absmax_scale[blocks] + offset


def dequantize_nf4(
    packed: torch.Tensor,
    scales: torch.Tensor,
    code: torch.Tensor,
    shape: tuple[int, int],
    blocksize: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """W (``shape``, ``dtype``) from its packed 4-bit codes, fp32 block scales and the 16-value code table."""
    n = shape[0] * shape[1]
    data = packed.reshape(-1).view(torch.uint8)  # storage may be another dtype (quant_storage), bytes are bytes
    codes = torch.stack((data >> 4, data & 0x0F), dim=-1).reshape(-1)[:n]
    blocks = torch.arange(n, device=packed.device) // blocksize
    return (code[codes.long()] * scales[blocks]).to(dtype).view(shape)


# The tensors of a bitsandbytes 4-bit weight that dequantization reads, in this order: the packed codes, the
# block scales (fp32, or 8-bit codes when nested), the nested scales' code table, their fp32 scales and
# offset (these three None when not nested), and the 16-value nf4 code table.
QuantTensors = tuple[torch.Tensor | None, ...]


def quant_tensors(weight: torch.Tensor) -> QuantTensors:
    """The dequantization inputs of a bitsandbytes nf4 ``Params4bit`` (QuantTensors' order)."""
    state = weight.quant_state
    nested = state.nested
    return (
        weight.data,
        state.absmax,
        state.state2.code if nested else None,
        state.state2.absmax if nested else None,
        state.offset if nested else None,
        state.code,
    )


def dequantize_weight(tensors: QuantTensors, layout: tuple[int, int, int], dtype: torch.dtype) -> torch.Tensor:
    """W from quant_tensors(...) and (out_features, in_features, blocksize)."""
    packed, absmax, absmax_code, absmax_scale, offset, code = tensors
    out_features, in_features, blocksize = layout
    scales = block_scales(absmax, absmax_code, absmax_scale, offset)
    return dequantize_nf4(packed, scales, code, (out_features, in_features), blocksize, dtype)


class NF4Linear(torch.autograd.Function):
    """y = x Wᵀ + b with W dequantized from nf4 in the forward and again in the backward (never saved)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        layout: tuple[int, int, int],
        weight_dtype: torch.dtype,
        *tensors: torch.Tensor | None,
    ) -> torch.Tensor:
        # only tensors the model holds anyway are saved; the scales are decoded again in the backward
        ctx.save_for_backward(*tensors)
        ctx.layout, ctx.weight_dtype = layout, weight_dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x, dequantize_weight(tensors, layout, x.dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_x = grad_bias = None
        # read once: under non-reentrant checkpointing each saved tensor may be unpacked only once
        tensors = ctx.saved_tensors
        if ctx.needs_input_grad[0]:
            # as bitsandbytes' MatMul4Bit.backward: W in the quantization's dtype, then the gradient's
            weight = dequantize_weight(tensors, ctx.layout, ctx.weight_dtype)
            grad_x = grad_out @ weight.to(grad_out.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[1]:
            # bitsandbytes sums the leading dimension, autograd the others after it: the same order here
            grad_bias = grad_out.sum(0, dtype=ctx.bias_dtype)
            while grad_bias.dim() > 1:
                grad_bias = grad_bias.sum(0)
        return (grad_x, grad_bias, None, None) + (None,) * len(tensors)


def nf4_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x Wᵀ + b for a bitsandbytes nf4 ``Params4bit`` weight (x already in the compute dtype)."""
    state = weight.quant_state
    layout = (int(state.shape[0]), int(state.shape[1]), int(state.blocksize))
    return NF4Linear.apply(x, bias, layout, state.dtype, *quant_tensors(weight))


def nf4_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Linear4bit.forward (cast to the compute dtype, project, cast back) through nf4_linear."""
    input_dtype = x.dtype
    x = x.to(self.compute_dtype)
    bias = None if self.bias is None else self.bias.to(self.compute_dtype)
    return nf4_linear(x, self.weight, bias).to(input_dtype)


def supports_nf4_fast_path(module: nn.Module) -> bool:
    """A quantized nf4 Linear4bit with a known compute dtype, bitsandbytes' standard packing, and a nested
    block size of 256 (all that bitsandbytes itself supports in training)."""
    from peftctl.models.quantized import is_4bit

    if not is_4bit(module) or getattr(module, "compute_dtype", None) is None:
        return False
    state = getattr(module.weight, "quant_state", None)
    if state is None or state.quant_type != "nf4" or getattr(state, "packing_format_for_cpu", False):
        return False
    return not state.nested or state.state2.blocksize == BLOCK_SCALES_PER_SCALE


# bitsandbytes 0.50 (backends/cuda/ops.py, _gemm_4bit_custom_max_m): up to this many tokens per call it may pick
# its own fused 4-bit kernel, beyond it it always dequantizes and calls F.linear, which nf4_forward reproduces
BITSANDBYTES_OWN_KERNEL_MAX_TOKENS = 1536

_FAST_CLASSES: dict[type, type] = {}


def fast_class(cls: type) -> type:
    """A subclass of a bitsandbytes 4-bit layer class whose forward is nf4_forward where bitsandbytes would
    itself dequantize and call F.linear (made once per class). On CUDA calls of at most
    BITSANDBYTES_OWN_KERNEL_MAX_TOKENS tokens (short sequences, generation) bitsandbytes' own forward runs:
    its fused kernel is faster there and rounds differently, so the result stays bitsandbytes' on every shape."""
    if cls not in _FAST_CLASSES:

        def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
            tokens = x.numel() // max(x.shape[-1], 1)
            if x.device.type == "cuda" and tokens <= BITSANDBYTES_OWN_KERNEL_MAX_TOKENS:
                return cls.forward(self, x)
            return nf4_forward(self, x)

        _FAST_CLASSES[cls] = type(cls.__name__ + "NF4", (cls,), {"forward": forward, "__module__": __name__})
    return _FAST_CLASSES[cls]


def enable_nf4_linears(modules: list[nn.Module]) -> int:
    """Switch the nf4 Linear4bit layers among ``modules`` (and their children) to nf4_forward; how many.
    Only the class changes: parameters, buffers, state-dict keys and isinstance checks stay as they were."""
    count = 0
    for root in modules:
        for module in root.modules():
            if type(module) in _FAST_CLASSES.values():
                count += 1
            elif supports_nf4_fast_path(module):
                module.__class__ = fast_class(type(module))
                count += 1
    return count
