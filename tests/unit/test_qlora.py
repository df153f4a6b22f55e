"""QLoRA on CPU (bitsandbytes runs 4-bit on CPU): LoRA over Linear4bit against the dequantized
reference, gradients, save/load, k-bit preparation, the chunked loss, merge of a quantized base,
and the CPU qlora recipe end to end."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import bitsandbytes as bnb  # noqa: E402  (a test dependency: missing it must fail, not skip)
import pytest
import torch

from peftctl.adapters.core.model import AdaptedModel, get_adapted_model  # noqa: E402
from peftctl.adapters.lora import LoraConfig  # noqa: E402
from peftctl.models.quantization import quantize_linear  # noqa: E402
from peftctl.models.quantized import (  # noqa: E402
    dequantize,
    dequantize_model,
    is_4bit,
    is_8bit,
    keep_standard_4bit_layout,
    read_weight,
    write_weight,
)

TINY = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=False))
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return path


def _load_nf4(path: Path, compute: torch.dtype = torch.float32, method: str = "nf4") -> torch.nn.Module:
    """Through the product's loader: transformers + BitsAndBytesConfig."""
    from peftctl.config.schema import ModelConfig, QuantConfig
    from peftctl.models.loader import load_model

    model_cfg = ModelConfig(name_or_path=str(path), dtype="float32")
    quant = QuantConfig(
        method=method, double_quant=True, compute_dtype={torch.float32: "float32", torch.bfloat16: "bfloat16"}[compute]
    )
    return load_model(model_cfg, quant, str(path))


def _adapted(path: Path, init: bool | str = False, seed: int = 0) -> AdaptedModel:
    model = _load_nf4(path)
    torch.manual_seed(seed)
    return get_adapted_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=init))


def test_loader_quantizes_and_lora_wraps_linear4bit(llama_dir: Path) -> None:
    adapted = _adapted(llama_dir)
    layers = dict(adapted.adapter_layers())
    assert len(layers) == 14  # 7 linears x 2 layers, head excluded
    assert all(is_4bit(layer.base_layer) for layer in layers.values())
    assert not is_4bit(adapted.base_model.model.lm_head)


def test_qlora_layer_forward_matches_dequantized_reference(llama_dir: Path) -> None:
    adapted = _adapted(llama_dir)
    layer = adapted.base_model.model.model.layers[0].mlp.down_proj
    x = torch.randn(3, 7, 128)
    w = dequantize(layer.base_layer, torch.float64)
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    ref = x.double() @ (w + 2.0 * b @ a).T
    assert _rel(layer(x), ref) <= 1e-3


def test_qlora_model_logits_match_dequantized_model(llama_dir: Path) -> None:
    adapted = _adapted(llama_dir)
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        quantized = adapted(input_ids=ids).logits
        assert dequantize_model(adapted, torch.float32) == 14
        assert not any(is_4bit(m) for m in adapted.modules())
        reference = adapted(input_ids=ids).logits  # same adapters over the dense deq(W) in fp32
    assert _rel(quantized, reference) <= 1e-3


def _repack_for_avx512_bf16_cpu(layer: torch.nn.Module) -> None:
    """What bitsandbytes' Linear4bit.forward does to its weight at an evaluation on a CPU with AVX512-BF16."""
    weight = layer.weight
    weight.data, weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(weight.data, weight.quant_state)


def test_4bit_layers_read_and_train_through_an_evaluation_on_any_cpu(llama_dir: Path) -> None:
    """bitsandbytes repacks a Linear4bit for its AVX512-BF16 CPU kernel at an evaluation forward, after which the
    layer passes no gradient to its input and dequantize_4bit reads garbage (found on such a CPU: the dequantized
    model's logits were 0.66 off, relative). The loader keeps the layers from repacking; a layer repacked anyway
    (here by bitsandbytes' own function, as on such a CPU) is read and trained in the standard packing again."""
    adapted = _adapted(llama_dir)
    base = adapted.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    reference = dequantize(base, torch.float32).clone()
    adapted.eval()
    with torch.no_grad():  # an evaluation: nothing may be repacked, whatever this CPU supports
        adapted(input_ids=torch.randint(0, 300, (2, 12)))
    assert not getattr(base.weight.quant_state, "packing_format_for_cpu", False)
    torch.testing.assert_close(dequantize(base, torch.float32), reference, rtol=0, atol=0)

    _repack_for_avx512_bf16_cpu(base)
    # deq reads the repacked layer (its scales now in bf16: within bf16 rounding of the original)
    assert _rel(dequantize(base, torch.float32), reference) < 1e-2
    _repack_for_avx512_bf16_cpu(base)
    assert keep_standard_4bit_layout(adapted) == 14
    adapted.train()
    x = torch.randn(3, 64, requires_grad=True)
    base(x).sum().backward()
    assert x.grad is not None  # the base passes its gradient on (the repacked kernel has no backward)
    assert _rel(x.grad, torch.ones(3, 64) @ reference) < 1e-2


def test_backward_reaches_only_adapters_with_finite_grads(llama_dir: Path) -> None:
    from peftctl.models.kbit import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(_load_nf4(llama_dir), gradient_checkpointing=True)
    adapted = get_adapted_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    )
    adapted.train()
    ids = torch.randint(0, 300, (2, 12))
    loss = adapted(input_ids=ids, labels=ids).loss
    loss.backward()
    with_grad = {n for n, p in adapted.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert with_grad and all(".lora_A." in n or ".lora_B." in n for n in with_grad)
    assert all(
        torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in adapted.parameters() if p.grad is not None
    )


def test_save_load_adapter_identical(llama_dir: Path, tmp_path: Path) -> None:
    adapted = _adapted(llama_dir, seed=1)
    adapted.save_pretrained(tmp_path / "ad")
    reloaded = AdaptedModel.from_pretrained(_load_nf4(llama_dir), tmp_path / "ad")
    saved, loaded = adapted.get_adapter_state_dict("default"), reloaded.get_adapter_state_dict("default")
    assert saved.keys() == loaded.keys() and saved
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    ids = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        assert torch.equal(adapted(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_inplace_merge_into_4bit_requantizes_and_unmerge_restores(llama_dir: Path) -> None:
    adapted = _adapted(llama_dir)
    layer = adapted.base_model.model.model.layers[1].self_attn.q_proj
    with torch.no_grad():
        # a trained-size update (|ΔW| well below |W|), not init=False's Kaiming-sized B
        layer.lora_B["default"].weight.mul_(0.02)
    before = read_weight(layer.base_layer).clone()
    x = torch.randn(4, 64)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert is_4bit(layer.base_layer) and layer.merged
        merged = layer(x)
        layer.unmerge()
    # Q(deq(W) + ΔW): a second 4-bit rounding, so merged output differs at the quantization level
    assert _rel(merged, unmerged) < 0.15
    assert _rel(read_weight(layer.base_layer), before) < 0.15


def test_qdora_norm_and_training_forward_match_the_dequantized_reference(llama_dir: Path) -> None:
    """DoRA over Linear4bit (training, dropout 0.2): the norm from ‖W_i‖², W Aᵀ, A Aᵀ of the dequantized
    weight equals ‖deq(W) + s·BA‖, and y = base(x) + (m/‖·‖ − 1)·deq(W) u + (m/‖·‖)·s·B(A(u)), with the
    weight dequantized once for both the norm and W u."""
    from peftctl.adapters.lora import dora

    torch.manual_seed(0)
    config = LoraConfig(
        r=4, lora_alpha=8, use_dora=True, lora_dropout=0.2, target_modules=["down_proj"], init_lora_weights=False
    )
    adapted = get_adapted_model(_load_nf4(llama_dir), config).train()
    layer = adapted.base_model.model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.mul_(0.02)  # a trained-size update
        layer.lora_magnitude_vector["default"].mul_(1 + 0.1 * torch.randn(64))  # m away from the norm
    w = dequantize(layer.base_layer, torch.float32)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    norm = (w + 2.0 * b.detach() @ a.detach()).norm(dim=1)
    torch.testing.assert_close(dora.dora_norm(layer, "default"), norm, rtol=1e-6, atol=0)
    x = torch.randn(3, 7, 128)
    torch.manual_seed(4)
    ours = layer(x)
    torch.manual_seed(4)
    u = torch.nn.functional.dropout(x, 0.2, training=True)
    factor = layer.lora_magnitude_vector["default"] / norm
    expected = x @ w.T + (factor - 1) * (u @ w.T) + factor * 2.0 * (u @ a.T @ b.T)
    assert _rel(ours.detach(), expected.detach()) <= 1e-5


def test_int8_dequantize_and_write() -> None:
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    layer = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)._quantize("cpu")
    assert is_8bit(layer)
    # row-wise absmax int8: error per element <= absmax_row / 254 (+ the fp16 rounding of the scale)
    err = (dequantize(layer, torch.float32) - w).abs()
    assert (err <= w.abs().amax(1, keepdim=True) / 254 * 1.05).all()
    assert err.max() > 0
    write_weight(layer, w * 2)
    assert _rel(dequantize(layer, torch.float32), w * 2) < 1e-2


def test_kbit_prep_norm_dtype_rules() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftctl.models.kbit import cast_adapters, prepare_model_for_kbit_training

    for compute, expect in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)):
        model = LlamaForCausalLM(LlamaConfig(**TINY)).to(compute)
        layer = model.model.layers[0].self_attn
        layer.q_proj = quantize_linear(layer.q_proj, "nf4", compute)
        prepare_model_for_kbit_training(model, gradient_checkpointing=False)
        assert model.model.norm.weight.dtype == expect  # fp16 compute only: norms upcast
        assert model.model.embed_tokens.weight.dtype == compute
        assert not any(p.requires_grad for p in model.parameters())
    adapted = get_adapted_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert cast_adapters(adapted, torch.bfloat16) == 4
    assert all(p.dtype == torch.bfloat16 for p in adapted.parameters() if p.requires_grad)


def test_chunked_loss_equals_full_cross_entropy(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import peftctl.train.chunked_ce as loss_mod

    adapted = _adapted(llama_dir)
    ids = torch.randint(0, 300, (2, 16))
    labels = ids.clone()
    labels[:, :5] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    logits = adapted(input_ids=ids).logits
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 300).float(), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    ref_grads = torch.autograd.grad(ref, [p for p in adapted.parameters() if p.requires_grad])
    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", 300 * 7)  # 7 rows per chunk: several chunks
    total, count = loss_mod.causal_lm_loss_sum(adapted, batch)
    grads = torch.autograd.grad(total, [p for p in adapted.parameters() if p.requires_grad])
    assert count == 2 * 11  # positions 1..15, of which 1..4 are masked
    assert float(total) == pytest.approx(float(ref), rel=1e-5)
    assert all(torch.allclose(g, r, rtol=1e-4, atol=1e-6) for g, r in zip(grads, ref_grads))
    assert isinstance(adapted.base_model.model.lm_head, torch.nn.Linear)  # head restored


@pytest.mark.parametrize(
    "name,cls",
    [
        ("adamw", torch.optim.AdamW),
        ("adamw_8bit", "AdamW8bit"),
        ("paged_adamw_8bit", "PagedAdamW8bit"),
        ("paged_adamw_32bit", "PagedAdamW32bit"),
    ],
)
def test_optimizers(name: str, cls: object) -> None:
    from peftctl.train.optim import build_optimizer

    params = [torch.nn.Parameter(torch.randn(64, 64))]
    cfg = SimpleNamespace(optimizer=name, lr=1e-2, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8, weight_decay=0.0)
    opt = build_optimizer(params, cfg)
    expected = cls if isinstance(cls, type) else getattr(bnb.optim, cls)
    assert isinstance(opt, expected) and type(opt).__name__ == expected.__name__
    before = params[0].detach().clone()
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    assert (params[0] < before).all()  # every weight moved against its positive gradient


BNB_CLASSES = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit", "paged_adamw_32bit": "PagedAdamW32bit"}
# 8-bit state for all but (7,) (< min_8bit_size 4096): 7680 elements fill 30 blocks of 256, 4500 end in a partial block
OPTIMIZER_SHAPES = [(96, 80), (7,), (50, 90), (64, 128)]
OPTIMIZER_CFG = SimpleNamespace(lr=1e-2, adam_beta1=0.9, adam_beta2=0.99, adam_eps=1e-8, weight_decay=0.01)


def _bnb_reference(name: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    cfg = OPTIMIZER_CFG
    kwargs = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    return getattr(bnb.optim, BNB_CLASSES[name])(params, **kwargs)


def _ours(name: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    from peftctl.train.optim import build_optimizer

    return build_optimizer(params, SimpleNamespace(optimizer=name, **vars(OPTIMIZER_CFG)))


def _run_steps(optimizer, params, generator, steps, skip_grad=None) -> None:
    """``steps`` optimizer steps on random gradients (parameter ``skip_grad`` gets none in the second step)."""
    for step in range(steps):
        for index, param in enumerate(params):
            grad = torch.randn(param.shape, generator=generator)
            param.grad = None if (index == skip_grad and step == 1) else grad
        optimizer.step()


def _fresh_params(seed: int = 0) -> tuple[list[torch.nn.Parameter], torch.Generator]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in OPTIMIZER_SHAPES], generator


@pytest.mark.parametrize("name", sorted(BNB_CLASSES))
def test_bitsandbytes_optimizers_update_as_bitsandbytes_does_in_one_call_without_syncs(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our step of a bitsandbytes optimizer gives its own step's weights bit for bit; it never calls the
    device synchronize bitsandbytes issues after every parameter, and the 8-bit ones update all their
    8-bit parameters in one bitsandbytes call (blocks aligned in one flat buffer, train/optim_8bit.py)."""
    import bitsandbytes.functional as bnb_functional
    import bitsandbytes.optim.optimizer as bnb_optimizer

    counts = {"sync": 0, "8bit": 0}
    real_sync, real_update = bnb_optimizer.sync_gpu, bnb_functional.optimizer_update_8bit_blockwise

    def count(key, function):
        return lambda *a, **k: (counts.__setitem__(key, counts[key] + 1), function(*a, **k))[1]

    monkeypatch.setattr(bnb_optimizer, "sync_gpu", count("sync", real_sync))
    monkeypatch.setattr(bnb_functional, "optimizer_update_8bit_blockwise", count("8bit", real_update))

    def train(make) -> tuple[list[torch.Tensor], dict[str, int]]:
        params, generator = _fresh_params()
        optimizer = make(name, params)
        counts.update(sync=0, **{"8bit": 0})
        _run_steps(optimizer, params, generator, steps=3)
        return [p.detach().clone() for p in params], dict(counts)

    ours, our_counts = train(_ours)
    theirs, their_counts = train(_bnb_reference)
    assert their_counts["sync"] >= 12 and our_counts["sync"] == 0  # theirs: one per parameter per step
    if name != "paged_adamw_32bit":
        assert their_counts["8bit"] == 9 and our_counts["8bit"] == 3  # 3 steps x 3 parameters with 8-bit state
    for got, want in zip(ours, theirs):
        assert torch.equal(got, want)


def test_8bit_optimizer_in_one_call_takes_a_step_without_a_gradient_and_replaced_weights_as_bitsandbytes() -> None:
    """A parameter without a gradient in one step is skipped (as bitsandbytes does, its step count stays
    behind), and a weight whose .data was replaced between steps is updated where it now lives."""
    results = []
    for make in (_ours, _bnb_reference):
        params, generator = _fresh_params()
        optimizer = make("adamw_8bit", params)
        _run_steps(optimizer, params, generator, steps=2, skip_grad=2)
        params[3].data = params[3].data.clone() * 0.5
        _run_steps(optimizer, params, generator, steps=2)
        results.append([p.detach().clone() for p in params])
    for got, want in zip(*results):
        assert torch.equal(got, want)


@pytest.mark.parametrize("source", ["ours", "bitsandbytes"])
def test_8bit_optimizer_state_dict_resumes_bit_for_bit(source: str) -> None:
    """A state dict saved after 2 steps (ours, or bitsandbytes' own per-parameter one) loads into our
    optimizer on fresh parameters, and the 3rd step equals an uninterrupted run's."""
    params, generator = _fresh_params()
    uninterrupted = _ours("paged_adamw_8bit", params)
    _run_steps(uninterrupted, params, generator, steps=3)

    saved_params, generator = _fresh_params()
    first = (_ours if source == "ours" else _bnb_reference)("paged_adamw_8bit", saved_params)
    _run_steps(first, saved_params, generator, steps=2)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert len(state["state"]) == len(OPTIMIZER_SHAPES)  # bitsandbytes' per-parameter format

    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in saved_params]
    resumed = _ours("paged_adamw_8bit", resumed_params)
    resumed.load_state_dict(state)
    _run_steps(resumed, resumed_params, generator, steps=1)
    for got, want in zip(resumed_params, params):
        assert torch.equal(got, want)


def test_cpu_qlora_recipe_trains_evals_and_merges(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """recipe=qlora_tiny_cpu on the built-in tiny Llama: trains, saves, and `peftctl merge` writes a
    dense model whose logits match the adapted 4-bit model's (see the tolerance note below)."""
    import json

    from transformers import AutoModelForCausalLM

    from peftctl.export.merge import merge
    from peftctl.runs import load_adapted, open_source
    from peftctl.train.run import train

    run = train(
        [
            "recipe=qlora_tiny_cpu",
            f"output_dir={tmp_path / 'q'}",
            "train.max_steps=6",
            "train.log_every=3",
            "dataset.max_samples=48",
            "eval.num_generate=0",
        ],
        quiet=True,
    )
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [3, 6]
    assert all(r["loss"] == r["loss"] for r in records if "loss" in r)
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["peft_type"] == "LORA"

    adapted, _ = load_adapted(open_source(run), "cpu")
    assert any(is_4bit(m) for m in adapted.modules())
    ids = torch.randint(3, 200, (2, 24))
    with torch.no_grad():
        adapted_logits = adapted(input_ids=ids).logits.float()
        with adapted.disable_adapter():
            base_logits = adapted(input_ids=ids).logits.float()
    out = merge(run, tmp_path / "merged", quiet=False)
    assert "base was nf4 4-bit (float32 compute): dequantized, merged and written in float32" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any(is_4bit(m) for m in merged.modules())
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits.float()
    # Tolerance: the merged weight is deq(Q) + s·BA exactly (fp32, no re-quantization), so the only
    # difference from base(x) + s·B(Ax) is fp32 summation order: ~1e-6. A re-quantized merge
    # would differ at the 4-bit level, i.e. of the order of the adapter's own effect.
    err, effect = _rel(merged_logits, adapted_logits), _rel(base_logits, adapted_logits)
    assert err < 1e-4 and effect > 1e-3
    bf16 = merge(run, tmp_path / "merged_bf16", dtype="bfloat16", quiet=True)
    merged16 = AutoModelForCausalLM.from_pretrained(bf16, dtype="auto")
    assert merged16.dtype == torch.bfloat16
    with torch.no_grad():
        err16 = _rel(merged16(input_ids=ids).logits.float(), adapted_logits)
        # what running in bf16 costs by itself: the exact fp32 merge, cast to bf16 afterwards
        cast_err = _rel(merged.to(torch.bfloat16)(input_ids=ids).logits.float(), adapted_logits)
    # a bf16 merge adds one rounding of deq(W)+ΔW (<= 2^-9 relative per weight) to what bf16
    # execution costs anyway (bf16 activations: 1e-3..1e-2 per op, METHOD.md): it must stay at that level
    assert err16 < 1.5 * cast_err + 1e-3 and err16 < 5e-2
    # optional re-quantized output: loads as a 4-bit model; a second nf4 rounding, so its logits
    # sit at the quantization level from the adapted model's (well within the adapter's own effect)
    requant = merge(run, tmp_path / "merged_nf4", requantize="nf4", quiet=True)
    model_q = AutoModelForCausalLM.from_pretrained(requant)
    assert any(is_4bit(m) for m in model_q.modules())
    with torch.no_grad():
        err_q = _rel(model_q(input_ids=ids).logits.float(), adapted_logits)
    assert err < err_q < 0.5


UNQUANTIZED_RUN = """
import sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from peftctl.adapters.core.model import get_adapted_model
from peftctl.adapters.lora import LoraConfig
from peftctl.models.quantized import is_4bit
model = LlamaForCausalLM(LlamaConfig(**TINY))
adapted = get_adapted_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
adapted(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
merged = adapted.merge_and_unload()
print("imported by an unquantized run:", "bitsandbytes" in sys.modules)
from peftctl.models.quantization import quantize_linear
layer = quantize_linear(torch.nn.Linear(64, 64), "nf4", torch.float32)
print("a Linear4bit is 4-bit:", is_4bit(layer), is_4bit(merged.model.layers[0].self_attn.q_proj))
"""


def test_an_unquantized_lora_run_never_imports_bitsandbytes() -> None:
    """The quantized-layer checks that every LoRA layer runs (read_weight, merge) look bitsandbytes up among the
    imported modules instead of importing it (its import: seconds, and a warning line on CPUs without its optional
    kernels package); once it is imported they still recognise its layers."""
    import subprocess
    import sys

    code = f"TINY = {TINY!r}\n" + UNQUANTIZED_RUN
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "imported by an unquantized run: False" in done.stdout, done.stdout
    assert "a Linear4bit is 4-bit: True False" in done.stdout, done.stdout
