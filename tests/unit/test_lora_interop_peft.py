"""Interop with the `peft` package (test-only oracle), both directions, logits equal <= 1e-5,
and the scale / set of wrapped modules equal to PEFT's for the same config (acceptance items 2, 3)."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from _lora_fixtures import (
    ALL_TARGETS,
    clone,
    ids,
    out,
    perturb_adapters,
    rel_err,
    tiny_all_types,
    tiny_gpt2,
    tiny_llama,
    tiny_llama_cls,
)

from peftctl.adapters import AdaptedModel, get_adapted_model
from peftctl.adapters.lora import LoraConfig, LoraLayer

warnings.filterwarnings("ignore", category=UserWarning)

CASES = {
    "plain": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    "rslora": (tiny_llama, dict(target_modules="all-linear", use_rslora=True, lora_alpha=16)),
    "dora": (tiny_llama, dict(target_modules=["q_proj", "o_proj", "up_proj"], use_dora=True)),
    "embedding": (tiny_llama, dict(target_modules=["embed_tokens", "q_proj"])),
    "gpt2_conv1d": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    "modules_to_save": (
        tiny_llama_cls,
        dict(target_modules=["q_proj", "v_proj"], modules_to_save=["score"], task_type="SEQ_CLS"),
    ),
    "rank_pattern": (
        tiny_llama,
        dict(
            target_modules="all-linear",
            rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.up_proj": 6},
            alpha_pattern={"v_proj": 3.0},
        ),
    ),
    "layer_replication": (
        lambda: tiny_llama(layers=3),
        dict(target_modules=["q_proj", "v_proj"], layer_replication=[[0, 2], [1, 3]]),
    ),
    "bias_all_gpt2": (tiny_gpt2, dict(target_modules=["c_attn"], fan_in_fan_out=True, bias="all")),
    "bias_lora_only_gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, bias="lora_only")),
    "conv_embedding_types": (tiny_all_types, dict(target_modules=ALL_TARGETS, task_type=None)),
    "conv_dora": (
        tiny_all_types,
        dict(target_modules=["emb", "lin", "conv1d", "conv2d"], use_dora=True, task_type=None),
    ),
}
SCALE_CASES = {
    "rslora": dict(target_modules="all-linear", use_rslora=True, lora_alpha=16, r=4),
    "rank_alpha_pattern": dict(
        target_modules="all-linear",
        r=4,
        rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.up_proj": 6},
        alpha_pattern={"v_proj": 3.0, "down_proj": 5.0},
    ),
    "rslora_patterns": dict(
        target_modules=["q_proj", "k_proj", "gate_proj"],
        use_rslora=True,
        r=4,
        rank_pattern={"k_proj": 3},
        alpha_pattern={"gate_proj": 7.0},
    ),
    "layers_to_transform": dict(
        target_modules=["q_proj", "v_proj", "down_proj"], r=4, layers_to_transform=[1], layers_pattern="layers"
    ),
    "regex_exclude": dict(target_modules=r".*\.(q|k|v)_proj", exclude_modules=["k_proj"], r=4),
}


def _peft_config(options: dict, **extra) -> peft.LoraConfig:
    return peft.LoraConfig(**{"r": 4, "lora_alpha": 8, **options, **extra})


def _ours_config(options: dict, **extra) -> LoraConfig:
    return LoraConfig(**{"r": 4, "lora_alpha": 8, **options, **extra})


def _input(model) -> torch.Tensor:
    return ids(batch=2, length=6, vocab=getattr(getattr(model, "config", None), "vocab_size", 20))


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_checkpoint_loads_in_peftctl(case: str, tmp_path) -> None:
    make, options = CASES[case]
    base = make()
    torch.manual_seed(11)
    theirs = peft.get_peft_model(clone(base), _peft_config(options, init_lora_weights=False)).eval()
    perturb_adapters(theirs, scale=0.05)
    theirs.save_pretrained(tmp_path)
    ours = AdaptedModel.from_pretrained(clone(base), tmp_path).eval()
    x = _input(base)
    reference = out(theirs, x)
    assert rel_err(reference, out(base, x)) > 1e-4
    assert rel_err(out(ours, x), reference) <= 1e-5


@pytest.mark.parametrize("case", sorted(CASES))
def test_peftctl_checkpoint_loads_in_peft(case: str, tmp_path) -> None:
    make, options = CASES[case]
    base = make()
    torch.manual_seed(12)
    ours = get_adapted_model(clone(base), _ours_config(options, init_lora_weights=False)).eval()
    perturb_adapters(ours, scale=0.05)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(clone(base), tmp_path).eval()
    x = _input(base)
    reference = out(ours, x)
    assert rel_err(reference, out(base, x)) > 1e-4
    assert rel_err(out(theirs, x), reference) <= 1e-5
    # the same tensor names on disk; PEFT also stores the targeted embedding's *base* weight
    # (save_embedding_layers="auto"), which we do not need to write (and accept when reading)
    peft_keys = {k for k in peft.get_peft_model_state_dict(theirs) if not k.endswith("embed_tokens.base_layer.weight")}
    assert set(ours.get_adapter_state_dict()) == peft_keys


def test_multiple_named_adapters_both_directions(tmp_path) -> None:
    base = tiny_llama()
    torch.manual_seed(13)
    theirs = peft.get_peft_model(
        clone(base), _peft_config(dict(target_modules=["q_proj", "v_proj"]), init_lora_weights=False)
    )
    # "other" is a DoRA adapter overlapping "default" on v_proj
    theirs.add_adapter(
        "other", _peft_config(dict(target_modules=["v_proj", "o_proj"], r=2, use_dora=True), init_lora_weights=False)
    )
    theirs.eval()
    theirs.save_pretrained(tmp_path / "peft")  # default at the top, "other" in a sub-folder
    assert (tmp_path / "peft" / "other" / "adapter_model.safetensors").is_file()
    ours = AdaptedModel.from_pretrained(clone(base), tmp_path / "peft").eval()
    ours.load_adapter(tmp_path / "peft" / "other", "other")
    x = _input(base)
    for name in ("default", "other"):
        theirs.set_adapter(name)
        ours.set_adapter(name)
        assert rel_err(out(ours, x), out(theirs, x)) <= 1e-5, name
    # both active at once (PEFT applies them in order; DoRA's directional part sees the LoRA output)
    theirs.base_model.set_adapter(["default", "other"])
    ours.set_adapter(["default", "other"])
    both = out(theirs, x)
    assert rel_err(out(ours, x), both) <= 1e-5
    ours.merge_adapter()
    assert rel_err(out(ours, x), both) <= 1e-5
    ours.unmerge_adapter()
    # and back: our multi-adapter save loads in peft
    ours.save_pretrained(tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(clone(base), tmp_path / "ours").eval()
    again.load_adapter(str(tmp_path / "ours" / "other"), adapter_name="other")
    for name in ("default", "other"):
        again.set_adapter(name)
        ours.set_adapter(name)
        assert rel_err(out(again, x), out(ours, x)) <= 1e-5, name


def test_pissa_converted_to_lora_loads_in_peft_on_untouched_base(tmp_path) -> None:
    base = tiny_llama()
    ours = get_adapted_model(
        clone(base), _ours_config(dict(target_modules=["q_proj", "v_proj", "up_proj"]), init_lora_weights="pissa")
    ).eval()
    ours.save_pretrained(tmp_path / "initial")
    perturb_adapters(ours, scale=0.05)
    ours.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "initial")
    theirs = peft.PeftModel.from_pretrained(clone(base), tmp_path / "lora").eval()
    assert theirs.peft_config["default"].r == 8 and theirs.peft_config["default"].init_lora_weights is True
    x = _input(base)
    assert rel_err(out(theirs, x), out(ours, x)) <= 1e-5


def test_peft_pissa_conversion_loads_in_peftctl(tmp_path) -> None:
    base = tiny_llama()
    theirs = peft.get_peft_model(
        clone(base), _peft_config(dict(target_modules=["q_proj", "v_proj"]), init_lora_weights="pissa")
    ).eval()
    theirs.save_pretrained(tmp_path / "initial")
    perturb_adapters(theirs, scale=0.05)
    theirs.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    ours = AdaptedModel.from_pretrained(clone(base), tmp_path / "lora").eval()
    x = _input(base)
    assert rel_err(out(ours, x), out(theirs, x)) <= 1e-5


def _wrapped(model: torch.nn.Module, layer_type) -> dict[str, tuple[int, float]]:
    return {
        name: (module.r["default"], float(module.scaling["default"]))
        for name, module in model.named_modules()
        if isinstance(module, layer_type) and "default" in module.r
    }


@pytest.mark.parametrize("case", sorted(SCALE_CASES))
def test_scale_and_wrapped_modules_match_peft(case: str) -> None:
    options = SCALE_CASES[case]
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**options))
    ours = get_adapted_model(tiny_llama(), LoraConfig(**options))
    expected = _wrapped(theirs.base_model.model, peft.tuners.lora.LoraLayer)
    got = _wrapped(ours.model, LoraLayer)
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name][0] == expected[name][0], name
        assert got[name][1] == pytest.approx(expected[name][1], rel=1e-12), name


def test_layer_replication_shares_base_weights_and_matches_peft_count() -> None:
    options = dict(target_modules=["q_proj"], layer_replication=[[0, 2], [1, 3]])
    ours = get_adapted_model(tiny_llama(layers=3), LoraConfig(**options))
    theirs = peft.get_peft_model(tiny_llama(layers=3), peft.LoraConfig(**options))
    layers = ours.model.model.layers
    assert len(layers) == 4 == len(theirs.base_model.model.model.layers)
    # layers 1 and 2 are copies of base layer 1: same base tensor, separate adapters
    q1, q2 = layers[1].self_attn.q_proj, layers[2].self_attn.q_proj
    assert q1.base_layer.weight is q2.base_layer.weight
    assert q1.lora_A["default"].weight is not q2.lora_A["default"].weight
    assert sorted(_wrapped(ours.model, LoraLayer)) == sorted(
        _wrapped(theirs.base_model.model, peft.tuners.lora.LoraLayer)
    )
