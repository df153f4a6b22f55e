"""OFT: identity init, orthogonal blocks (exact Cayley), COFT, block_share, merge, save/load,
trainability, PEFT interop (format checked against peft 0.21.2)."""
from __future__ import annotations

import pytest
import torch

from peftctl.adapters import get_adapted_model
from peftctl.adapters.oft import OFTConfig, OFTLinear, cayley, skew
from peftctl.errors import ConfigError
from tests.unit._method_checks import (check_yaml, check_multi_adapter, check_identity, check_merge_roundtrip, check_only_adapter_trains, check_save_load,
                                       input_ids, ours_to_peft, peft_to_ours, perturb, tiny_llama)

TARGETS = ["q_proj", "v_proj", "down_proj"]


def cfg(**kw) -> OFTConfig:
    kw.setdefault("oft_block_size", 8)
    return OFTConfig(target_modules=TARGETS, use_cayley_neumann=False, **kw)


def test_identity_and_config_errors():
    check_identity(tiny_llama, cfg(), input_ids())
    with pytest.raises(ConfigError, match="oft_block_size"):
        OFTConfig.from_dict({"r": 4, "oft_block_size": 8})


@pytest.mark.parametrize("kw", [{}, {"block_share": True}, {"r": 4, "oft_block_size": 0}])
def test_rotation_orthogonal_and_merge(kw):
    adapted = get_adapted_model(tiny_llama(), cfg(**kw))
    perturb(adapted, scale=0.3)
    for _, layer in adapted.adapter_layers():
        rot = layer.rotation_matrix("default")
        eye = torch.eye(rot.shape[0])
        assert torch.allclose(rot @ rot.T, eye, atol=1e-5)
    layer = dict(adapted.adapter_layers())["model.layers.0.mlp.down_proj"]
    assert layer.oft_block_size["default"] * layer.r["default"] == 64
    x = torch.randn(3, 64)
    expected = layer.base_layer(x @ layer.rotation_matrix("default"))
    assert torch.allclose(layer(x), expected, atol=1e-5)
    check_merge_roundtrip(adapted, input_ids())


def test_cayley_formula():
    q = skew(torch.randn(2, 6), 4)
    eye = torch.eye(4)
    expected = (eye - q[0]) @ torch.linalg.inv(eye + q[0])
    assert torch.allclose(cayley(q)[0], expected, atol=1e-5)


def test_coft_keeps_rotation_near_identity():
    adapted = get_adapted_model(tiny_llama(), cfg(coft=True, eps=1e-3))
    perturb(adapted, scale=1.0)
    layer = dict(adapted.adapter_layers())["model.layers.0.self_attn.q_proj"]
    rot = layer.rotation_matrix("default")
    blocks = layer.r["default"]
    per_block = 1e-3 / blocks ** 0.5
    # ||R - I|| is about 2||Q|| for small Q; Q was projected into the eps ball
    assert (rot - torch.eye(32)).norm() <= 2.5 * per_block * blocks ** 0.5
    assert torch.allclose(rot @ rot.T, torch.eye(32), atol=1e-5)


def test_save_load_trainable(tmp_path):
    adapted = get_adapted_model(tiny_llama(), cfg())
    assert isinstance(dict(adapted.adapter_layers())["model.layers.0.self_attn.q_proj"], OFTLinear)
    check_only_adapter_trains(adapted, ("oft_R",))
    perturb(adapted)
    check_save_load(adapted, tiny_llama, input_ids(), tmp_path)


@pytest.mark.parametrize("kw", [{"use_cayley_neumann": False}, {"use_cayley_neumann": True}, {"block_share": True, "use_cayley_neumann": False}])
def test_peft_interop(tmp_path, kw):
    from peft import OFTConfig as PeftOFTConfig

    adapted = get_adapted_model(tiny_llama(), OFTConfig(target_modules=TARGETS, oft_block_size=8, **kw))
    perturb(adapted)
    ours_to_peft(adapted, tiny_llama, input_ids(), tmp_path / "ours")
    peft_to_ours(PeftOFTConfig(target_modules=TARGETS, oft_block_size=8, **kw), tiny_llama, input_ids(), tmp_path / "theirs")


def test_multi_adapter_add_set_save_load_delete(tmp_path):
    check_multi_adapter(tiny_llama, lambda: cfg(), input_ids(), tmp_path)


def test_gpt2_conv1d_merge_and_save(tmp_path):
    """peft 0.21.2's OFT refuses GPT-2 Conv1D; peftctl supports it (no interop to check)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=300)).eval()

    kw = dict(target_modules=["c_attn", "c_fc"], oft_block_size=8, use_cayley_neumann=False)
    adapted = get_adapted_model(gpt2(), OFTConfig(**kw))
    perturb(adapted)
    check_save_load(adapted, gpt2, input_ids(), tmp_path)
    check_merge_roundtrip(adapted, input_ids())


def test_two_active_adapters_merge_consistently():
    adapted = get_adapted_model(tiny_llama(), cfg())
    adapted.add_adapter("other", cfg())
    perturb(adapted, "default")
    perturb(adapted, "other", seed=8)
    adapted.set_adapter(["default", "other"])
    check_merge_roundtrip(adapted, input_ids())


def test_yaml_config():
    check_yaml("oft")
