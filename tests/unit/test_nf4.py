"""NF4 projections in torch ops (peftctl/kernels/nf4.py), the fast path's replacement for bitsandbytes'
per-call custom ops: the dequantized weight, the forward and the gradients are bit-for-bit those of
bitsandbytes' own Linear4bit, and autograd keeps no dequantized weight for the backward."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from peftctl.adapters.lora import LoraConfig, LoraLinear
from peftctl.kernels.nf4 import block_scales, dequantize_nf4, enable_nf4_linears, nf4_linear
from peftctl.models.quantization import quantize_linear


def _quantized(out_features: int, in_features: int, dtype: torch.dtype, nested: bool, bias: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    return quantize_linear(nn.Linear(in_features, out_features, bias=bias), "nf4", dtype, nested)


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(192, 256), (7, 100)])  # 7 x 100: the last block is partial
def test_dequantize_is_bitsandbytes_dequantize_bit_for_bit(nested: bool, dtype: torch.dtype, shape) -> None:
    layer = _quantized(*shape, dtype, nested)
    state = layer.weight.quant_state
    expected = bnb.functional.dequantize_4bit(layer.weight.data, state)
    scales = block_scales(
        state.absmax,
        state.state2.code if nested else None,
        state.state2.absmax if nested else None,
        state.offset if nested else None,
    )
    ours = dequantize_nf4(layer.weight.data, scales, state.code, shape, state.blocksize, state.dtype)
    assert ours.dtype == expected.dtype == dtype and ours.shape == expected.shape
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_switched_layer_gives_bitsandbytes_outputs_and_gradients_bit_for_bit(nested: bool, dtype: torch.dtype) -> None:
    layer = _quantized(48, 64, dtype, nested)
    layer.bias.requires_grad_(True)
    x = torch.randn(3, 5, 64, dtype=torch.float32, requires_grad=True)  # another dtype than compute: cast in and out
    upstream = torch.randn(3, 5, 48)

    def run():
        out = layer(x)
        grads = torch.autograd.grad(out, (x, layer.bias), upstream)
        return out, grads

    expected, expected_grads = run()
    keys = list(layer.state_dict())
    assert enable_nf4_linears([layer]) == 1
    assert isinstance(layer, bnb.nn.Linear4bit) and type(layer).__name__ == "Linear4bitNF4"
    assert list(layer.state_dict()) == keys
    ours, our_grads = run()
    assert ours.dtype == expected.dtype == torch.float32
    assert torch.equal(ours, expected)
    for got, want in zip(our_grads, expected_grads):
        assert torch.equal(got, want)


def test_weights_packed_in_another_storage_dtype_dequantize_the_same() -> None:
    """quant_storage=bfloat16 (how FSDP shards 4-bit weights): the same bytes, read as bytes."""
    torch.manual_seed(0)
    layer = quantize_linear(nn.Linear(64, 48, bias=False), "nf4", torch.bfloat16, True, quant_storage=torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    expected = layer(x)
    assert enable_nf4_linears([layer]) == 1
    assert torch.equal(layer(x), expected)


def test_qlora_layer_on_the_switched_base_trains_exactly_as_on_bitsandbytes() -> None:
    def adapter_grads(switch: bool) -> list[torch.Tensor]:
        layer = LoraLinear(_quantized(32, 40, torch.bfloat16, True, bias=False), "proj")
        layer.update_layer("default", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False))
        layer.set_adapter("default")
        if switch:
            assert enable_nf4_linears([layer]) == 1
        x = torch.randn(2, 6, 40, generator=torch.Generator().manual_seed(3), dtype=torch.bfloat16).requires_grad_()
        params = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        return [layer(x).float().square().sum(), *torch.autograd.grad(layer(x).float().square().sum(), params)]

    for got, want in zip(adapter_grads(True), adapter_grads(False)):
        assert torch.equal(got, want)


def test_backward_keeps_the_packed_weight_not_a_dequantized_copy() -> None:
    layer = _quantized(256, 512, torch.float32, True, bias=False)
    dense_bytes = 256 * 512 * 4
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    x = torch.randn(4, 512, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = nf4_linear(x, layer.weight)
    assert saved and max(saved) < dense_bytes / 4  # the 4-bit codes are 1/8 of fp32; scales smaller still
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_only_nf4_linear4bit_layers_are_switched() -> None:
    fp4 = quantize_linear(nn.Linear(64, 32), "fp4", torch.bfloat16, True)
    int8 = quantize_linear(nn.Linear(64, 32), "int8", torch.float16, False)
    dense = nn.Linear(64, 32)
    nf4 = _quantized(32, 64, torch.bfloat16, True)
    root = nn.ModuleList([fp4, int8, dense, nf4])
    assert enable_nf4_linears([root]) == 1
    assert [type(m).__name__ for m in root] == [type(fp4).__name__, type(int8).__name__, "Linear", "Linear4bitNF4"]
    assert type(fp4).__name__ == "Linear4bit"
    assert enable_nf4_linears([root]) == 1  # idempotent: an already switched layer is counted, not wrapped again
    assert type(nf4).__mro__[1] is bnb.nn.Linear4bit


def test_switched_layer_under_non_reentrant_checkpointing_gives_the_plain_gradients() -> None:
    """torch.utils.checkpoint (non-reentrant, how peftctl checkpoints and tiles MLPs) allows each saved tensor
    to be unpacked once: the backward must read ctx.saved_tensors once (the 256k trial on the H200 failed here)."""
    layer = _quantized(48, 64, torch.float32, True)
    assert enable_nf4_linears([layer]) == 1
    x = torch.randn(3, 64, requires_grad=True)
    (plain,) = torch.autograd.grad(layer(x).square().sum(), x)
    checkpointed = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
    (recomputed,) = torch.autograd.grad(checkpointed.square().sum(), x)
    assert torch.equal(recomputed, plain)
