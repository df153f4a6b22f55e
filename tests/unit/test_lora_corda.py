"""init_lora_weights='corda' (Yang et al., 2024) against its definition (best rank-r approximation of
W·C' with C' the damped input covariance, W unchanged overall at init), against peft's
preprocess_corda + get_peft_model (ipm and kpm, Linear and GPT-2 Conv1D, cache files), and
through `peftctl train adapter=corda`."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from _lora_fixtures import tiny_gpt2, tiny_llama
from torch import nn

from peftctl.adapters import AdaptedModel, get_adapted_model
from peftctl.adapters.lora import LoraConfig
from peftctl.adapters.lora.corda import preprocess_corda
from peftctl.errors import ConfigError

R = 3


def _import_peft_corda() -> Any:
    from peft.tuners.lora import corda  # needs attrs (in the test extra)

    return corda


class OneLinear(nn.Module):
    def __init__(self, seed: int = 0, in_f: int = 10, out_f: int = 12) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(in_f, out_f, bias=False)

    def forward(self, x: torch.Tensor, attention_mask: Any = None) -> torch.Tensor:
        return self.proj(x)


def _samples(n: int = 6, t: int = 8, d: int = 10, seed: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(3.0, 0.2, d)  # anisotropic inputs: C is far from a multiple of I
    return [torch.randn(1, t, d, generator=g) * scale for _ in range(n)]


def _damped_covariance(samples: list[torch.Tensor]) -> torch.Tensor:
    """The definition, computed independently: mean of X_nᵀX_n / max(X_n)², damped until invertible."""
    c = sum((x[0] / x[0].max().abs()).T @ (x[0] / x[0].max().abs()) for x in samples) / len(samples)
    damp = 0.01
    while True:
        fixed = c + torch.eye(c.shape[0]) * c.diagonal().mean() * damp
        if float(torch.dist(fixed @ torch.linalg.inv(fixed), torch.eye(c.shape[0]))) < 0.05:
            return fixed
        damp *= 2


def _corda(model: nn.Module, config: LoraConfig, batches: list[dict[str, torch.Tensor]]) -> AdaptedModel:
    preprocess_corda(model, config, dataloader=batches)
    return get_adapted_model(model, config)


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_adapter_is_the_context_oriented_truncation_and_output_is_unchanged(method: str) -> None:
    """ipm: s·BA·C' is the best rank-r approximation of W·C' (the r largest singular triplets);
    kpm: the r smallest. W_res + s·BA = W, so the output is unchanged at init."""
    model = OneLinear()
    weight = model.proj.weight.detach().clone()
    samples = _samples()
    x = samples[0]
    before = model(x)
    config = LoraConfig(
        r=R,
        lora_alpha=6,
        target_modules=["proj"],
        task_type=None,
        init_lora_weights="corda",
        corda_config={"corda_method": method},
    )
    adapted = _corda(model, config, [{"x": s} for s in samples])
    layer = adapted.model.proj
    s = layer.scaling["default"]
    delta = s * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert torch.allclose(layer.base_layer.weight + delta, weight, atol=1e-5)
    assert torch.allclose(adapted(x), before, atol=1e-5)
    c = _damped_covariance(samples)
    u, sv, vh = torch.linalg.svd(weight.double() @ c.double(), full_matrices=False)
    keep = slice(0, R) if method == "ipm" else slice(len(sv) - R, len(sv))
    expected = (u[:, keep] * sv[keep]) @ vh[keep]
    assert torch.allclose((delta @ c).double(), expected, atol=1e-4 * float(sv[0]))
    # A Aᵀ-free check of the split: B = U_r sqrt(S_r/s) has orthogonal columns of norm² S_r/s
    b = layer.lora_B["default"].weight.double()
    assert torch.allclose(b.T @ b, torch.diag(sv[keep] / s), rtol=1e-3, atol=1e-6)


def test_padding_is_left_out_and_batches_match_single_samples() -> None:
    """Batched samples with an attention mask give the same covariance as the unpadded samples one by one."""
    samples = [s[:, : 8 - i] for i, s in enumerate(_samples(n=4))]
    config = LoraConfig(r=R, target_modules=["proj"], task_type=None, init_lora_weights="corda")
    one_by_one = _corda(OneLinear(), config, [{"x": s} for s in samples])
    padded = torch.zeros(4, 8, 10)
    mask = torch.zeros(4, 8, dtype=torch.long)
    for i, s in enumerate(samples):
        padded[i, : s.shape[1]] = s[0] + 0
        padded[i, s.shape[1] :] = 50.0  # garbage the mask must hide
        mask[i, : s.shape[1]] = 1
    batched = _corda(OneLinear(), config, [{"x": padded, "attention_mask": mask}])
    for name in ("lora_A", "lora_B"):
        assert torch.allclose(
            getattr(one_by_one.model.proj, name)["default"].weight,
            getattr(batched.model.proj, name)["default"].weight,
            atol=1e-5,
        )


@pytest.mark.parametrize("arch,method", [("llama", "ipm"), ("llama", "kpm"), ("gpt2", "ipm")])
def test_matches_peft_preprocess_corda(arch: str, method: str) -> None:
    """Same tiny model and samples (batch size 1, as peft's hook expects): the same B·A and residual
    base weights (compared as products: singular vectors are defined up to sign). Batches of 8 padded
    samples would give the same covariance (test above); peft's hook needs batch size 1."""
    import peft

    peft_preprocess = _import_peft_corda().preprocess_corda

    model = tiny_llama() if arch == "llama" else tiny_gpt2()
    # explicit names: peft's preprocess_corda does not expand "all-linear"
    targets = (
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        if arch == "llama"
        else ["c_attn", "c_proj", "c_fc"]
    )
    g = torch.Generator().manual_seed(5)
    samples = [torch.randint(0, 300, (1, 24), generator=g) for _ in range(8)]
    ours = _corda(
        copy.deepcopy(model),
        LoraConfig(
            r=4, lora_alpha=8, target_modules=targets, init_lora_weights="corda", corda_config={"corda_method": method}
        ),
        [{"input_ids": s} for s in samples],
    )
    theirs_model = copy.deepcopy(model)
    peft_config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        init_lora_weights="corda",
        corda_config=peft.tuners.lora.config.CordaConfig(corda_method=method),
        fan_in_fan_out=arch == "gpt2",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_preprocess(theirs_model, peft_config, run_model=lambda: [theirs_model(input_ids=s) for s in samples])
        theirs = peft.get_peft_model(theirs_model, peft_config)
    n = 0
    for name, layer in ours.adapter_layers():
        their_layer = theirs.base_model.model.get_submodule(name)
        ba = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        their_ba = their_layer.lora_B["default"].weight @ their_layer.lora_A["default"].weight
        # float32 round-off amplified by C'⁻¹ (summation order differs): 1e-3 relative, not bit-equal
        assert (ba - their_ba).abs().max() <= 1e-3 * their_ba.abs().max(), name
        assert (layer.base_layer.weight - their_layer.base_layer.weight).abs().max() <= 1e-5, name
        n += 1
    assert n == (14 if arch == "llama" else 8)
    ids = samples[0]
    with torch.no_grad():
        assert (ours(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() <= 1e-4


def test_cache_file_is_reused_and_peft_reads_it(tmp_path: Path) -> None:
    """corda_config.cache_file: written on the first preprocess, then enough without data, in
    peftctl (also at injection alone) and in peft (same file format)."""
    import peft

    peft_preprocess = _import_peft_corda().preprocess_corda

    model = tiny_llama()
    cache = str(tmp_path / "corda" / "cache.pt")
    covariance = str(tmp_path / "corda" / "cov.pt")
    config = LoraConfig(
        r=4,
        target_modules=["q_proj", "down_proj"],
        init_lora_weights="corda",
        corda_config={"cache_file": cache, "covariance_file": covariance},
    )
    samples = [
        {"input_ids": torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(i))} for i in range(6)
    ]
    first = _corda(copy.deepcopy(model), config, samples)
    assert Path(cache).is_file() and Path(covariance).is_file()
    again = _corda(copy.deepcopy(model), config, [])  # no data: the cache is enough
    injected_only = get_adapted_model(copy.deepcopy(model), config)  # no preprocess: read at injection
    kpm_from_covariance = _corda(
        copy.deepcopy(model), config.replace(corda_config={"covariance_file": covariance, "corda_method": "kpm"}), []
    )
    peft_model = copy.deepcopy(model)
    peft_config = peft.LoraConfig(
        r=4,
        target_modules=["q_proj", "down_proj"],
        init_lora_weights="corda",
        corda_config=peft.tuners.lora.config.CordaConfig(cache_file=cache),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_preprocess(peft_model, peft_config)
        theirs = peft.get_peft_model(peft_model, peft_config)
    for name, layer in first.adapter_layers():
        a = layer.lora_A["default"].weight
        for other in (again, injected_only):
            assert torch.equal(other.model.get_submodule(name).lora_A["default"].weight, a)
        assert torch.allclose(theirs.base_model.model.get_submodule(name).lora_A["default"].weight, a, atol=1e-6)
        s_kpm = torch.linalg.svdvals(kpm_from_covariance.model.get_submodule(name).lora_B["default"].weight.detach())
        assert float(s_kpm.max()) < float(
            torch.linalg.svdvals(layer.lora_B["default"].weight.detach()).min()
        )  # the smallest triplets


def test_corda_errors() -> None:
    with pytest.raises(
        ConfigError, match=r"adapter.corda_config.corda_method='xpm' is not valid; expected 'ipm' or 'kpm'"
    ):
        LoraConfig.from_dict({"init_lora_weights": "corda", "corda_config": {"corda_method": "xpm"}})
    with pytest.raises(ConfigError, match=r"adapter.corda_config.cache is not a CorDA option"):
        LoraConfig.from_dict({"init_lora_weights": "corda", "corda_config": {"cache": "x"}})
    with pytest.raises(ConfigError, match="has no CorDA eigens; call preprocess_corda"):
        get_adapted_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], init_lora_weights="corda"))
    with pytest.raises(ConfigError, match="CorDA needs sample data"):
        preprocess_corda(tiny_llama(), LoraConfig(target_modules=["q_proj"], init_lora_weights="corda"))


def test_peftctl_train_adapter_corda_saves_a_lora_for_the_untouched_base(tmp_path: Path) -> None:
    """`peftctl train adapter=corda`: CorDA from training samples, the final adapter converted to a
    rank-2r LoRA against the original W (as PiSSA's), loaded by peft with the same logits."""
    from peft import PeftModel
    from typer.testing import CliRunner

    from peftctl.cli import app
    from peftctl.models.loader import load_model
    from peftctl.runs import open_source

    run = tmp_path / "corda"
    short = [
        "train.max_steps=3",
        "train.batch_size=8",
        "train.save_every=0",
        "train.eval_every=0",
        "dataset.max_samples=48",
    ]
    result = CliRunner().invoke(app, ["train", "adapter=corda", *short, f"output_dir={run}", "--quiet"])
    assert result.exit_code == 0, result.output
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    initial = json.loads((run / "initial_adapter" / "adapter_config.json").read_text())
    assert initial["init_lora_weights"] == "corda" and config["init_lora_weights"] is True
    assert config["r"] == 2 * initial["r"] and config["corda_config"] is None
    model_cfg = open_source(run).config.model
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    ours = AdaptedModel.from_pretrained(load_model(model_cfg), run / "adapter").eval()
    theirs = PeftModel.from_pretrained(load_model(model_cfg), str(run / "adapter")).eval()
    with torch.no_grad():
        ours_logits, theirs_logits = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
        base = load_model(model_cfg)(input_ids=ids).logits
    assert (ours_logits - theirs_logits).abs().max().item() <= 1e-5
    assert (ours_logits - base).abs().max().item() > 0
