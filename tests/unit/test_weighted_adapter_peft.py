"""add_weighted_adapter vs the peft package (test-only oracle) on tiny Llama / GPT-2 models."""

from __future__ import annotations

import copy
import gc
import weakref

import peft  # noqa: E402  (test-only oracle: missing it must fail, not skip)
import pytest
import torch
from peft.utils import merge_utils as peft_merge_utils  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from peftctl.adapters import AdaptedModel  # noqa: E402
from peftctl.adapters.core import persistence  # noqa: E402
from peftctl.adapters.lora import LoraConfig  # noqa: E402
from peftctl.adapters.lora.weighted import lora_factors  # noqa: E402
from peftctl.errors import ConfigError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# name -> (r, lora_alpha); "a" and "b" share a rank for the factor-wise types
ADAPTERS = {"a": (4, 8), "b": (4, 16), "c": (8, 4)}


def _llama() -> torch.nn.Module:
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


def _gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=300)).eval()


BASES = {"llama": (_llama, ["q_proj", "v_proj"]), "gpt2": (_gpt2, ["c_attn"])}


def _pair(base: str, names=("a", "b", "c"), targets_by_name: dict | None = None):
    """The same random adapters in a peft model and in an AdaptedModel (copied by state dict)."""
    build, targets = BASES[base]
    model = build()
    torch.manual_seed(1)
    peft_model = None
    for name in names:
        r, alpha = ADAPTERS[name]
        cfg = peft.LoraConfig(
            r=r, lora_alpha=alpha, target_modules=(targets_by_name or {}).get(name, targets), init_lora_weights=False
        )
        if peft_model is None:
            peft_model = peft.get_peft_model(copy.deepcopy(model), cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, cfg)
    ours = None
    for name in names:
        r, alpha = ADAPTERS[name]
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list((targets_by_name or {}).get(name, targets)))
        if ours is None:
            ours = AdaptedModel(copy.deepcopy(model), cfg, name)
        else:
            ours.add_adapter(name, cfg)
        state = peft.get_peft_model_state_dict(peft_model, adapter_name=name)
        persistence.set_adapter_state_dict(ours, name, state)
    return peft_model, ours


def _peft_factors(peft_model, adapter: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    out = {}
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and adapter in module.lora_A:
            out[name] = (
                module.lora_A[adapter].weight.detach(),
                module.lora_B[adapter].weight.detach(),
                module.scaling[adapter],
            )
    return out


def _our_factors(ours: AdaptedModel, adapter: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    out = {}
    for name, layer in ours.adapter_layers():
        factors = lora_factors(layer, adapter)
        if factors is not None:
            out[name] = (factors[0].detach(), factors[1].detach(), layer.scaling[adapter])
    return out


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm().clamp(min=1e-12))


def _assert_same(peft_model, ours, adapter: str, compare_factors: bool) -> None:
    theirs, mine = _peft_factors(peft_model, adapter), _our_factors(ours, adapter)
    assert set(theirs) == set(mine) and mine
    for key in theirs:
        (pa, pb, ps), (oa, ob, os_) = theirs[key], mine[key]
        assert _rel(ob @ oa * os_, pb @ pa * ps) <= 1e-5, key
        if compare_factors:
            assert _rel(oa, pa) <= 1e-5 and _rel(ob, pb) <= 1e-5, key


DETERMINISTIC = [
    ("linear", ["a", "b"], {}),
    ("linear", ["a", "b"], {"weights": [0.7, -0.4]}),
    ("cat", ["a", "c"], {}),
    ("cat", ["a", "b", "c"], {}),
    ("svd", ["a", "b", "c"], {}),
    ("svd", ["a", "c"], {"svd_rank": 6}),
    ("svd", ["a", "c"], {"svd_rank": 6, "svd_clamp": 0.9}),
    ("svd", ["a", "c"], {"svd_rank": 6, "svd_full_matrices": False}),
    ("ties", ["a", "b"], {"density": 0.5}),
    ("ties", ["a", "b"], {"density": 0.5, "majority_sign_method": "frequency", "weights": [1.0, -0.6]}),
    ("ties_svd", ["a", "b", "c"], {"density": 0.4}),
    ("ties_svd", ["a", "c"], {"density": 0.6, "majority_sign_method": "frequency", "svd_rank": 5}),
    ("magnitude_prune", ["a", "b"], {"density": 0.3}),
    ("magnitude_prune_svd", ["a", "b", "c"], {"density": 0.5, "svd_rank": 8}),
]


# GPT-2 (Conv1D, fan_in_fan_out) on a subset: one of each code path
CASES = [("llama", *case) for case in DETERMINISTIC] + [("gpt2", *DETERMINISTIC[i]) for i in (1, 3, 6, 9, 11)]


@pytest.mark.parametrize(
    "base,combination,names,extra", CASES, ids=[f"{b}-{c}-{i}" for i, (b, c, _, _) in enumerate(CASES)]
)
def test_deterministic_combinations_match_peft(base, combination, names, extra):
    extra = dict(extra)
    weights = extra.pop("weights", [0.6, 0.3, 0.5][: len(names)])
    peft_model, ours = _pair(base)
    peft_model.add_weighted_adapter(names, weights, "mix", combination_type=combination, **extra)
    ours.add_weighted_adapter(names, weights, "mix", combination_type=combination, **extra)
    # factors are equal by construction for every type (same algorithm on the same inputs)
    _assert_same(peft_model, ours, "mix", compare_factors=True)
    assert ours.peft_config["mix"].r == peft_model.peft_config["mix"].r
    assert ours.peft_config["mix"].lora_alpha == peft_model.peft_config["mix"].lora_alpha
    assert set(ours.peft_config["mix"].target_modules) == set(peft_model.peft_config["mix"].target_modules)


def _seeded_random_pruning(generator: torch.Generator):
    """peft's random_pruning with its torch.bernoulli draws taken from ``generator``."""

    def random_pruning(tensor, density, rescale):
        mask = torch.bernoulli(torch.full_like(input=tensor, fill_value=density), generator=generator)
        pruned = tensor * mask
        return pruned / density if rescale else pruned

    return random_pruning


@pytest.mark.parametrize(
    "combination,names",
    [
        ("dare_linear", ["a", "b"]),
        ("dare_ties", ["a", "b"]),
        ("dare_linear_svd", ["a", "b", "c"]),
        ("dare_ties_svd", ["a", "c"]),
    ],
)
def test_dare_matches_peft_under_the_same_masks(monkeypatch, combination, names):
    seed = 1234
    peft_model, ours = _pair("llama")
    weights = [0.8, 0.5, -0.3][: len(names)]
    monkeypatch.setattr(peft_merge_utils, "random_pruning", _seeded_random_pruning(torch.Generator().manual_seed(seed)))
    peft_model.add_weighted_adapter(names, weights, "mix", combination_type=combination, density=0.6)
    ours.add_weighted_adapter(names, weights, "mix", combination_type=combination, density=0.6, seed=seed)
    _assert_same(peft_model, ours, "mix", compare_factors=True)
    # the seed makes it reproducible; another seed draws other masks
    ours.add_weighted_adapter(names, weights, "again", combination_type=combination, density=0.6, seed=seed)
    ours.add_weighted_adapter(names, weights, "other", combination_type=combination, density=0.6, seed=seed + 1)
    for key, (a, b, _) in _our_factors(ours, "mix").items():
        a2, b2, _ = _our_factors(ours, "again")[key]
        assert torch.equal(a, a2) and torch.equal(b, b2)
    assert any(
        not torch.equal(a, _our_factors(ours, "other")[k][0]) for k, (a, _, _) in _our_factors(ours, "mix").items()
    )


def _delta(ours, adapter, key):
    a, b, s = _our_factors(ours, adapter)[key]
    return b @ a * s


def test_cat_ranks_4_and_8_give_rank_12_and_exact_sum():
    _, ours = _pair("llama")
    ours.add_weighted_adapter(["a", "c"], [0.7, -1.3], "cat", combination_type="cat")
    assert ours.peft_config["cat"].r == 12
    for key, (a, b, scaling) in _our_factors(ours, "cat").items():
        assert a.shape[0] == 12 and b.shape[1] == 12 and scaling == 1.0
        expected = 0.7 * _delta(ours, "a", key) - 1.3 * _delta(ours, "c", key)
        torch.testing.assert_close(b @ a * scaling, expected, rtol=1e-6, atol=1e-7)
    # the layer's forward agrees: the blended output delta is the weighted sum of the sources'
    layer = dict(ours.adapter_layers())["model.layers.0.self_attn.q_proj"]
    x = torch.randn(3, 32)
    zeros = torch.zeros(3, 32)
    y_cat = layer.adapter_output(x, zeros, "cat")
    y_sum = 0.7 * layer.adapter_output(x, zeros, "a") - 1.3 * layer.adapter_output(x, zeros, "c")
    torch.testing.assert_close(y_cat, y_sum, rtol=1e-5, atol=1e-6)


def test_svd_full_rank_reproduces_weighted_delta_and_truncation_is_optimal():
    _, ours = _pair("llama")
    weights = [0.6, -0.4, 0.9]
    ours.add_weighted_adapter(["a", "b", "c"], weights, "full", combination_type="svd", svd_rank=16)
    for rank in (2, 5):
        ours.add_weighted_adapter(["a", "b", "c"], weights, f"r{rank}", combination_type="svd", svd_rank=rank)
    for key in _our_factors(ours, "full"):
        target = sum(w * _delta(ours, n, key) for w, n in zip(weights, ["a", "b", "c"]))
        torch.testing.assert_close(_delta(ours, "full", key), target, rtol=1e-5, atol=1e-6)
        singular = torch.linalg.svdvals(target.double())
        for rank in (2, 5):
            error = (_delta(ours, f"r{rank}", key).double() - target.double()).norm()
            optimal = singular[rank:].square().sum().sqrt()  # Eckart–Young
            assert abs(float(error - optimal)) <= 1e-5 * float(singular.norm())


def test_delete_blended_adapter_frees_its_tensors():
    _, ours = _pair("llama")
    ours.add_weighted_adapter(["a", "c"], [0.5, 0.5], "mix", combination_type="cat")
    refs = [weakref.ref(p) for p in ours.adapter_parameters("mix")]
    assert refs
    ours.delete_adapter("mix")
    gc.collect()
    assert all(ref() is None for ref in refs)
    assert not any(".mix." in key for key in ours.state_dict())
    assert "mix" not in ours.peft_config


def test_new_adapter_is_not_activated_and_sources_unchanged():
    _, ours = _pair("llama")
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", combination_type="ties", density=0.5)
    assert ours.active_adapters == ["a"]
    after = ours.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert all(not p.requires_grad for p in ours.adapter_parameters("mix"))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"combination_type": "average"}, "combination_type='average' is not valid; expected one of svd, linear, cat"),
        ({"combination_type": "linear", "adapters": ["a", "c"]}, "needs adapters of equal rank"),
        ({"combination_type": "ties"}, "needs density"),
        ({"combination_type": "ties", "density": 1.5}, "density=1.5 is not valid"),
        ({"combination_type": "ties", "density": 0.5, "majority_sign_method": "mean"}, "majority_sign_method='mean'"),
        ({"weights": [1.0]}, "got 1 weights for 2 adapters"),
        ({"adapters": ["a", "zzz"]}, "no adapter named 'zzz'"),
        ({"adapter_name": "a"}, "already exists"),
        ({"combination_type": "svd", "svd_rank": 0}, "svd_rank=0 is not valid"),
        ({"combination_type": "svd", "svd_driver": "lapack"}, "svd_driver='lapack' is not valid"),
        ({"combination_type": "svd", "svd_clamp": 1.5}, "svd_clamp=1.5 is not valid"),
        ({"weights": [0.5, float("nan")]}, "weight nan is not valid"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs, message):
    _, ours = _pair("llama")
    args = {"adapters": ["a", "b"], "weights": [0.5, 0.5], "adapter_name": "mix"} | kwargs
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        ours.add_weighted_adapter(**args)
    assert "mix" not in ours.peft_config


def test_methods_without_a_combiner_raise_config_error_naming_the_supported_ones(monkeypatch):
    from peftctl.adapters.core import weighted

    monkeypatch.delitem(weighted._COMBINERS, "lora")
    _, ours = _pair("llama", names=("a", "b"))
    with pytest.raises(
        ConfigError, match="add_weighted_adapter is not defined for lora adapters; methods that support it: "
    ):
        ours.add_weighted_adapter(["a", "b"], [0.5, 0.5], "mix", combination_type="svd")


@pytest.mark.parametrize("combination,extra", [("cat", {}), ("svd", {}), ("ties", {"density": 0.5}), ("linear", {})])
def test_adapters_on_different_modules_match_peft(combination, extra):
    targets = {"a": ["q_proj"], "b": ["q_proj", "v_proj"]}
    peft_model, ours = _pair("llama", names=("a", "b"), targets_by_name=targets)
    peft_model.add_weighted_adapter(["a", "b"], [0.9, 0.4], "mix", combination_type=combination, **extra)
    ours.add_weighted_adapter(["a", "b"], [0.9, 0.4], "mix", combination_type=combination, **extra)
    _assert_same(peft_model, ours, "mix", compare_factors=True)
    assert ours.peft_config["mix"].target_modules == ["q_proj", "v_proj"]


def test_rslora_sources_blend_to_the_exact_weighted_delta():
    """The blended adapter has alpha = r and plain scaling, so B A is the combined ΔW even when the
    sources use rsLoRA (PEFT keeps use_rslora there, which rescales the blend by sqrt(r))."""
    _, ours = _pair("llama", names=("a",))
    ours.add_adapter(
        "rs",
        LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    for combination in ("cat", "svd"):
        ours.add_weighted_adapter(["a", "rs"], [0.5, 2.0], combination, combination_type=combination, svd_rank=12)
        assert ours.peft_config[combination].use_rslora is False
        for key in _our_factors(ours, combination):
            expected = 0.5 * _delta(ours, "a", key) + 2.0 * _delta(ours, "rs", key)
            torch.testing.assert_close(_delta(ours, combination, key), expected, rtol=1e-5, atol=1e-6)


def test_union_of_target_modules_follows_peft():
    from peftctl.adapters.core.weighted import union_target_modules

    lists = [LoraConfig(target_modules=["v_proj", "q_proj"]), LoraConfig(target_modules=["k_proj", "q_proj"])]
    assert union_target_modules(lists) == ["k_proj", "q_proj", "v_proj"]
    regexes = [LoraConfig(target_modules=r".*q_proj"), LoraConfig(target_modules=r".*v_proj")]
    assert union_target_modules(regexes) == r"(.*q_proj)|(.*v_proj)"
    with pytest.raises(ConfigError, match="all lists or all regex strings"):
        union_target_modules([lists[0], regexes[0]])


def test_single_adapter_is_combined_linearly_like_peft():
    peft_model, ours = _pair("llama", names=("a", "c"))
    peft_model.add_weighted_adapter(["c"], [3], "solo", combination_type="svd", svd_rank=2)
    ours.add_weighted_adapter(["c"], [3], "solo", combination_type="svd", svd_rank=2)
    _assert_same(peft_model, ours, "solo", compare_factors=True)
    assert ours.peft_config["solo"].r == 8
    for key in _our_factors(ours, "solo"):
        torch.testing.assert_close(_delta(ours, "solo", key), 3 * _delta(ours, "c", key), rtol=1e-5, atol=1e-7)
