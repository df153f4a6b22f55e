"""OFT on Linear / GPT-2 Conv1D / Conv2d: identity init, orthogonal blocks (exact Cayley), COFT,
block_share, merge, save/load, trainability, PEFT interop (format checked against peft 0.21.2)."""

from __future__ import annotations

import pytest
import torch

from peftctl.adapters import get_adapted_model
from peftctl.adapters.oft import OFTConfig, OFTConv2d, OFTLinear, cayley, skew
from peftctl.errors import ConfigError
from tests.unit._method_checks import (
    check_identity,
    check_merge_roundtrip,
    check_multi_adapter,
    check_only_adapter_trains,
    check_save_load,
    check_yaml,
    conv_input,
    input_ids,
    interop_both_ways,
    perturb,
    rel_err,
    run,
    tiny_conv,
    tiny_llama,
)

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
    per_block = 1e-3 / blocks**0.5
    # ||R - I|| is about 2||Q|| for small Q; Q was projected into the eps ball
    assert (rot - torch.eye(32)).norm() <= 2.5 * per_block * blocks**0.5
    assert torch.allclose(rot @ rot.T, torch.eye(32), atol=1e-5)


def test_save_load_trainable(tmp_path):
    adapted = get_adapted_model(tiny_llama(), cfg())
    assert isinstance(dict(adapted.adapter_layers())["model.layers.0.self_attn.q_proj"], OFTLinear)
    check_only_adapter_trains(adapted, ("oft_R",))
    perturb(adapted)
    check_save_load(adapted, tiny_llama, input_ids(), tmp_path)


@pytest.mark.parametrize(
    "kw",
    [{"use_cayley_neumann": False}, {"use_cayley_neumann": True}, {"block_share": True, "use_cayley_neumann": False}],
)
def test_peft_interop(tmp_path, kw):
    from peft import OFTConfig as PeftOFTConfig

    interop_both_ways(
        OFTConfig(target_modules=TARGETS, oft_block_size=8, **kw),
        PeftOFTConfig(target_modules=TARGETS, oft_block_size=8, **kw),
        tiny_llama,
        input_ids(),
        tmp_path,
    )


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


# ---------------------------------------------------------------- Conv2d
# conv1 is 3x3 (4 -> 8): R acts on 4·3·3 = 36 values, 9 blocks of 4; conv2 is 1x1 (8 -> 8).
CONV = dict(task_type=None, target_modules=["conv1", "conv2", "lin"], oft_block_size=4, use_cayley_neumann=False)


def test_conv2d_identity_formula_merge_save_load(tmp_path):
    import torch.nn.functional as F

    check_identity(tiny_conv, OFTConfig(**CONV), conv_input())
    adapted = get_adapted_model(tiny_conv(), OFTConfig(**CONV))
    conv1 = dict(adapted.adapter_layers())["conv1"]
    assert isinstance(conv1, OFTConv2d) and conv1.r["default"] == 9 and conv1.oft_R["default"].weight.shape == (9, 6)
    check_only_adapter_trains(adapted, ("oft_R",))
    perturb(adapted, scale=0.3)
    rot = conv1.rotation_matrix("default")
    assert torch.allclose(rot @ rot.T, torch.eye(36), atol=1e-5)
    w = conv1.base_layer.weight
    x = torch.randn(2, 4, 5, 5)
    expected = F.conv2d(x, (w.flatten(1) @ rot.T).reshape(w.shape), conv1.base_layer.bias, padding=1)
    assert torch.allclose(conv1(x), expected, atol=1e-5)
    check_save_load(adapted, tiny_conv, conv_input(), tmp_path)
    before = w.detach().clone()
    adapted.merge_adapter()
    assert torch.allclose(conv1.base_layer.weight, (before.flatten(1) @ rot.T).reshape(before.shape), atol=1e-6)
    adapted.unmerge_adapter()
    assert torch.allclose(conv1.base_layer.weight, before, atol=1e-5)
    check_merge_roundtrip(adapted, conv_input())


def test_conv2d_two_active_adapters_and_grouped_conv_refused():
    adapted = get_adapted_model(tiny_conv(), OFTConfig(**CONV))
    adapted.add_adapter("other", OFTConfig(**CONV))
    perturb(adapted, "default")
    perturb(adapted, "other", seed=8)
    adapted.set_adapter(["default", "other"])
    check_merge_roundtrip(adapted, conv_input())
    grouped = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, groups=2))
    with pytest.raises(ConfigError, match="groups=2"):
        get_adapted_model(grouped, OFTConfig(task_type=None, target_modules=["0"], oft_block_size=4))


@pytest.mark.parametrize("kw", [{"use_cayley_neumann": False}, {"use_cayley_neumann": True}, {"block_share": True}])
def test_conv2d_1x1_peft_interop(tmp_path, kw):
    """1x1 kernels: peft's unmerged forward is exact, so logits match both ways."""
    from peft import OFTConfig as PeftOFTConfig

    kw = {**CONV, "target_modules": ["conv2", "lin"], **kw}
    interop_both_ways(OFTConfig(**kw), PeftOFTConfig(**kw), tiny_conv, conv_input(), tmp_path)


@pytest.mark.parametrize("kw", [{"use_cayley_neumann": False}, {"use_cayley_neumann": True}, {"block_share": True}])
def test_conv2d_3x3_peft_interop_against_peft_merged(tmp_path, kw):
    """3x3 kernels: peft 0.21.2's unmerged Conv2d forward is not W Rᵀ (see oft.py), so the
    oracle is peft's merged model (W Rᵀ, computed by peft from the same saved tensors)."""
    from peft import OFTConfig as PeftOFTConfig
    from peft import PeftModel, get_peft_model

    kw = {**CONV, **kw}
    x = conv_input()
    adapted = get_adapted_model(tiny_conv(), OFTConfig(**kw))
    perturb(adapted)
    assert rel_err(run(adapted, x), run(tiny_conv(), x)) > 1e-3, "the adapter must change the output"
    adapted.save_pretrained(tmp_path / "ours")
    theirs = PeftModel.from_pretrained(tiny_conv(), str(tmp_path / "ours")).eval()
    assert rel_err(run(theirs.merge_and_unload(), x), run(adapted, x)) <= 1e-5

    theirs = get_peft_model(tiny_conv(), PeftOFTConfig(**kw)).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    from peftctl.adapters import AdaptedModel

    ours = AdaptedModel.from_pretrained(tiny_conv(), tmp_path / "theirs")
    assert rel_err(run(ours, x), run(theirs.merge_and_unload(), x)) <= 1e-5
