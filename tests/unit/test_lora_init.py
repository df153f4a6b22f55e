"""init_lora_weights: PiSSA / randomized PiSSA / OLoRA / Gaussian against direct linear algebra, and
the PiSSA / OLoRA -> LoRA conversion (acceptance item 4)."""

from __future__ import annotations

import json

import pytest
import torch
from _lora_fixtures import clone, ids, out, perturb_adapters, rel_err, tiny_gpt2, tiny_llama
from torch import nn

from peftctl.adapters import AdaptedModel, get_adapted_model
from peftctl.adapters.lora import LoraConfig
from peftctl.adapters.lora.inits import olora_factors, pissa_factors

R = 3


class OneLinear(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _decaying_weight(out_f: int = 12, in_f: int = 10, seed: int = 0) -> torch.Tensor:
    """A weight with a clear spectral gap after the first R singular values."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out_f, out_f, generator=g))
    v, _ = torch.linalg.qr(torch.randn(in_f, in_f, generator=g))
    s = torch.tensor([9.0, 7.0, 5.0] + [0.3 / (i + 1) for i in range(in_f - 3)])
    return u[:, :in_f] @ torch.diag(s) @ v.T


def _adapt(weight: torch.Tensor, init: str, **kw) -> tuple[AdaptedModel, torch.Tensor]:
    model = OneLinear(weight)
    adapted = get_adapted_model(
        model, LoraConfig(r=R, lora_alpha=6, target_modules=["proj"], init_lora_weights=init, **kw)
    )
    return adapted, weight


def _direct_topr(weight: torch.Tensor) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return (u[:, :R] * s[:R]) @ vh[:R]


@pytest.mark.parametrize("use_rslora", [False, True])
def test_pissa_matches_direct_svd(use_rslora: bool) -> None:
    adapted, weight = _adapt(_decaying_weight(), "pissa", use_rslora=use_rslora)
    layer = adapted.model.proj
    s = layer.scaling["default"]
    recon = s * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    topr = _direct_topr(weight).float()
    assert torch.allclose(recon, topr, atol=1e-5)
    assert torch.allclose(layer.base_layer.weight, weight - topr, atol=1e-5)  # the residual
    # A and B share the singular values evenly: A Aᵀ = B ᵀB = diag(S_r / s)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert torch.allclose(a @ a.T, b.T @ b, atol=1e-4)


def test_randomized_pissa_within_tolerance() -> None:
    """pissa_niter_4 on a matrix with a spectral gap: reconstruction within 1e-4 (relative,
    Frobenius) of the exact top-r SVD."""
    weight = _decaying_weight(40, 32)
    torch.manual_seed(0)
    a, b = pissa_factors(weight, R, scaling=2.0, niter=4)
    recon = 2.0 * b @ a
    topr = _direct_topr(weight).float()
    assert float((recon - topr).norm() / topr.norm()) < 1e-4
    adapted, _ = _adapt(weight, "pissa_niter_4")
    layer = adapted.model.proj
    assert torch.allclose(layer.base_layer.weight + layer.get_delta_weight("default"), weight, atol=1e-5)


def test_olora_q_r_reproduce_first_columns() -> None:
    weight = _decaying_weight()
    adapted, _ = _adapt(weight, "olora")
    layer = adapted.model.proj
    q, r = layer.lora_B["default"].weight, layer.lora_A["default"].weight
    assert torch.allclose(q.T @ q, torch.eye(R), atol=1e-5)  # orthonormal columns
    assert torch.allclose(torch.triu(r[:, :R]), r[:, :R])  # R upper triangular
    assert torch.allclose(q @ r[:, :R], weight[:, :R], atol=1e-5)  # W's first r columns
    s = layer.scaling["default"]
    assert torch.allclose(layer.base_layer.weight, weight - s * q @ r, atol=1e-5)
    a2, b2 = olora_factors(weight, R)
    assert torch.allclose(a2, r) and torch.allclose(b2, q)


def test_gaussian_init_spread() -> None:
    torch.manual_seed(0)
    model = OneLinear(torch.randn(8, 512))
    adapted = get_adapted_model(model, LoraConfig(r=4, target_modules=["proj"], init_lora_weights="gaussian"))
    a = adapted.model.proj.lora_A["default"].weight
    assert abs(float(a.std()) - 1 / 4) < 0.02 and float(adapted.model.proj.lora_B["default"].weight.abs().max()) == 0.0


def test_pissa_on_gpt2_conv1d_transposed_weight() -> None:
    base = tiny_gpt2()
    adapted = get_adapted_model(
        clone(base), LoraConfig(r=R, target_modules=["c_attn"], init_lora_weights="pissa")
    ).eval()
    x = ids(vocab=300)
    assert rel_err(out(adapted, x), out(base, x)) < 1e-5
    layer = adapted.model.transformer.h[0].attn.c_attn
    original = base.transformer.h[0].attn.c_attn.weight  # stored (in, out)
    assert torch.allclose(layer.base_layer.weight, original - _direct_topr(original.T).T.float(), atol=1e-5)


@pytest.mark.parametrize(
    "init,use_rslora", [("pissa", False), ("pissa", True), ("olora", False), ("pissa_niter_2", False)]
)
def test_conversion_to_plain_lora_loads_on_untouched_base(init: str, use_rslora: bool, tmp_path) -> None:
    base = tiny_llama()
    config = LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["q_proj", "v_proj", "gate_proj"],
        init_lora_weights=init,
        use_rslora=use_rslora,
    )
    adapted = get_adapted_model(clone(base), config).eval()
    adapted.save_pretrained(tmp_path / "initial")
    perturb_adapters(adapted, scale=0.05)
    adapted.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "initial")
    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["init_lora_weights"] is True
    assert saved["lora_alpha"] == pytest.approx(4 * (2**0.5 if use_rslora else 2))
    loaded = AdaptedModel.from_pretrained(clone(base), tmp_path / "lora").eval()
    # the untouched base stays untouched (plain LoRA init does not mutate it)
    assert torch.equal(
        loaded.model.model.layers[0].self_attn.q_proj.base_layer.weight, base.model.layers[0].self_attn.q_proj.weight
    )
    x = ids(vocab=300)
    assert rel_err(out(loaded, x), out(adapted, x)) <= 1e-5
