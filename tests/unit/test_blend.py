"""blend_adapters / save_blend: adapter dirs on disk -> one blended adapter (PEFT-loadable)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from peftctl.adapters import AdaptedModel
from peftctl.adapters.lora import LoraConfig
from peftctl.errors import ConfigError
from peftctl.export.blend import blend_adapters, default_adapter_names, save_blend

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _base() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two random LoRA adapters (ranks 4 and 8) saved in PEFT format, and their ΔW per module."""
    root = tmp_path_factory.mktemp("adapters")
    deltas = {}
    dirs = []
    for name, r, alpha in (("math", 4, 8), ("code", 8, 8)):
        torch.manual_seed(len(name) + r)
        model = AdaptedModel(
            _base(), LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
        deltas[name] = {n: layer.get_delta_weight("default").detach().clone() for n, layer in model.adapter_layers()}
        model.save_pretrained(root / name)
        dirs.append(root / name)
    return dirs, deltas


def test_blend_cat_from_directories_gives_the_exact_weighted_delta(saved):
    dirs, deltas = saved
    model = blend_adapters(_base(), dirs, weights=[0.7, 0.3], combination_type="cat")
    assert list(model.peft_config) == ["blended"] and model.active_adapters == ["blended"]
    assert model.peft_config["blended"].r == 12
    for name, layer in model.adapter_layers():
        expected = 0.7 * deltas["math"][name] + 0.3 * deltas["code"][name]
        torch.testing.assert_close(layer.get_delta_weight("blended"), expected, rtol=1e-5, atol=1e-7)


def test_blend_keeps_sources_under_given_names_and_defaults_to_equal_weights(saved):
    dirs, deltas = saved
    model = blend_adapters(
        _base(), dirs, names=["m", "c"], combination_type="svd", svd_rank=12, adapter_name="mix", keep_sources=True
    )
    assert set(model.peft_config) == {"m", "c", "mix"} and model.active_adapters == ["mix"]
    for name, layer in model.adapter_layers():
        expected = 0.5 * deltas["math"][name] + 0.5 * deltas["code"][name]
        torch.testing.assert_close(layer.get_delta_weight("mix"), expected, rtol=1e-4, atol=1e-6)


def test_blend_ties_onto_an_existing_adapted_model_is_reproducible(saved):
    dirs, _ = saved
    results = []
    for _ in range(2):
        host = AdaptedModel(_base(), LoraConfig(r=2, target_modules=["k_proj"]), "other")
        model = blend_adapters(host, dirs, weights=[0.6, 0.4], combination_type="dare_ties_svd", density=0.5, seed=5)
        assert model is host and set(model.peft_config) == {"other", "blended"}
        results.append(model.get_adapter_state_dict("blended"))
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_saved_blend_loads_in_peft_and_as_merged_model(saved, tmp_path):
    import peft

    dirs, _ = saved
    model = blend_adapters(_base(), dirs, weights=[1.0, -0.5], combination_type="ties_svd", density=0.7, svd_rank=6)
    ids = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    save_blend(model, tmp_path / "adapter", as_adapter=True)
    reloaded = peft.PeftModel.from_pretrained(_base(), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, ours, rtol=1e-4, atol=1e-5)
    save_blend(model, tmp_path / "merged", safe=True)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, ours, rtol=1e-4, atol=1e-5)


def test_blend_errors_are_config_errors_and_leave_the_base_untouched(saved, tmp_path):
    dirs, _ = saved
    base = _base()
    reference = copy.deepcopy(base.state_dict())
    with pytest.raises(ConfigError, match="needs adapters of equal rank"):
        blend_adapters(base, dirs, combination_type="linear")
    assert base.state_dict().keys() == reference.keys()
    with pytest.raises(ConfigError, match="2 weights for 1 adapter"):
        blend_adapters(_base(), dirs[:1], weights=[0.5, 0.5])
    with pytest.raises(ConfigError, match="not an adapter directory"):
        blend_adapters(_base(), [tmp_path / "missing", dirs[0]])
    with pytest.raises(ConfigError, match="also a source adapter's name"):
        blend_adapters(_base(), dirs, names=["blended", "x"])


def test_default_names_are_unique_and_module_safe(tmp_path):
    assert default_adapter_names([tmp_path / "a.b", tmp_path / "x" / "a.b", tmp_path / "c"]) == ["a_b", "a_b_2", "c"]
