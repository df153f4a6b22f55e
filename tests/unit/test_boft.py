"""BOFT on Linear and Conv2d: identity init, orthogonal butterfly product, butterfly permutation
as PEFT, merge, save/load, trainability, PEFT interop (format checked against peft 0.21.2;
peft without its CUDA extension uses one butterfly factor, so interop is checked with m = 1)."""

from __future__ import annotations

import pytest
import torch

from peftctl.adapters import get_adapted_model
from peftctl.adapters.boft import BOFTConfig, BOFTLayer, butterfly_perm
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
    ours_to_peft,
    peft_to_ours,
    perturb,
    tiny_conv,
    tiny_llama,
)

LLAMA = dict(target_modules=["q_proj", "v_proj", "down_proj"], boft_block_size=4)
CONV = dict(task_type=None, target_modules=["conv1", "conv2", "lin"], boft_block_size=4)


def test_identity_and_errors():
    check_identity(tiny_llama, BOFTConfig(**LLAMA, boft_n_butterfly_factor=2), input_ids())
    check_identity(tiny_conv, BOFTConfig(**CONV), conv_input())
    with pytest.raises(ConfigError, match="boft_block_num"):
        BOFTConfig.from_dict({"boft_block_size": 4, "boft_block_num": 2})
    with pytest.raises(ConfigError, match="boft_block_size=5"):
        get_adapted_model(tiny_llama(), BOFTConfig(target_modules=["q_proj"], boft_block_size=5))


def test_butterfly_perm_matches_peft():
    from peft.tuners.boft.layer import BOFTLayer as PeftBOFTLayer

    for n, blocks, half, levels in [(32, 8, 2, 1), (32, 4, 2, 2), (64, 4, 4, 3), (16, 2, 2, 1)]:
        expected = PeftBOFTLayer.block_butterfly_perm(None, n, blocks, half, levels)
        assert torch.equal(butterfly_perm(n, blocks, half, levels), expected)


@pytest.mark.parametrize("factors", [1, 2, 3])
def test_orthogonal_and_merge_linear(factors):
    adapted = get_adapted_model(tiny_llama(), BOFTConfig(**LLAMA, boft_n_butterfly_factor=factors))
    perturb(adapted, scale=0.3)
    layer = dict(adapted.adapter_layers())["model.layers.0.mlp.down_proj"]
    assert isinstance(layer, BOFTLayer) and layer.boft_R["default"].shape == (factors, 16, 4, 4)
    for _, lay in adapted.adapter_layers():
        rot = lay.rotation_matrix("default")
        assert torch.allclose(rot @ rot.T, torch.eye(rot.shape[0]), atol=1e-5)
    x = torch.randn(3, 64)
    rot, s = layer.rotation_matrix("default"), layer.boft_s["default"].view(-1)
    expected = layer.base_layer(x @ rot) * s  # llama Linear has no bias
    assert torch.allclose(layer(x), expected, atol=1e-5)
    check_merge_roundtrip(adapted, input_ids())


def test_conv_merge_save_load_trainable(tmp_path):
    adapted = get_adapted_model(tiny_conv(), BOFTConfig(**{**CONV, "boft_block_size": 2}, boft_n_butterfly_factor=2))
    check_only_adapter_trains(adapted, ("boft_R", "boft_s"))
    perturb(adapted)
    conv1 = dict(adapted.adapter_layers())["conv1"]
    assert conv1.boft_R["default"].shape == (2, 18, 2, 2) and conv1.boft_s["default"].shape == (1, 8)
    check_save_load(adapted, tiny_conv, conv_input(), tmp_path)
    check_merge_roundtrip(adapted, conv_input())


def test_dropout_only_in_training():
    adapted = get_adapted_model(tiny_llama(), BOFTConfig(**LLAMA, boft_dropout=0.5))
    perturb(adapted, scale=0.3)
    layer = dict(adapted.adapter_layers())["model.layers.0.self_attn.q_proj"]
    rot = layer.rotation_matrix("default")
    layer.train()
    dropped = layer.rotation_matrix("default")
    assert not torch.allclose(dropped, rot)
    assert torch.allclose(dropped @ dropped.T, torch.eye(32), atol=1e-5)
    layer.eval()
    assert torch.equal(layer.rotation_matrix("default"), rot)


def test_peft_interop_linear_and_conv(tmp_path):
    from peft import BOFTConfig as PeftBOFTConfig

    interop_both_ways(BOFTConfig(**LLAMA), PeftBOFTConfig(**LLAMA), tiny_llama, input_ids(), tmp_path)
    conv = get_adapted_model(tiny_conv(), BOFTConfig(**CONV))
    perturb(conv)
    ours_to_peft(conv, tiny_conv, conv_input(), tmp_path / "ours_conv")
    peft_to_ours(PeftBOFTConfig(**CONV), tiny_conv, conv_input(), tmp_path / "theirs_conv")


def test_multi_adapter_add_set_save_load_delete(tmp_path):
    check_multi_adapter(tiny_conv, lambda: BOFTConfig(**CONV), conv_input(), tmp_path)


def test_yaml_config():
    check_yaml("boft")


@pytest.mark.parametrize("factors", [2, 6])
def test_loads_peft_file_with_one_factor_fallback(factors, tmp_path, monkeypatch):
    """peft without its CUDA extension builds (and saves) one butterfly factor while its
    adapter_config.json still says boft_n_butterfly_factor=m: such a file loads here as in peft,
    with one factor and a warning, and gives peft's logits. (m = 6 does not even fit the layers'
    dimensions with block size 4; peft's fallback never checks it, and neither does loading.)"""
    import peft.tuners.boft.layer as peft_boft
    from peft import BOFTConfig as PeftBOFTConfig
    from peft import get_peft_model

    from peftctl.adapters import AdaptedModel
    from peftctl.adapters.core.persistence import read_adapter_config, read_adapter_weights

    monkeypatch.setattr(peft_boft, "get_fbd_cuda", lambda: None)  # the fallback on any machine, CUDA or not
    theirs = get_peft_model(
        tiny_llama(), PeftBOFTConfig(**LLAMA, boft_n_butterfly_factor=factors, init_weights=False)
    ).eval()
    theirs.save_pretrained(str(tmp_path))
    saved = read_adapter_weights(tmp_path)
    assert read_adapter_config(tmp_path)["boft_n_butterfly_factor"] == factors
    assert all(t.shape[0] == 1 for k, t in saved.items() if "boft_R" in k)  # the scenario: one factor on disk
    if factors == 6:
        with pytest.raises(ConfigError, match="boft_n_butterfly_factor=6"):
            get_adapted_model(tiny_llama(), BOFTConfig(**LLAMA, boft_n_butterfly_factor=6))
    with pytest.warns(UserWarning, match=f"boft_n_butterfly_factor={factors} but its tensors hold 1 butterfly factor"):
        ours = AdaptedModel.from_pretrained(tiny_llama(), tmp_path)
    assert ours.peft_config["default"].boft_n_butterfly_factor == 1
    assert dict(ours.adapter_layers())["model.layers.0.mlp.down_proj"].boft_R["default"].shape == (1, 16, 4, 4)
    x = input_ids()
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=x).logits, theirs(input_ids=x).logits, atol=1e-5)
    ours.save_pretrained(tmp_path / "resaved")  # what we write again is consistent: config says 1
    assert read_adapter_config(tmp_path / "resaved")["boft_n_butterfly_factor"] == 1


def test_factor_two_tensors_still_load_and_wrong_shapes_refused(tmp_path):
    from safetensors.torch import save_file

    from peftctl.adapters import AdaptedModel
    from peftctl.adapters.core.persistence import WEIGHTS_NAME, read_adapter_weights

    adapted = get_adapted_model(tiny_llama(), BOFTConfig(**LLAMA, boft_n_butterfly_factor=2))
    perturb(adapted)
    adapted.save_pretrained(tmp_path)
    again = AdaptedModel.from_pretrained(tiny_llama(), tmp_path)  # no warning path: shapes fit m = 2
    assert again.peft_config["default"].boft_n_butterfly_factor == 2
    x = input_ids()
    with torch.no_grad():
        assert torch.allclose(again(input_ids=x).logits, adapted(input_ids=x).logits, atol=1e-6)
    tensors = read_adapter_weights(tmp_path)
    key = next(k for k in tensors if "boft_R" in k)
    tensors[key] = tensors[key][:, :8].contiguous()  # fits neither factor: still refused
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(ConfigError, match="boft_R"):
        AdaptedModel.from_pretrained(tiny_llama(), tmp_path)
