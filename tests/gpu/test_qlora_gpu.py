"""QLoRA on CUDA: the 4-bit LoRA forward vs its dequantized reference, a short training run of an
8B-wide Llama slice, and merge of a quantized run. Run on a GPU with `pytest -m gpu tests/gpu`."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():  # collected everywhere, run only with a GPU
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

bnb = pytest.importorskip("bitsandbytes")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_lora_on_nf4_matches_dequantized_reference_on_cuda() -> None:
    from peftctl.adapters.lora import LoraConfig
    from peftctl.adapters.model import get_adapted_model
    from peftctl.adapters.quantized import dequantize
    from peftctl.models.quantization import quantize_linear

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4096, 1024, bias=False, device="cuda", dtype=torch.bfloat16))
    model[0] = quantize_linear(model[0], "nf4", torch.bfloat16)
    adapted = get_adapted_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["0"], init_lora_weights=False))
    layer = adapted.base_model.model[0]
    x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    w = dequantize(layer.base_layer, torch.float32)
    a, b = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
    ref = x.float() @ (w + 2.0 * b @ a).T
    out = adapted(x)
    assert out.dtype == torch.bfloat16
    assert _rel(out, ref) < 1e-2  # bf16 activations (2^-8 relative per rounding)


def test_llama8b_wide_slice_trains_and_merges() -> None:
    """2 layers of Llama-3-8B width: a few QLoRA steps lower the loss on a repeated batch, only the
    adapters get grads, and the merged bf16 model reproduces the adapted 4-bit model's logits."""
    import qlora_llama8b as bench

    from peftctl.adapters.quantized import dequantize_model

    config = bench.llama3_8b_config(2)
    model = bench.build_quantized_llama(config, seed=0)
    adapted, optimizer, loss_fn = bench.setup_peftctl(model)
    for group in optimizer.param_groups:
        group["lr"] = 1e-3
    ids = torch.randint(0, config.vocab_size, (1, 512), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    losses = []
    for _ in range(6):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(batch)
        loss.backward()
        grads = {n: p.grad for n, p in adapted.named_parameters() if p.grad is not None}
        assert grads and all("lora_" in n for n in grads)
        assert all(torch.isfinite(g).all() for g in grads.values())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    assert losses[-1] < losses[0]

    adapted.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        adapted_logits = adapted(input_ids=ids[:, :256]).logits.float()
        # the same quantized model with the adapters off: the size of the adapter's effect
        with adapted.disable_adapter():
            base_logits = adapted(input_ids=ids[:, :256]).logits.float()
    dequantize_model(adapted, torch.bfloat16)
    merged = adapted.merge_and_unload()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        merged_logits = merged(input_ids=ids[:, :256]).logits.float()
    err = _rel(merged_logits, adapted_logits)
    effect = _rel(base_logits, adapted_logits)
    print(f"merged vs adapted rel {err:.2e}; adapter effect rel {effect:.2e}")
    assert err < 2e-2  # bf16 rounding of W_q + ΔW: 2^-9 per weight, through 2 layers
    assert err < 0.25 * effect
