"""LoRA invariants for every layer type and option (acceptance item 1).

The model has one module of each supported type (Embedding, Linear, Conv1d, GPT-2 Conv1D, Conv2d).
For each option: an identity init leaves outputs unchanged; with a non-identity adapter merged ==
unmerged (fp32, <= 1e-5 relative), unmerge restores the base weights, disabled == base, and
save -> load gives identical outputs.
"""

from __future__ import annotations

import math

import pytest
import torch
from _lora_fixtures import ALL_TARGETS, clone, ids, out, perturb_adapters, rel_err, tiny_all_types

from peftctl.adapters import AdaptedModel, get_adapted_model
from peftctl.adapters.lora import LoraConfig, LoraConv, LoraEmbedding, LoraLinear
from peftctl.errors import AdapterError, ConfigError

LINEAR_ONLY = ["lin", "c1d"]
OPTIONS = {
    "plain": dict(target_modules=ALL_TARGETS),
    "rslora": dict(target_modules=ALL_TARGETS, use_rslora=True, lora_alpha=6),
    "rank_alpha_pattern": dict(
        target_modules=ALL_TARGETS, rank_pattern={"lin": 2, "conv.*d": 3}, alpha_pattern={"c1d": 5.0}
    ),
    "dropout": dict(target_modules=ALL_TARGETS, lora_dropout=0.3),
    "dora": dict(target_modules=ALL_TARGETS, use_dora=True),
    "regex_exclude": dict(target_modules=r"(lin|conv\dd|c1d|emb)", exclude_modules=["conv1d"]),
    "modules_to_save": dict(target_modules=ALL_TARGETS, modules_to_save=["head"]),
    "fan_in_fan_out": dict(target_modules=["c1d"], fan_in_fan_out=True),
}
IDENTITY_INITS = [True, "gaussian"]


def _adapted(options: dict, init) -> tuple[torch.nn.Module, AdaptedModel]:
    base = tiny_all_types()
    torch.manual_seed(5)
    values = {"r": 4, "lora_alpha": 8, "init_lora_weights": init, **options}
    adapted = get_adapted_model(clone(base), LoraConfig(**values))
    return base, adapted.eval()


@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("init", IDENTITY_INITS)
def test_identity_init_leaves_outputs_unchanged(option: str, init) -> None:
    base, adapted = _adapted(OPTIONS[option], init)
    x = ids()
    assert torch.allclose(out(adapted, x), out(base, x), atol=1e-6)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_mutating_inits_leave_outputs_unchanged(init) -> None:
    base, adapted = _adapted(dict(target_modules=LINEAR_ONLY, r=2), init)
    x = ids()
    assert rel_err(out(adapted, x), out(base, x)) < 1e-5
    # the base weight really changed (it is now the residual)
    assert not torch.allclose(adapted.model.lin.base_layer.weight, base.lin.weight)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_mutating_init_save_load_on_original_base(init, tmp_path) -> None:
    """A PiSSA / OLoRA adapter saved as is re-derives the residual when loaded on the original base."""
    base, adapted = _adapted(dict(target_modules=LINEAR_ONLY, r=2), init)
    perturb_adapters(adapted)
    adapted.save_pretrained(tmp_path)
    loaded = AdaptedModel.from_pretrained(clone(base), tmp_path).eval()
    x = ids()
    assert rel_err(out(loaded, x), out(adapted, x)) <= 1e-5
    assert torch.allclose(loaded.model.lin.base_layer.weight, adapted.model.lin.base_layer.weight, atol=1e-6)


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_merge_unmerge_disable_save_load(option: str, tmp_path) -> None:
    base, adapted = _adapted(OPTIONS[option], False)
    perturb_adapters(adapted)
    x = ids()
    base_out = out(base, x)
    adapted_out = out(adapted, x)
    assert rel_err(adapted_out, base_out) > 1e-3, "the adapter must change the output"
    weights_before = {k: v.clone() for k, v in adapted.model.state_dict().items() if "base_layer" in k}

    adapted.merge_adapter()
    assert rel_err(out(adapted, x), adapted_out) <= 1e-5
    adapted.unmerge_adapter()
    for key, value in adapted.model.state_dict().items():
        if key in weights_before:
            assert torch.allclose(value, weights_before[key], atol=1e-6), key
    assert rel_err(out(adapted, x), adapted_out) <= 1e-6

    with adapted.disable_adapter():
        assert torch.allclose(out(adapted, x), base_out, atol=1e-6)
    adapted.disable_adapter_layers()
    assert torch.allclose(out(adapted, x), base_out, atol=1e-6)
    adapted.enable_adapter_layers()

    adapted.save_pretrained(tmp_path)
    loaded = AdaptedModel.from_pretrained(clone(base), tmp_path).eval()
    assert torch.equal(out(loaded, x), adapted_out)

    merged = adapted.merge_and_unload()
    assert rel_err(out(merged, x), adapted_out) <= 1e-5


def test_layer_classes_per_type() -> None:
    _, adapted = _adapted(dict(target_modules=ALL_TARGETS), True)
    m = adapted.model
    assert isinstance(m.emb, LoraEmbedding) and isinstance(m.lin, LoraLinear) and isinstance(m.c1d, LoraLinear)
    assert isinstance(m.conv1d, LoraConv) and isinstance(m.conv2d, LoraConv)
    assert m.c1d.fan_in_fan_out and not m.lin.fan_in_fan_out  # Conv1D detected
    # conv A copies kernel / stride / padding, B is 1x1
    assert m.conv2d.lora_A["default"].kernel_size == (3, 3) and m.conv2d.lora_B["default"].kernel_size == (1, 1)


def test_scaling_plain_rslora_and_patterns() -> None:
    _, adapted = _adapted(OPTIONS["rank_alpha_pattern"], True)
    m = adapted.model
    assert (m.lin.r["default"], m.lin.scaling["default"]) == (2, 8 / 2)
    assert (m.conv1d.r["default"], m.conv2d.r["default"]) == (3, 3)
    assert m.c1d.scaling["default"] == 5.0 / 4
    _, adapted = _adapted(OPTIONS["rslora"], True)
    assert math.isclose(adapted.model.lin.scaling["default"], 6 / math.sqrt(4))


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trainable_bias_is_saved_and_disabled_model_differs_from_base(bias: str, tmp_path) -> None:
    """bias=all/lora_only: the biases train, so the disabled model is the base *with the trained
    biases* (documented difference), and the biases travel with the adapter."""
    base, adapted = _adapted(dict(target_modules=LINEAR_ONLY, bias=bias), True)
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert "base_model.model.lin.base_layer.bias" in trainable
    assert ("base_model.model.conv2d.bias" in trainable) == (bias == "all")
    assert "base_model.model.lin.base_layer.weight" not in trainable
    perturb_adapters(adapted)
    x = ids()
    expected_base = clone(base)
    with torch.no_grad():
        expected_base.lin.bias.copy_(adapted.model.lin.base_layer.bias)
        expected_base.c1d.bias.copy_(adapted.model.c1d.base_layer.bias)
        if bias == "all":
            for name in ("conv1d", "conv2d", "head"):
                getattr(expected_base, name).bias.copy_(getattr(adapted.model, name).bias)
    with adapted.disable_adapter():
        disabled = out(adapted, x)
    assert rel_err(disabled, out(base, x)) > 1e-3
    assert torch.allclose(disabled, out(expected_base, x), atol=1e-6)
    saved = adapted.get_adapter_state_dict()
    assert "base_model.model.lin.base_layer.bias" in saved
    adapted.save_pretrained(tmp_path)
    loaded = AdaptedModel.from_pretrained(clone(base), tmp_path).eval()
    assert torch.equal(out(loaded, x), out(adapted, x))


def test_modules_to_save_copy_trains_and_merges(tmp_path) -> None:
    base, adapted = _adapted(dict(target_modules=["lin"], modules_to_save=["head"]), True)
    head = adapted.model.head
    assert head.modules_to_save["default"].weight.requires_grad and not head.base_layer.weight.requires_grad
    perturb_adapters(adapted)
    assert torch.equal(head.base_layer.weight, base.head.weight)  # the original is untouched
    keys = set(adapted.get_adapter_state_dict())
    assert {"base_model.model.head.weight", "base_model.model.head.bias"} <= keys  # PEFT's saved names
    x = ids()
    trained = out(adapted, x)
    merged = adapted.merge_and_unload()
    assert isinstance(merged.head, torch.nn.Linear)
    assert rel_err(out(merged, x), trained) <= 1e-5


def test_unload_returns_original_model() -> None:
    base, adapted = _adapted(dict(target_modules=ALL_TARGETS, modules_to_save=["head"]), False)
    perturb_adapters(adapted)
    plain = adapted.unload()
    assert not any("lora" in n or "modules_to_save" in n for n, _ in plain.named_modules())
    assert torch.allclose(out(plain, ids()), out(base, ids()), atol=1e-6)


def test_safe_merge_names_module_on_non_finite() -> None:
    base, adapted = _adapted(dict(target_modules=LINEAR_ONLY), False)
    with torch.no_grad():
        adapted.model.c1d.lora_B["default"].weight[0, 0] = float("inf")
    before = adapted.model.lin.base_layer.weight.clone()
    with pytest.raises(AdapterError, match="c1d"):
        adapted.merge_and_unload(safe_merge=True)
    assert torch.equal(adapted.model.lin.base_layer.weight, before)  # nothing written
    with pytest.raises(AdapterError, match="c1d"):
        adapted.merge_adapter(safe_merge=True)
    assert torch.equal(adapted.model.lin.base_layer.weight, before) and not adapted.model.lin.merged


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="adapter.r=0"):
        LoraConfig.from_dict({"r": 0})
    with pytest.raises(ConfigError, match="adapter.bias"):
        LoraConfig.from_dict({"bias": "some"})
    with pytest.raises(ConfigError, match="init_lora_weights='lora_ga' is not implemented"):
        LoraConfig.from_dict({"init_lora_weights": "lora_ga"})
    with pytest.raises(ConfigError, match="init_lora_weights='pissa' supports Linear"):
        _adapted(dict(target_modules=["conv2d"]), "pissa")


LLAMA_OPTIONS = {
    "layers_to_transform": dict(target_modules="all-linear", layers_to_transform=[1], layers_pattern="layers"),
    "layer_replication": dict(target_modules=["q_proj", "v_proj", "down_proj"], layer_replication=[[0, 2], [1, 3]]),
}


@pytest.mark.parametrize("option", sorted(LLAMA_OPTIONS))
def test_layer_options_on_llama_invariants(option: str, tmp_path) -> None:
    """layers_to_transform and layer_replication: same invariants. With layer_replication the
    disabled model is the *replicated* base stack (weights shared, no adapters), as in PEFT."""
    from _lora_fixtures import tiny_llama

    from peftctl.adapters.lora.layer_replication import replicate_layers

    base = tiny_llama(layers=3)
    options = LLAMA_OPTIONS[option]
    adapted = get_adapted_model(clone(base), LoraConfig(r=4, init_lora_weights=False, **options)).eval()
    perturb_adapters(adapted)
    names = {n for n, m in adapted.model.named_modules() if isinstance(m, LoraLinear)}
    if option == "layers_to_transform":
        assert names and all(".layers.1." in n for n in names)
    else:
        assert len(adapted.model.model.layers) == 4 and adapted.config.num_hidden_layers == 4
    reference = clone(base)
    if option == "layer_replication":
        replicate_layers(reference, options["layer_replication"])
    x = ids(vocab=300)
    adapted_out = out(adapted, x)
    with adapted.disable_adapter():
        assert torch.allclose(out(adapted, x), out(reference, x), atol=1e-6)
    adapted.merge_adapter()
    assert rel_err(out(adapted, x), adapted_out) <= 1e-5
    adapted.unmerge_adapter()
    assert rel_err(out(adapted, x), adapted_out) <= 1e-5
    adapted.save_pretrained(tmp_path)
    loaded = AdaptedModel.from_pretrained(clone(base), tmp_path).eval()
    assert torch.equal(out(loaded, x), adapted_out)
    merged = adapted.merge_and_unload()
    assert rel_err(out(merged, x), adapted_out) <= 1e-5
