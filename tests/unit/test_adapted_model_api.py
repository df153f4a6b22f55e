"""AdaptedModel API with LoRA: mixed-adapter batches (acceptance item 5), adapter management,
multi-adapter save / load, and the recipe YAMLs of the LoRA family (acceptance item 6)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from _lora_fixtures import clone, ids, out, rel_err, tiny_llama, tiny_llama_cls

from peftctl.adapters import AdaptedModel, config_from_dict, get_adapted_model
from peftctl.adapters.lora import LoraConfig, LoraLayer
from peftctl.errors import AdapterError, ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "adapter"


def _two_adapters(model_fn=tiny_llama, **extra):
    base = model_fn()
    torch.manual_seed(21)
    adapted = get_adapted_model(
        clone(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **extra)
    )
    adapted.add_adapter(
        "dora", LoraConfig(r=2, target_modules=["v_proj", "down_proj"], use_dora=True, init_lora_weights=False, **extra)
    )
    perturb_adapters_all(adapted)
    return base, adapted.eval()


def perturb_adapters_all(adapted: AdaptedModel) -> None:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name in adapted.peft_config:
            for p in adapted.adapter_parameters(name):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_mixed_batch_rows_equal_single_adapter_runs() -> None:
    base, adapted = _two_adapters()
    x = ids(batch=5, vocab=300)
    names = ["default", "dora", "__base__", "dora", "default"]
    mixed = out(adapted, x, adapter_names=names)
    for i, name in enumerate(names):
        if name == "__base__":
            with adapted.disable_adapter():
                alone = out(adapted, x[i : i + 1])
        else:
            adapted.set_adapter(name)
            alone = out(adapted, x[i : i + 1])
        assert rel_err(mixed[i : i + 1], alone) <= 1e-5, (i, name)
    # the adapters really differ on the same row
    row = x[1:2]
    adapted.set_adapter("default")
    assert rel_err(out(adapted, row), mixed[1:2]) > 1e-4


def test_mixed_batch_with_modules_to_save_head() -> None:
    base, adapted = _two_adapters(tiny_llama_cls, modules_to_save=["score"], task_type="SEQ_CLS")
    x = ids(batch=3, vocab=300)
    names = ["dora", "default", "__base__"]
    mixed = out(adapted, x, adapter_names=names)
    adapted.set_adapter("dora")
    assert rel_err(mixed[0:1], out(adapted, x[0:1])) <= 1e-5
    adapted.set_adapter("default")
    assert rel_err(mixed[1:2], out(adapted, x[1:2])) <= 1e-5
    assert rel_err(mixed[2:3], out(base, x[2:3])) <= 1e-5


def test_mixed_batch_errors() -> None:
    _, adapted = _two_adapters()
    x = ids(batch=2, vocab=300)
    with pytest.raises(ConfigError, match="nope"):
        adapted(x, adapter_names=["default", "nope"])
    adapted.train()
    with pytest.raises(AdapterError, match="inference"):
        adapted(x, adapter_names=["default", "dora"])
    adapted.eval()
    adapted.merge_adapter()
    with pytest.raises(AdapterError, match="merged"):
        adapted(x, adapter_names=["default", "dora"])


def test_set_delete_and_trainability() -> None:
    _, adapted = _two_adapters()
    adapted.set_adapter("dora")
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all(".dora" in n for n in trainable)
    assert any("lora_magnitude_vector.dora" in n for n in trainable)
    adapted.set_adapter(["default", "dora"])
    x = ids(vocab=300)
    both = out(adapted, x)
    adapted.delete_adapter("dora")
    assert "dora" not in adapted.peft_config
    assert not any(".dora" in n for n, _ in adapted.named_parameters())
    adapted.set_adapter("default")
    assert rel_err(out(adapted, x), both) > 1e-5
    with pytest.raises(ConfigError, match="no adapter named 'dora'"):
        adapted.set_adapter("dora")


def test_print_trainable_parameters_counts(capsys) -> None:
    adapted = get_adapted_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    line = adapted.print_trainable_parameters()
    expected = 2 * 4 * (32 + 32)  # 2 layers x (A: 4x32 + B: 32x4)
    assert f"trainable params: {expected:,}" in line and line in capsys.readouterr().out


def test_save_and_load_several_adapters(tmp_path) -> None:
    base, adapted = _two_adapters()
    adapted.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "dora" / "adapter_config.json").is_file()
    loaded = AdaptedModel.from_pretrained(clone(base), tmp_path)
    loaded.load_adapter(tmp_path / "dora", "dora")
    loaded.eval()
    x = ids(vocab=300)
    for name in ("default", "dora"):
        adapted.set_adapter(name)
        loaded.set_adapter(name)
        assert torch.equal(out(loaded, x), out(adapted, x)), name
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference by default
    trainable = AdaptedModel.from_pretrained(clone(base), tmp_path, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_merge_and_unload_selected_adapters_with_progressbar() -> None:
    base, adapted = _two_adapters()
    adapted.set_adapter(["default", "dora"])
    x = ids(vocab=300)
    expected = out(adapted, x)
    merged = adapted.merge_and_unload(progressbar=True, safe_merge=True, adapter_names=["default", "dora"])
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    assert rel_err(out(merged, x), expected) <= 1e-5


RECIPES = {
    "lora": {},
    "dora": {"use_dora": True},
    "rslora": {"use_rslora": True},
    "pissa": {"init_lora_weights": "pissa"},
    "olora": {"init_lora_weights": "olora"},
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_yaml_reaches_the_option(name: str) -> None:
    values = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    assert values["method"] == "lora"
    config = config_from_dict(values)
    for key, value in RECIPES[name].items():
        assert getattr(config, key) == value
    base = tiny_llama()
    adapted = get_adapted_model(clone(base), config).eval()
    layer = adapted.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLayer)
    assert ("default" in layer.lora_magnitude_vector) == (name == "dora")
    expected_scale = config.lora_alpha / (math.sqrt(config.r) if name == "rslora" else config.r)
    assert layer.scaling["default"] == pytest.approx(expected_scale)
    x = ids(vocab=300)
    assert rel_err(out(adapted, x), out(base, x)) < 1e-5  # every recipe starts at the base model
    mutated = not torch.equal(layer.base_layer.weight, base.model.layers[0].self_attn.q_proj.weight)
    assert mutated == (name in ("pissa", "olora"))


def test_generate_with_per_row_adapters() -> None:
    _, adapted = _two_adapters()
    prompt = ids(batch=3, length=4, vocab=300)
    names = ["dora", "__base__", "default"]
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    mixed = adapted.generate(input_ids=prompt, adapter_names=names, **kwargs)
    for i, name in enumerate(names):
        if name == "__base__":
            with adapted.disable_adapter():
                alone = adapted.generate(input_ids=prompt[i : i + 1], **kwargs)
        else:
            adapted.set_adapter(name)
            alone = adapted.generate(input_ids=prompt[i : i + 1], **kwargs)
        # a row that hits EOS early is padded in the batch
        assert torch.equal(mixed[i : i + 1, : alone.shape[1]], alone), name
