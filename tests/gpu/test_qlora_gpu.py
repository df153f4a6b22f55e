"""QLoRA on CUDA: the 4-bit LoRA forward vs its dequantized reference, a short training run of an
8B-wide Llama slice, and merge of a quantized run. Run on a GPU with `pytest -m gpu tests/gpu`."""

from __future__ import annotations

import sys
from pathlib import Path

import bitsandbytes  # noqa: F401  (the GPU tests need it installed)
import pytest
import torch

pytestmark = pytest.mark.gpu  # CI deselects these with -m "not gpu"


@pytest.fixture(autouse=True)
def _needs_cuda() -> None:
    assert torch.cuda.is_available(), "the gpu-marked tests need a CUDA GPU; elsewhere run pytest -m 'not gpu'"


sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_lora_on_nf4_matches_dequantized_reference_on_cuda() -> None:
    from peftctl.adapters.core.model import get_adapted_model
    from peftctl.adapters.lora import LoraConfig
    from peftctl.models.quantization import quantize_linear
    from peftctl.models.quantized import dequantize

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

    from peftctl.models.quantized import dequantize_model

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
    # Tolerance. No re-quantization happens, so the only differences are bf16 roundings: the merged
    # weight deq(W_q) + ΔW is rounded once to bf16 (<= 2^-9 relative per weight), while the adapted
    # model rounds base(x) and s·B(Ax) separately before adding them. Both are at the bf16 level
    # (1e-3..1e-2 per op, compounding over layers), far below the nf4 step (~9% relative weight
    # error, tests/unit/test_loftq.py) and below 5% of what the adapter itself changes.
    assert err < 3e-2
    assert err < 0.05 * effect


def test_qlora_llama_recipe_through_the_product_loop(tmp_path: Path) -> None:
    """recipe=qlora_llama as composed (nf4 + double quant via transformers' BitsAndBytesConfig,
    all-linear LoRA, paged AdamW 8-bit, gradient checkpointing, bf16) with model.name_or_path
    pointing at a saved random Llama of 8B width (2 layers), trained by the product's Trainer on
    token examples (no `datasets` on the GPU image), saved and reloaded."""
    import qlora_llama8b as bench
    from transformers import LlamaForCausalLM

    from peftctl.adapters.core.model import AdaptedModel
    from peftctl.config.compose import compose_config
    from peftctl.data.tokenize import Example
    from peftctl.models.tokenizer import build_byte_tokenizer
    from peftctl.train.loop import Trainer
    from peftctl.train.run import build_model_and_data  # noqa: F401  (same module the CLI uses)

    base_dir = tmp_path / "llama8b-w"
    with torch.device("cuda"):
        dense = LlamaForCausalLM(bench.llama3_8b_config(2)).to(torch.bfloat16)
    dense.save_pretrained(base_dir)
    build_byte_tokenizer().save_pretrained(base_dir)
    del dense
    torch.cuda.empty_cache()

    cfg = compose_config(
        [
            "recipe=qlora_llama",
            f"model.name_or_path={base_dir}",
            "train.max_steps=8",
            "train.grad_accum=2",
            "train.log_every=4",
            "train.lr=1e-3",
            f"output_dir={tmp_path / 'run'}",
        ]
    )
    assert (
        cfg.quant.method,
        cfg.quant.double_quant,
        cfg.train.optimizer,
        cfg.train.precision,
        cfg.train.gradient_checkpointing,
    ) == ("nf4", True, "paged_adamw_8bit", "bf16", True)
    from peftctl.adapters.core.model import get_adapted_model
    from peftctl.models.kbit import prepare_model_for_kbit_training
    from peftctl.models.loader import load_model
    from peftctl.models.quantized import is_4bit

    model = prepare_model_for_kbit_training(load_model(cfg.model, cfg.quant, str(base_dir)), True)
    adapted = get_adapted_model(model, cfg.adapter.replace(base_model_name_or_path=str(base_dir)))
    adapted.to("cuda")
    assert sum(is_4bit(m) for m in adapted.modules()) == 14
    g = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(4):  # a few fixed sequences, so the loss must fall
        ids = torch.randint(3, 255, (512,), generator=g).tolist()
        examples.append(Example(input_ids=ids, labels=ids, prompt="", response=""))
    (tmp_path / "run").mkdir()
    trainer = Trainer(
        adapted, "default", examples * 8, examples, cfg, tmp_path / "run", torch.device("cuda"), pad_id=0, quiet=True
    )
    torch.cuda.reset_peak_memory_stats()
    result = trainer.fit()
    records = [__import__("json").loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    print(
        "recipe loop losses",
        losses,
        "eval",
        result.get("eval_loss"),
        "peak GiB",
        torch.cuda.max_memory_allocated() / 2**30,
    )
    assert result["completed"] and len(losses) == 2 and losses[-1] < losses[0]
    adapted.save_pretrained(tmp_path / "adapter")
    reloaded = (
        AdaptedModel.from_pretrained(load_model(cfg.model, cfg.quant, str(base_dir)), tmp_path / "adapter")
        .to("cuda")
        .eval()
    )
    ids = torch.tensor([examples[0].input_ids[:128]], device="cuda")
    adapted.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.equal(adapted(input_ids=ids).logits, reloaded(input_ids=ids).logits)
