"""X-LoRA: two frozen LoRA experts mixed per token by a classifier. The dual pass equals a
hand-computed mixture for fixed scalings, top-k keeps one expert, only the classifier gets
gradients, scalings are exposed, save -> load identical (peft_type XLORA, PEFT 0.21.2 names)."""

from __future__ import annotations

import math

import pytest
import torch

from peftctl.adapters import AdaptedModel, get_adapted_model
from peftctl.adapters.lora import LoraConfig
from peftctl.adapters.xlora import XLoraConfig, latest_scalings
from peftctl.errors import AdapterError, ConfigError
from tests.unit._method_checks import check_yaml, input_ids, rel_err, run, tiny_llama

TARGETS = ["q_proj", "v_proj"]
WEIGHTS = (0.7, 0.3)


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    dirs = {}
    for i in range(2):
        torch.manual_seed(10 + i)
        lora = get_adapted_model(
            tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
        )
        path = tmp_path_factory.mktemp(f"expert{i}")
        lora.save_pretrained(path)
        dirs[f"e{i}"] = str(path)
    return dirs


def fixed_mixture(adapted: AdaptedModel, weights: tuple[float, float]) -> None:
    """Classifier that outputs constant logits log(w): softmax gives exactly w for every token."""
    head = adapted.base_model.internal_xlora_classifier.layers[-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.log(torch.tensor(weights)))


def reference_logits(experts: dict[str, str], weights: tuple[float, ...], ids: torch.Tensor) -> torch.Tensor:
    """Base model with W += Σ_e w_e ΔW_e folded in by hand."""
    base = tiny_llama()
    params = dict(base.named_parameters())
    for w, path in zip(weights, experts.values()):
        lora = AdaptedModel.from_pretrained(tiny_llama(), path)
        for name, layer in lora.adapter_layers():
            with torch.no_grad():
                params[f"{name}.weight"] += w * layer.get_delta_weight("default")
    return run(base, ids)


def test_dual_pass_equals_hand_mixture(experts):
    adapted = get_adapted_model(tiny_llama(), XLoraConfig(adapters=experts, xlora_depth=1))
    fixed_mixture(adapted, WEIGHTS)
    ids = input_ids()
    out = run(adapted, ids)
    assert rel_err(out, reference_logits(experts, WEIGHTS, ids)) <= 1e-5
    scal = latest_scalings(adapted)
    assert scal.shape == (2, 7, 4, 2)  # batch, seq, 4 adapted modules, 2 experts
    assert torch.allclose(scal, torch.tensor(WEIGHTS).expand_as(scal), atol=1e-6)
    with adapted.disable_adapter():
        assert torch.allclose(run(adapted, ids), run(tiny_llama(), ids), atol=1e-6)


def test_temperature_and_top_k(experts):
    ids = input_ids()
    hot = get_adapted_model(tiny_llama(), XLoraConfig(adapters=experts, xlora_depth=1, softmax_temperature=2.0))
    fixed_mixture(hot, WEIGHTS)
    run(hot, ids)
    tempered = torch.softmax(torch.log(torch.tensor(WEIGHTS)) / 2.0, dim=-1)
    assert torch.allclose(latest_scalings(hot)[0, 0, 0], tempered, atol=1e-6)
    top1 = get_adapted_model(
        tiny_llama(), XLoraConfig(adapters=experts, xlora_depth=1, top_k_lora=1, enable_softmax_topk=True)
    )
    fixed_mixture(top1, WEIGHTS)
    assert rel_err(run(top1, ids), reference_logits(experts, (1.0, 0.0), ids)) <= 1e-5


def test_only_classifier_gets_gradients(experts):
    adapted = get_adapted_model(
        tiny_llama(), XLoraConfig(adapters=experts, xlora_depth=2, xlora_size=16, layerwise_scalings=True)
    )
    ids = input_ids()
    adapted.train()
    loss = adapted(input_ids=ids, labels=ids).loss
    loss.backward()
    with_grad = {n for n, p in adapted.named_parameters() if p.grad is not None}
    assert with_grad and all("internal_xlora_classifier" in n for n in with_grad)
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable == with_grad
    assert latest_scalings(adapted).shape == (2, 7, 4, 2)
    assert math.isfinite(loss.item())


def test_save_load_and_config_errors(experts, tmp_path):
    adapted = get_adapted_model(
        tiny_llama(), XLoraConfig(adapters=experts, xlora_depth=2, xlora_size=16, xlora_dropout_p=0.0)
    )
    ids = input_ids()
    out = run(adapted, ids)
    adapted.save_pretrained(tmp_path)
    loaded = AdaptedModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(run(loaded, ids), out)
    with pytest.raises(AdapterError, match="xlora"):
        loaded.merge_and_unload()
    with pytest.raises(AdapterError, match="xlora"):
        loaded.merge_adapter()
    assert torch.equal(run(loaded, ids), out)
    with pytest.raises(ConfigError, match="top_k_lora"):
        XLoraConfig.from_dict({"adapters": experts, "top_k_lora": 3})
    with pytest.raises(ConfigError, match="adapters"):
        XLoraConfig.from_dict({})


def test_generate_uses_the_mixture(experts):
    adapted = get_adapted_model(tiny_llama(), XLoraConfig(adapters=experts, xlora_depth=1))
    fixed_mixture(adapted, WEIGHTS)
    ids = input_ids()[:1]
    reference = tiny_llama()
    params = dict(reference.named_parameters())
    for w, path in zip(WEIGHTS, experts.values()):
        lora = AdaptedModel.from_pretrained(tiny_llama(), path)
        for name, layer in lora.adapter_layers():
            with torch.no_grad():
                params[f"{name}.weight"] += w * layer.get_delta_weight("default")
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    expected = reference.generate(ids, **kw)
    got = adapted.generate(ids, **kw)
    assert torch.equal(got.sequences, expected.sequences)
    for ours, ref in zip(got.scores, expected.scores):  # every cached decoding step is the mixture
        assert rel_err(ours, ref) <= 1e-5
    base = tiny_llama().generate(ids, **kw)
    assert rel_err(base.scores[-1], expected.scores[-1]) > 1e-4  # the experts matter
    assert "forward" not in vars(adapted.model)  # the wrapper is removed afterwards


def test_yaml_config():
    check_yaml("xlora", adapters={"e0": "/nonexistent"})
