"""(IA)³: identity init, merge incl. bias, save/load, trainability, PEFT interop (format checked
against peft 0.21.2)."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from peftctl.adapters import get_adapted_model
from peftctl.adapters.ia3 import IA3Config, IA3Linear
from tests.unit._method_checks import (
    check_identity,
    check_merge_roundtrip,
    check_multi_adapter,
    check_only_adapter_trains,
    check_save_load,
    check_yaml,
    input_ids,
    interop_both_ways,
    ours_to_peft,
    peft_to_ours,
    perturb,
    rel_err,
    run,
    tiny_llama,
)

TARGETS = ["k_proj", "v_proj", "down_proj"]


def cfg(**kw) -> IA3Config:
    return IA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"], **kw)


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=300)).eval()


def test_identity_shapes_and_defaults():
    check_identity(tiny_llama, cfg(), input_ids())
    adapted = get_adapted_model(tiny_llama(), IA3Config())  # llama defaults as PEFT
    layers = dict(adapted.adapter_layers())
    ff = layers["model.layers.0.mlp.down_proj"]
    assert isinstance(ff, IA3Linear) and ff.is_feedforward and ff.ia3_l["default"].shape == (1, 64)
    assert layers["model.layers.0.self_attn.k_proj"].ia3_l["default"].shape == (16, 1)
    assert torch.equal(ff.ia3_l["default"], torch.ones(1, 64))


def test_forward_formula():
    adapted = get_adapted_model(tiny_llama(), cfg(init_ia3_weights=False))
    layer = dict(adapted.adapter_layers())["model.layers.0.mlp.down_proj"]
    x = torch.randn(3, 64)
    expected = layer.base_layer(x * layer.ia3_l["default"].flatten())
    assert torch.allclose(layer(x), expected)
    k = dict(adapted.adapter_layers())["model.layers.0.self_attn.k_proj"]
    x = torch.randn(3, 32)
    assert torch.allclose(k(x), k.base_layer(x) * k.ia3_l["default"].flatten())


def test_merge_llama_and_gpt2_with_bias(tmp_path):
    ids = input_ids()
    check_merge_roundtrip(get_adapted_model(tiny_llama(), cfg(init_ia3_weights=False)), ids)
    # GPT-2: Conv1D (transposed weight) and c_attn has a bias that must be scaled on merge
    gpt = get_adapted_model(tiny_gpt2(), IA3Config(init_ia3_weights=False))
    bias_before = gpt.model.transformer.h[0].attn.c_attn.base_layer.bias.clone()
    out = run(gpt, ids)
    gpt.merge_adapter()
    assert rel_err(run(gpt, ids), out) <= 1e-5
    gpt.unmerge_adapter()
    assert torch.allclose(gpt.model.transformer.h[0].attn.c_attn.base_layer.bias, bias_before, atol=1e-6)
    check_merge_roundtrip(gpt, ids)


def test_save_load_and_trainable(tmp_path):
    adapted = get_adapted_model(tiny_llama(), cfg())
    check_only_adapter_trains(adapted, ("ia3_l",))
    perturb(adapted)
    check_save_load(adapted, tiny_llama, input_ids(), tmp_path)


def test_peft_interop_both_ways(tmp_path):
    from peft import IA3Config as PeftIA3Config

    adapted = get_adapted_model(tiny_llama(), cfg())
    perturb(adapted)
    ours_to_peft(adapted, tiny_llama, input_ids(), tmp_path / "ours")
    peft_cfg = PeftIA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"])
    ours = peft_to_ours(peft_cfg, tiny_llama, input_ids(), tmp_path / "theirs")
    assert ours.peft_config["default"].is_feedforward("model.layers.1.mlp.down_proj")


def test_multi_adapter_add_set_save_load_delete(tmp_path):
    check_multi_adapter(tiny_llama, lambda: cfg(), input_ids(), tmp_path)


def test_conv2d_merge_and_peft(tmp_path):
    from peft import IA3Config as PeftIA3Config

    from tests.unit._method_checks import conv_input, tiny_conv

    kw = dict(task_type=None, target_modules=["conv1", "conv2", "lin"], feedforward_modules=["conv2"])
    adapted = get_adapted_model(tiny_conv(), IA3Config(**kw, init_ia3_weights=False))
    layers = dict(adapted.adapter_layers())
    assert layers["conv1"].ia3_l["default"].shape == (1, 8, 1, 1) and layers["conv2"].is_feedforward
    check_merge_roundtrip(adapted, conv_input())
    interop_both_ways(IA3Config(**kw), PeftIA3Config(**kw), tiny_conv, conv_input(), tmp_path)


def test_yaml_config():
    check_yaml("ia3")
