"""LoHa on Linear, Conv2d and Conv1d (plain and use_effective_conv2d): identity init, ΔW formula,
merge, save/load, trainability, PEFT interop (format checked against peft 0.21.2)."""

from __future__ import annotations

import pytest
import torch

from peftctl.adapters import get_adapted_model
from peftctl.adapters.loha import LoHaConfig, LoHaLayer
from tests.unit._method_checks import (
    check_identity,
    check_merge_roundtrip,
    check_multi_adapter,
    check_only_adapter_trains,
    check_save_load,
    check_yaml,
    conv1d_input,
    conv_input,
    input_ids,
    interop_both_ways,
    perturb,
    tiny_conv,
    tiny_conv1d,
    tiny_llama,
)

LLAMA = dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, alpha=8)
CONV = dict(task_type=None, target_modules=["conv1", "conv2", "lin"], r=2, alpha=4)


def test_identity_linear_and_conv():
    check_identity(tiny_llama, LoHaConfig(**LLAMA), input_ids())
    check_identity(tiny_conv, LoHaConfig(**CONV, use_effective_conv2d=True), conv_input())


def test_delta_formula_linear():
    adapted = get_adapted_model(tiny_llama(), LoHaConfig(**LLAMA, init_weights=False, rank_pattern={"v_proj": 2}))
    layers = dict(adapted.adapter_layers())
    q = layers["model.layers.0.self_attn.q_proj"]
    assert isinstance(q, LoHaLayer)
    expected = (
        (q.hada_w1_a["default"] @ q.hada_w1_b["default"]) * (q.hada_w2_a["default"] @ q.hada_w2_b["default"]) * 8 / 4
    )
    assert torch.allclose(q.get_delta_weight("default"), expected)
    x = torch.randn(3, 32)
    assert torch.allclose(q(x), q.base_layer(x) + x @ expected.T, atol=1e-5)
    v = layers["model.layers.0.self_attn.v_proj"]
    assert v.hada_w1_a["default"].shape == (16, 2) and v.scaling["default"] == 4.0


def test_effective_conv_shapes():
    adapted = get_adapted_model(tiny_conv(), LoHaConfig(**CONV, use_effective_conv2d=True))
    layers = dict(adapted.adapter_layers())
    assert layers["conv1"].hada_t1["default"].shape == (2, 2, 3, 3)
    assert "default" not in layers["conv2"].hada_t1  # 1x1 kernels use the flat form, as PEFT
    assert layers["conv2"].hada_w1_a["default"].shape == (8, 2)


@pytest.mark.parametrize("effective", [False, True])
def test_merge_conv(effective):
    adapted = get_adapted_model(tiny_conv(), LoHaConfig(**CONV, use_effective_conv2d=effective))
    perturb(adapted)
    check_merge_roundtrip(adapted, conv_input())


def test_merge_save_load_trainable(tmp_path):
    adapted = get_adapted_model(tiny_llama(), LoHaConfig(**LLAMA))
    check_only_adapter_trains(adapted, ("hada_",))
    perturb(adapted)
    check_save_load(adapted, tiny_llama, input_ids(), tmp_path)
    check_merge_roundtrip(adapted, input_ids())


def test_peft_interop_llama(tmp_path):
    from peft import LoHaConfig as PeftLoHaConfig

    interop_both_ways(LoHaConfig(**LLAMA), PeftLoHaConfig(**LLAMA), tiny_llama, input_ids(), tmp_path)


def test_peft_interop_conv_effective(tmp_path):
    from peft import LoHaConfig as PeftLoHaConfig

    interop_both_ways(
        LoHaConfig(**CONV, use_effective_conv2d=True),
        PeftLoHaConfig(**CONV, use_effective_conv2d=True),
        tiny_conv,
        conv_input(),
        tmp_path,
    )


def test_multi_adapter_add_set_save_load_delete(tmp_path):
    check_multi_adapter(tiny_llama, lambda: LoHaConfig(**LLAMA), input_ids(), tmp_path)


def test_yaml_config():
    check_yaml("loha")


@pytest.mark.parametrize("effective", [False, True])
def test_conv1d_identity_delta_merge_save_load(effective, tmp_path):
    import torch.nn.functional as F

    config = LoHaConfig(**CONV, use_effective_conv2d=effective)
    check_identity(tiny_conv1d, config, conv1d_input())
    adapted = get_adapted_model(tiny_conv1d(), config)
    layers = dict(adapted.adapter_layers())
    conv1, conv2 = layers["conv1"], layers["conv2"]
    if effective:  # PEFT's layout: the kernel k as a (k, 1) CP core; kernel 1 stays flat
        assert conv1.hada_t1["default"].shape == (2, 2, 3, 1) and conv1.hada_w1_a["default"].shape == (2, 32)
    else:
        assert conv1.hada_w1_b["default"].shape == (2, 4 * 3)
    assert "default" not in conv2.hada_t1
    perturb(adapted)
    x = torch.randn(2, 4, 10)
    delta = conv1.get_delta_weight("default")
    assert delta.shape == (32, 4, 3)
    expected = F.conv1d(x, conv1.base_layer.weight + delta, conv1.base_layer.bias, padding=1)
    assert torch.allclose(conv1(x), expected, atol=1e-5)
    check_save_load(adapted, tiny_conv1d, conv1d_input(), tmp_path)
    check_merge_roundtrip(adapted, conv1d_input())


@pytest.mark.parametrize("effective", [False, True])
def test_peft_interop_conv1d(tmp_path, effective):
    from peft import LoHaConfig as PeftLoHaConfig

    interop_both_ways(
        LoHaConfig(**CONV, use_effective_conv2d=effective),
        PeftLoHaConfig(**CONV, use_effective_conv2d=effective),
        tiny_conv1d,
        conv1d_input(),
        tmp_path,
    )
