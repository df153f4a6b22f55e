"""Bottleneck (Houlsby) adapters: identity init, residual formula after attention / MLP, not
mergeable (AdapterError naming the method), save/load under peft_type BOTTLENECK (peftctl's own
type: PEFT 0.21.2 has none), trainability."""

from __future__ import annotations

import json

import pytest
import torch

from peftctl.adapters import get_adapted_model
from peftctl.adapters.bottleneck import BottleneckConfig, BottleneckLayer
from peftctl.errors import AdapterError, ConfigError
from tests.unit._method_checks import (
    check_identity,
    check_multi_adapter,
    check_only_adapter_trains,
    check_save_load,
    check_yaml,
    input_ids,
    perturb,
    rel_err,
    run,
    tiny_llama,
)


def test_identity_and_default_targets():
    check_identity(tiny_llama, BottleneckConfig(bottleneck_size=8), input_ids())
    adapted = get_adapted_model(tiny_llama(), BottleneckConfig(bottleneck_size=8))
    names = sorted(n for n, _ in adapted.adapter_layers())
    assert names == [f"model.layers.{i}.{m}" for i in (0, 1) for m in ("mlp", "self_attn")]
    with pytest.raises(ConfigError, match="non_linearity"):
        BottleneckConfig.from_dict({"non_linearity": "swish9"})


def test_residual_formula_on_mlp():
    adapted = get_adapted_model(
        tiny_llama(), BottleneckConfig(bottleneck_size=8, non_linearity="gelu", scaling=0.5, target_modules=["mlp"])
    )
    perturb(adapted)
    layer = dict(adapted.adapter_layers())["model.layers.0.mlp"]
    assert isinstance(layer, BottleneckLayer)
    x = torch.randn(2, 5, 32)
    h = layer.base_layer(x)
    down, up = layer.bottleneck_down["default"], layer.bottleneck_up["default"]
    expected = h + 0.5 * (torch.nn.functional.gelu(h @ down.weight.T + down.bias) @ up.weight.T + up.bias)
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_attention_tuple_output_and_disable():
    adapted = get_adapted_model(tiny_llama(), BottleneckConfig(bottleneck_size=4, target_modules=["self_attn"]))
    perturb(adapted)
    ids = input_ids()
    with adapted.disable_adapter():
        base = run(adapted, ids)
    assert rel_err(run(adapted, ids), base) > 1e-4
    assert torch.allclose(base, run(tiny_llama(), ids), atol=1e-6)


def test_merge_refused_clearly():
    adapted = get_adapted_model(tiny_llama(), BottleneckConfig(bottleneck_size=4))
    perturb(adapted)
    out = run(adapted, input_ids())
    with pytest.raises(AdapterError, match="bottleneck"):
        adapted.merge_adapter()
    with pytest.raises(AdapterError, match="bottleneck"):
        adapted.merge_and_unload()
    with pytest.raises(AdapterError, match="bottleneck"):
        adapted.merge_and_unload(safe_merge=True)
    assert torch.equal(run(adapted, input_ids()), out)  # nothing was changed
    plain = adapted.unload()
    assert torch.allclose(run(plain, input_ids()), run(tiny_llama(), input_ids()), atol=1e-6)


def test_save_load_trainable(tmp_path):
    adapted = get_adapted_model(tiny_llama(), BottleneckConfig(bottleneck_size=4))
    check_only_adapter_trains(adapted, ("bottleneck_down", "bottleneck_up"))
    perturb(adapted)
    check_save_load(adapted, tiny_llama, input_ids(), tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BOTTLENECK" and saved["bottleneck_size"] == 4
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.mlp.bottleneck_up.weight" in keys


def test_multi_adapter_add_set_save_load_delete(tmp_path):
    check_multi_adapter(tiny_llama, lambda: BottleneckConfig(bottleneck_size=4), input_ids(), tmp_path, mergeable=False)


def test_yaml_config():
    check_yaml("bottleneck")
