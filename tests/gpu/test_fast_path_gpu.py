"""The CUDA fast path (`train.kernels=auto`: decoder layers under torch.compile) trains like the eager
path (`train.kernels=off`): one step's adapter gradients agree within bf16 tolerance, and 50 bf16
steps of `peftctl train` follow the same loss curve within 1e-2 relative at every step, for LoRA,
DoRA and QLoRA (nf4). Dropout is 0 here: compiled dropout draws its masks from another generator than
eager dropout, so with dropout the two runs differ by sampling, not by arithmetic.
Run with `pytest -m "gpu and not multigpu" tests/gpu`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peftctl.adapters.lora import LoraConfig
from peftctl.adapters.core.model import get_adapted_model
from peftctl.kernels import apply_fast_path, decoder_layers
from peftctl.train.chunked_ce import causal_lm_loss_sum
from peftctl.train.run import train

pytestmark = pytest.mark.gpu  # CI deselects these with -m "not gpu"

# a Llama wide enough for bf16 rounding to be realistic, small enough to compile fast
ARCH = ["model.arch.hidden_size=512", "model.arch.intermediate_size=1536", "model.arch.num_hidden_layers=4",
        "model.arch.num_attention_heads=8", "model.arch.num_key_value_heads=4"]
SCHEDULE = ["train.max_steps=50", "train.batch_size=8", "train.log_every=1", "train.save_every=0", "train.eval_every=0",
            "train.device=cuda", "dataset.max_samples=400", "train.lr=1e-3", "adapter.lora_dropout=0", "train.precision=bf16"]
CASES = {"lora": ["recipe=tiny_lora", "model.dtype=bfloat16"],
         "dora": ["recipe=tiny_lora", "model.dtype=bfloat16", "adapter.use_dora=true"],
         "qlora": ["recipe=qlora_tiny_cpu", "quant.compute_dtype=bfloat16", "train.optimizer=adamw"]}


@pytest.fixture(autouse=True)
def _needs_cuda() -> None:
    assert torch.cuda.is_available(), "the gpu-marked tests need a CUDA GPU; elsewhere run pytest -m 'not gpu'"


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_path_follows_the_eager_loss_curve(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs = {}
    for kernels in ("off", "auto"):
        runs[kernels] = _losses(train([*CASES[case], *ARCH, *SCHEDULE, f"train.kernels={kernels}", f"output_dir={tmp_path / kernels}"]))
    printed = capsys.readouterr().out
    assert "fast path on: 4 x LlamaDecoderLayer" in printed, printed[-2000:]
    eager, fast = torch.tensor(runs["off"]), torch.tensor(runs["auto"])
    assert len(eager) == len(fast) == 50 and torch.isfinite(fast).all()
    worst = float(((fast - eager).abs() / eager.abs()).max())
    print(f"{case}: loss {eager[0]:.4f} -> {eager[-1]:.4f} eager, {fast[0]:.4f} -> {fast[-1]:.4f} fast; worst step rel diff {worst:.2e}")
    assert worst <= 1e-2
    assert fast[-1] < fast[0]


def _llama_bf16(seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, attn_implementation="sdpa")
    return LlamaForCausalLM(config).to("cuda", torch.bfloat16)


def _adapter_grads(compiled: bool, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    model = get_adapted_model(_llama_bf16(0), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
    if compiled:
        assert apply_fast_path(model, torch.device("cuda"), "lora").startswith("on")
        assert len(decoder_layers(model)) == 4
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss_sum, count = causal_lm_loss_sum(model, batch)
    (loss_sum / count).backward()
    return {name: p.grad.float() for name, p in model.named_parameters() if p.requires_grad}


def test_one_step_adapter_gradients_match_eager_within_bf16_tolerance() -> None:
    ids = torch.randint(0, 1024, (2, 256), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    eager, fast = _adapter_grads(False, batch), _adapter_grads(True, batch)
    assert eager.keys() == fast.keys()
    worst = max(float((fast[k] - eager[k]).norm() / eager[k].norm().clamp_min(1e-12)) for k in eager)
    print(f"one step, {len(eager)} adapter tensors: worst ||g_fast - g_eager|| / ||g_eager|| = {worst:.2e}")
    assert worst <= 2e-2  # bf16 operands: relative errors of 1e-3 .. 1e-2
