"""The LoRA branch of one projection as a single autograd function that saves only what it cannot recompute.

Math (Hu et al., 2021, eq. 3, with dropout on the adapter input as PEFT applies it):
    u = dropout_p(x) = x ⊙ m / (1 - p),   m ~ Bernoulli(1 - p)
    h = u Aᵀ            (tokens × r)
    y = s · h Bᵀ        (tokens × out)
Backward, for an upstream gradient g = ∂L/∂y:
    ∂L/∂B = s · gᵀ h
    ∂L/∂h = s · g B
    ∂L/∂A = (∂L/∂h)ᵀ u          (u recomputed from x and m)
    ∂L/∂x = ((∂L/∂h) A) ⊙ m / (1 - p)

What the plain path (nn.Dropout, then two nn.Linear) keeps for the backward, per projection: u (a full
copy of the input), the mask m (one byte per element) and h. q / k / v (and gate / up) read the same x,
so a Llama layer with dropout > 0 keeps seven input-sized copies plus seven masks next to the x that
the frozen base matmul keeps anyway. This function keeps x (the same tensor object every projection
of that input saves, so autograd stores it once), the mask packed to one bit per element, and h
(tokens × r, small). With dropout = 0 there is no mask and u = x.

Estimated saving, Llama-3-8B shape, batch 1 × 2048, bf16, LoRA on all 7 projections, dropout 0.05,
no checkpointing (per layer: q/k/v/gate/up read 2048 × 4096, o reads 2048 × 4096, down 2048 × 14336):
    plain:  u copies 6 × 16 MiB + 56 MiB = 152 MiB, masks 76 MiB        -> 228 MiB per layer
    fused:  bit masks 9.5 MiB                                            ->   9.5 MiB per layer
    => about 218 MiB per layer, 6.8 GiB over 32 layers, if the plain path keeps its u copies. Under
       torch.compile the partitioner may already recompute u from x and a byte mask; then what is
       left to save is the masks' 7/8: ≈66 MiB per layer, ≈2.1 GiB. So 2.1-6.8 GiB off the 29.2 GiB
       measured for that step (benchmarks/speed_round4.py measures it).
With gradient checkpointing only one layer's activations are live at a time: ≈0.2 GiB.

Dtypes: the matmuls run in ``compute_dtype`` (the autocast dtype under autocast, else the adapter
weights' dtype, as the plain path casts x to it); x's gradient comes back in x's dtype and the
weights' gradients in theirs. The base layer (nn.Linear or a bitsandbytes 4-bit layer) is untouched:
its output and its own gradient with respect to x are computed as before, autograd adds the two.
"""

from __future__ import annotations

from typing import Any

import torch

# Dropout's keep-mask is drawn a byte (8 elements) at a time, already packed: one uniform integer in [0, 2^31) per
# byte, mapped to the byte's value through the cumulative distribution of the 256 values (bit k keeps element
# 8j + k with probability 1 - p, the 8 bits independent; each value's probability exact up to the 2^-31 grid).
# Compiled GPU code spends one Philox call per random draw, so this makes 8x fewer than one torch.rand per
# element and needs no packing pass: the 8B LoRA-checkpointing step took 0.209 s against 0.228 s with
# per-element draws (H200, round 11, benchmarks/device_round11d.sh).
DRAW_RANGE = 2**31


def bit_weights(device: torch.device) -> torch.Tensor:
    """1, 2, 4, ..., 128 as uint8 (the place value of each mask bit in a packed byte), made on the device."""
    return torch.bitwise_left_shift(
        torch.ones(8, dtype=torch.uint8, device=device), torch.arange(8, device=device).to(torch.uint8)
    )


def unpack_mask(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The bool mask of ``shape`` from its packing: bit k of byte j is element 8j + k (how the backward reads it)."""
    bits = torch.bitwise_and(packed.unsqueeze(1), bit_weights(packed.device)) != 0
    return bits.reshape(-1)[: shape.numel()].view(shape)


def unpack_mask_by_shifts(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The same bool mask as ``unpack_mask`` through other ops (how the forward reads it): bit k = (byte >> k) & 1.

    Two expressions on purpose. Where forward and backward unpack ``packed`` with the same ops, torch.compile merges
    the two into one node that both read, and its partitioner then keeps that node's output for the backward, a
    byte per element, together with every projection's dropped-out copy of x, instead of the packed bits: the 8B
    LoRA step without checkpointing peaked at 28.5 GiB (H200, round 12; round 10, before the byte draw: 22.1 GiB).
    A CPU test counts what the compiled branches keep."""
    shifts = torch.arange(8, device=packed.device).to(torch.uint8)
    bits = torch.bitwise_and(torch.bitwise_right_shift(packed.unsqueeze(1), shifts), 1).to(torch.bool)
    return bits.reshape(-1)[: shape.numel()].view(shape)


def byte_value_bounds(p: float) -> tuple[int, ...]:
    """For byte values v = 0..254, the exclusive upper bound of the draws in [0, DRAW_RANGE) that give v:
    the cumulative sum of P(u) = (1 - p)^popcount(u) · p^(8 - popcount(u)) over u <= v, on the 2^-31 grid.
    Plain Python: under torch.compile it runs once, while tracing, and the bounds become constants."""
    keep, cumulative, bounds = 1.0 - p, 0.0, []
    for value in range(255):
        kept = value.bit_count()
        cumulative += keep**kept * p ** (8 - kept)
        bounds.append(min(round(cumulative * DRAW_RANGE), DRAW_RANGE))
    return tuple(bounds)


def draw_packed_keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """The keep-mask of ``shape`` for dropout ``p``, packed one bit per element (the comment on DRAW_RANGE)."""
    draws = torch.randint(0, DRAW_RANGE, ((shape.numel() + 7) // 8,), device=device)
    bounds = torch.tensor(byte_value_bounds(p), device=device)
    # right=True: bounds[v - 1] <= draw < bounds[v] gives v (bounds[-1] = 0, bounds[255] = DRAW_RANGE)
    return torch.bucketize(draws, bounds, right=True).to(torch.uint8)


def draw_keep_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Which elements of x dropout keeps, Bernoulli(1 - p) each, drawn from the default generator of x's device:
    (the bool mask of x's shape, the same mask packed one bit per element)."""
    packed = draw_packed_keep_mask(x.shape, p, x.device)
    return unpack_mask_by_shifts(packed, x.shape), packed


def dropped(x: torch.Tensor, mask: torch.Tensor | None, p: float) -> torch.Tensor:
    """u = x ⊙ m / (1 - p) (x itself without dropout)."""
    return x if mask is None else x * (mask.to(x.dtype) / (1.0 - p))  # the order nn.Dropout rounds in


class FusedLoraBranch(torch.autograd.Function):
    """y = s · B(A(dropout_p(x))); saves x, h and the bit-packed mask (module docstring)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight_a: torch.Tensor,
        weight_b: torch.Tensor,
        scale: float,
        p: float,
        compute_dtype: torch.dtype,
    ) -> torch.Tensor:
        mask, packed = draw_keep_mask(x, p) if p > 0 else (None, None)
        a, b = weight_a.to(compute_dtype), weight_b.to(compute_dtype)
        u = dropped(x.to(compute_dtype), mask, p)
        h = u @ a.t()
        ctx.save_for_backward(x, h, weight_a, weight_b, packed)
        ctx.scale, ctx.p, ctx.compute_dtype = scale, p, compute_dtype
        return (h @ b.t()) * scale

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, h, weight_a, weight_b, packed = ctx.saved_tensors
        dtype, p = ctx.compute_dtype, ctx.p
        a, b = weight_a.to(dtype), weight_b.to(dtype)
        g = grad_out.to(dtype) * ctx.scale  # s · g
        mask = unpack_mask(packed, x.shape) if packed is not None else None
        grad_h = g @ b  # ∂L/∂h = s · g B
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = dropped(grad_h @ a, mask, p).to(x.dtype)
        if ctx.needs_input_grad[1]:
            u = dropped(x.to(dtype), mask, p)
            grad_a = (grad_h.reshape(-1, grad_h.shape[-1]).t() @ u.reshape(-1, u.shape[-1])).to(weight_a.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = (g.reshape(-1, g.shape[-1]).t() @ h.reshape(-1, h.shape[-1])).to(weight_b.dtype)
        return grad_x, grad_a, grad_b, None, None, None


def lora_compute_dtype(x: torch.Tensor, weight_a: torch.Tensor) -> torch.dtype:
    """The dtype the plain path's LoRA matmuls run in: autocast's, else the adapter weights'."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight_a.dtype


def fused_lora_branch(
    x: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor, scale: float, p: float
) -> torch.Tensor:
    """s · B(A(dropout_p(x))) through FusedLoraBranch (p: the dropout probability, 0 when not training)."""
    return FusedLoraBranch.apply(x, weight_a, weight_b, scale, p, lora_compute_dtype(x, weight_a))
