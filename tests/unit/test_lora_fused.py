"""The fused LoRA branch (peftctl/kernels/lora_fused.py) against autograd of the unfused math, and the
CPU fallback: off the CUDA fast path every LoRA layer runs today's exact eager path."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from _lora_fixtures import tiny_llama
from torch import nn

from peftctl.adapters import get_adapted_model
from peftctl.adapters.lora import LoraConfig, LoraLinear
from peftctl.kernels import apply_fast_path, cxx_compiler, enable_fused_lora, lora_fused
from peftctl.kernels.lora_fused import draw_keep_mask, fused_lora_branch, unpack_mask


def _unfused(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, mask: torch.Tensor | None, p: float):
    """s · B(A(dropout(x))) in plain autograd ops, with a given dropout mask."""
    u = x if mask is None else x * mask.to(x.dtype) / (1 - p)
    return (u @ a.t()) @ b.t() * scale


def _leaves(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 9, 24, generator=generator).to(dtype).requires_grad_()
    a = torch.randn(4, 24, generator=generator).to(dtype).requires_grad_()
    b = torch.randn(16, 4, generator=generator).to(dtype).requires_grad_()
    return x, a, b


def _grads(out: torch.Tensor, leaves: tuple[torch.Tensor, ...], upstream: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, leaves, upstream))


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["no_dropout", "dropout"])
def test_fused_branch_matches_autograd_of_the_unfused_math_fp32(p: float) -> None:
    x, a, b = _leaves(torch.float32)
    upstream = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    fused = fused_lora_branch(x, a, b, 1.5, p)
    fused_grads = _grads(fused, (x, a, b), upstream)
    torch.manual_seed(7)  # the same draw gives the same mask
    mask = draw_keep_mask(x, p)[0] if p > 0 else None
    reference = _unfused(x, a, b, 1.5, mask, p)
    reference_grads = _grads(reference, (x, a, b), upstream)
    assert mask is None or 0 < int(mask.sum()) < mask.numel()  # dropout really dropped something
    torch.testing.assert_close(fused, reference, rtol=1e-6, atol=1e-6)
    for got, want in zip(fused_grads, reference_grads):  # fp32 sums in another order: a few ulps of a ~1 value
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fused_branch_bf16_under_autocast_keeps_the_plain_dtypes() -> None:
    """bf16 activations, fp32 adapter weights, bf16 autocast (the fast path's setting): the matmuls run
    in bf16, x's gradient is bf16 and the weights' fp32, values as the plain path within bf16 rounding."""
    x = _leaves(torch.bfloat16)[0]
    _, a, b = _leaves(torch.float32)
    upstream = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(3)
        fused = fused_lora_branch(x, a, b, 2.0, 0.1)
        torch.manual_seed(3)
        reference = _unfused(x, a.to(torch.bfloat16), b.to(torch.bfloat16), 2.0, draw_keep_mask(x, 0.1)[0], 0.1)
    got, want = _grads(fused, (x, a, b), upstream), _grads(reference, (x, a, b), upstream)
    assert fused.dtype == torch.bfloat16
    assert [g.dtype for g in got] == [torch.bfloat16, torch.float32, torch.float32]
    for g, w in zip([fused, *got], [reference, *want]):
        assert float((g.detach().float() - w.detach().float()).norm() / w.detach().float().norm()) < 1e-2


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fused_branch_traces_as_one_graph_and_backward_uses_the_forward_mask(backend: str) -> None:
    """The fast path compiles whole decoder layers: the fused function must trace without a graph break
    (fullgraph=True; AOT autograd, and Inductor's real CPU code generation of the byte mask draw) and its
    compiled backward must use the forward's dropout mask (the output rebuilt from the mask that x's gradient
    reveals equals the output)."""
    if backend == "inductor" and shutil.which(cxx_compiler()) is None:
        pytest.skip(f"Inductor's C++ compiler {cxx_compiler()!r} is not installed: no CPU code generation here")
    torch._dynamo.reset()
    x, a, b = _leaves(torch.float32)
    compiled = torch.compile(lambda x, a, b: fused_lora_branch(x, a, b, 2.0, 0.3), fullgraph=True, backend=backend)
    out = compiled(x, a, b)
    grad_x, grad_a = torch.autograd.grad(out, (x, a), torch.ones_like(out))
    kept = grad_x != 0
    assert 0.5 < float(kept.float().mean()) < 0.9  # about 1 - p of the 216 elements kept
    rebuilt = _unfused(x, a, b, 2.0, kept, 0.3)
    torch.testing.assert_close(out, rebuilt, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_a, torch.autograd.grad(rebuilt, a, torch.ones_like(out))[0], rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_compiled_branches_keep_their_packed_masks_not_a_byte_per_element_or_a_dropped_copy() -> None:
    """What three compiled fused branches reading one input (q / k / v) keep for the backward, as the fast path's
    compiler splits forward from backward (AOT autograd's min-cut partitioner, the one Inductor uses; no code
    generation here): x once and each mask at one bit per element. Round 12 on the H200: with forward and
    backward unpacking the bits through the same ops, the compiler merged the two into one node and kept its bool
    output and each projection's dropped-out copy of x instead: the 8B LoRA step peaked 6.5 GiB higher."""
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, 96, generator=generator).requires_grad_()  # a layer's input needs its gradient
    projections = [
        (
            torch.randn(32, 96, generator=generator),
            torch.randn(4, 96, generator=generator).requires_grad_(),
            torch.randn(32, 4, generator=generator).requires_grad_(),
        )
        for _ in range(3)
    ]

    def layer(x: torch.Tensor) -> torch.Tensor:
        return sum((x @ w.t() + fused_lora_branch(x, a, b, 2.0, 0.1)).sin() for w, a, b in projections)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager_decomp_partition")
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = compiled(x)
    out.sum().backward()
    torch._dynamo.reset()
    assert not [t for t in saved if t.dtype == torch.bool]
    assert sorted(t.numel() for t in saved if t.dtype == torch.uint8 and t.numel() > 8) == [x.numel() // 8] * 3
    input_sized = {t.untyped_storage().data_ptr() for t in saved if t.numel() == x.numel()}
    assert input_sized == {x.untyped_storage().data_ptr()}  # x itself, no copy u = x ⊙ m / (1 - p)
    assert all(param.grad is not None for _, a, b in projections for param in (a, b))


def test_packed_mask_holds_element_8j_plus_k_in_bit_k_of_byte_j() -> None:
    """The layout the forward's draw and the backward's unpacking share (the forward reads the bits through other
    ops than the backward, the same bits for all 256 byte values); the last byte's unused bits ignored."""
    packed = torch.tensor([0b00000101, 0b10000000, 0b11111110], dtype=torch.uint8)
    for unpack in (unpack_mask, lora_fused.unpack_mask_by_shifts):  # the backward's and the forward's reading
        mask = unpack(packed, torch.Size([3, 7]))  # 21 elements: 3 bits of the last byte unused
        assert mask.dtype == torch.bool and mask.reshape(-1).nonzero().flatten().tolist() == [0, 2, 15, 17, 18, 19, 20]
    every_byte, shape = torch.arange(256).to(torch.uint8), torch.Size([2048])
    assert torch.equal(lora_fused.unpack_mask_by_shifts(every_byte, shape), unpack_mask(every_byte, shape))


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_byte_at_a_time_draw_gives_independent_bernoulli_bits(p: float) -> None:
    """The packed draw (8 mask bits from one uniform draw) against the distribution it must have: each byte
    value with probability (1 - p)^kept · p^(8 - kept), on the 2^-31 grid; then 2^20 drawn bytes: every bit
    position keeps 1 - p of its elements, two positions of a byte keep together (1 - p)^2 of the time, and the
    kept count per byte follows Binomial(8, 1 - p) (tolerances: 6 standard errors or more)."""
    bounds = [0, *lora_fused.byte_value_bounds(p), lora_fused.DRAW_RANGE]
    for value in range(256):
        kept = bin(value).count("1")
        probability = (bounds[value + 1] - bounds[value]) / lora_fused.DRAW_RANGE
        assert abs(probability - (1 - p) ** kept * p ** (8 - kept)) <= 2**-30, value

    torch.manual_seed(0)
    shape = torch.Size([2**10, 2**13])  # 2^23 elements, 2^20 bytes
    packed = lora_fused.draw_packed_keep_mask(shape, p, torch.device("cpu"))
    assert packed.dtype == torch.uint8 and packed.numel() == 2**20
    bits = unpack_mask(packed, shape).reshape(-1, 8).double()  # row j: elements 8j..8j+7
    tolerance = 6 * math.sqrt(0.25 / 2**20)
    assert (bits.mean(dim=0) - (1 - p)).abs().max() <= tolerance
    together = (bits[:, :, None] * bits[:, None, :]).mean(dim=0)
    off_diagonal = ~torch.eye(8, dtype=torch.bool)
    assert (together[off_diagonal] - (1 - p) ** 2).abs().max() <= tolerance
    counts = torch.bincount(bits.sum(dim=1).long(), minlength=9).double() / 2**20
    binomial = torch.tensor([math.comb(8, k) * (1 - p) ** k * p ** (8 - k) for k in range(9)], dtype=torch.float64)
    assert (counts - binomial).abs().max() <= tolerance


def _qkv_layers(bits4: bool = False) -> list[LoraLinear]:
    """Three LoRA projections reading the same input, like q / k / v."""
    torch.manual_seed(0)
    layers = []
    for _ in range(3):
        base = nn.Linear(64, 64, bias=False)
        if bits4:
            base = _linear_4bit(base)
        layer = LoraLinear(base, "proj")
        layer.update_layer("default", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, init_lora_weights=False))
        layer.set_adapter("default")
        layers.append(layer.train())
    return layers


def _linear_4bit(linear: nn.Linear) -> nn.Module:
    bnb = pytest.importorskip("bitsandbytes")
    quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, quant_type="nf4")
    quantized.compute_dtype = torch.float32
    quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")
    return quantized.to("cpu")  # quantizes


def _saved_bytes(layers: list[LoraLinear], x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of the outputs, bytes of the distinct storages autograd saved for the backward)."""
    storages: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for layer in layers for p in layer.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = sum(layer(x) for layer in layers)
    return out, sum(storages.values())


def test_fused_projections_share_one_saved_input_instead_of_a_dropped_copy_each() -> None:
    x = torch.randn(4, 32, 64, requires_grad=True)
    _, plain_bytes = _saved_bytes(_qkv_layers(), x)
    fused_layers = _qkv_layers()
    assert enable_fused_lora(nn.ModuleList(fused_layers)) == 3
    _, fused_bytes = _saved_bytes(fused_layers, x)
    x_bytes = x.numel() * 4
    # plain: x, three dropped-out copies of x and three byte masks; fused: x, three 1-bit masks, the small h
    assert plain_bytes >= 4 * x_bytes + 3 * x.numel()
    assert fused_bytes < x_bytes * 1.5, (fused_bytes, x_bytes)


@pytest.mark.parametrize("bits4", [False, True], ids=["linear", "nf4"])
def test_fused_layer_gives_the_plain_layers_gradients_without_dropout(bits4: bool) -> None:
    """With dropout off (eval-mode dropout, p=0 path), fused and plain layers agree exactly in fp32,
    on nn.Linear and on a bitsandbytes 4-bit base (the base's dequant-matmul and its x-gradient as before)."""
    results = []
    for fused in (False, True):
        layers = _qkv_layers(bits4)
        for layer in layers:
            layer.lora_dropout["default"].eval()  # p = 0 on both paths
            layer.fused_lora = fused
        x = torch.randn(4, 32, 64, generator=torch.Generator().manual_seed(2), requires_grad=True)
        out = sum(layer(x) for layer in layers)
        params = [p for layer in layers for p in layer.adapter_parameters("default")]
        results.append((out, torch.autograd.grad(out.square().sum(), [x, *params])))
    (plain, plain_grads), (fused, fused_grads) = results
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    for got, want in zip(fused_grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cpu_keeps_todays_exact_eager_lora_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU the fast path is off, no layer is switched to the fused branch, and a training
    forward is bit for bit base(x) + s · B(A(nn.Dropout(x))) with the same dropout draw."""
    model = get_adapted_model(
        tiny_llama(),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules="all-linear", init_lora_weights=False),
    )
    assert apply_fast_path(model, torch.device("cpu"), model.peft_config["default"]).startswith("off")
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert layers and not any(layer.fused_lora for layer in layers)
    monkeypatch.setattr("peftctl.adapters.lora.layer.fused_lora_branch", _must_not_run)
    model.train()
    layer = layers[0]
    x = torch.randn(2, 5, layer.in_features)
    torch.manual_seed(11)
    got = layer(x)
    torch.manual_seed(11)
    dropped = nn.functional.dropout(x, 0.2, training=True)
    want = layer.base_layer(x) + layer.lora_B["default"](layer.lora_A["default"](dropped)) * layer.scaling["default"]
    assert torch.equal(got, want)
    ids = torch.randint(0, 300, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()  # the whole model trains without the fused branch


def _must_not_run(*args: object) -> torch.Tensor:
    raise AssertionError("the fused LoRA branch ran on the CPU path")
