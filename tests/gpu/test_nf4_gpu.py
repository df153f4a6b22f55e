"""The fast path's nf4 projections (peftctl/kernels/nf4.py) on CUDA: the dequantized weight is bit-for-bit
bitsandbytes' CUDA kernel's, the eager forward and input gradient are bit-for-bit its Linear4bit's, and
the layer compiles with fullgraph=True (no graph break: the point of the module) to the same values.
Run with `pytest -m "gpu and not multigpu" tests/gpu`."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from peftctl.kernels.nf4 import block_scales, dequantize_nf4, enable_nf4_linears
from peftctl.models.quantization import quantize_linear

pytestmark = pytest.mark.gpu  # CI deselects these with -m "not gpu"


@pytest.fixture(autouse=True)
def _needs_cuda() -> None:
    assert torch.cuda.is_available(), "the gpu-marked tests need a CUDA GPU; elsewhere run pytest -m 'not gpu'"


@pytest.mark.parametrize("nested", [True, False])
def test_nf4_projection_on_cuda_is_bitsandbytes_bit_for_bit_and_compiles_whole(nested: bool) -> None:
    torch.manual_seed(0)
    dense = nn.Linear(1024, 2816, bias=False, device="cuda", dtype=torch.bfloat16)
    layer = quantize_linear(dense, "nf4", torch.bfloat16, nested)
    state = layer.weight.quant_state
    scales = block_scales(
        state.absmax,
        state.state2.code if nested else None,
        state.state2.absmax if nested else None,
        state.offset if nested else None,
    )
    weight = dequantize_nf4(layer.weight.data, scales, state.code, (2816, 1024), state.blocksize, torch.bfloat16)
    assert torch.equal(weight, bnb.functional.dequantize_4bit(layer.weight.data, state))

    x = torch.randn(2, 1024, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    upstream = torch.randn(2, 1024, 2816, device="cuda", dtype=torch.bfloat16)

    def forward_backward(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        out = module(x)
        (grad,) = torch.autograd.grad(out, x, upstream)
        return out, grad

    expected, expected_grad = forward_backward(layer)  # bitsandbytes' gemm_4bit and MatMul4Bit.backward
    assert enable_nf4_linears([layer]) == 1
    eager, eager_grad = forward_backward(layer)
    assert torch.equal(eager, expected) and torch.equal(eager_grad, expected_grad)
    torch._dynamo.reset()
    compiled, compiled_grad = forward_backward(torch.compile(layer, fullgraph=True))
    out_error = ((compiled.float() - expected.float()).norm() / expected.float().norm()).item()
    grad_error = ((compiled_grad.float() - expected_grad.float()).norm() / expected_grad.float().norm()).item()
    print(f"nested={nested}: compiled vs bitsandbytes, relative error out {out_error:.2e}, grad {grad_error:.2e}")
    assert out_error <= 1e-3 and grad_error <= 1e-3  # the same matmuls; at most rounding in a fused cast


def test_short_calls_keep_bitsandbytes_own_forward() -> None:
    """At most 1536 tokens per call bitsandbytes may run its own fused kernel (rounding differently from
    dequantize + F.linear): the switched layer then runs exactly bitsandbytes' forward."""
    torch.manual_seed(0)
    layer = quantize_linear(
        nn.Linear(4096, 1024, bias=False, device="cuda", dtype=torch.bfloat16), "nf4", torch.bfloat16
    )
    for tokens in (1, 7, 64, 1536):
        x = torch.randn(1, tokens, 4096, device="cuda", dtype=torch.bfloat16)
        expected = bnb.nn.Linear4bit.forward(layer, x)
        enable_nf4_linears([layer])
        assert torch.equal(layer(x), expected), tokens
