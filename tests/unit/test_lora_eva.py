"""init_lora_weights='eva' (Paischer et al., 2024) against its definition (SVD of the stacked layer
inputs, rank redistribution by explained variance), against peft's initialize_lora_eva_weights,
and through `peftctl train adapter=eva`."""

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
from peftctl.adapters.lora.eva import distribute_ranks, initialize_lora_eva_weights
from peftctl.errors import ConfigError

D = 16  # feature size of the controlled models


class EmbedThenProject(nn.Module):
    """ids -> embedding -> two Linear layers with different inputs: ``wide`` sees the embedding,
    ``narrow`` only its first ``narrow_dim`` coordinates (so the two inputs have different spectra)."""

    def __init__(self, emb: torch.Tensor, narrow_dim: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding.from_pretrained(emb, freeze=True)
        self.narrow_dim = narrow_dim
        self.wide = nn.Linear(emb.shape[1], 8)
        self.narrow = nn.Linear(narrow_dim, 8)

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None, labels: Any = None) -> torch.Tensor:
        h = self.emb(input_ids)
        return self.wide(h) + self.narrow(h[..., : self.narrow_dim]).sum(-1, keepdim=True)


def _structured_embedding(
    vocab: int = 64, seed: int = 0, spectrum: tuple[float, ...] = (8.0, 6.0, 4.0, 3.0)
) -> torch.Tensor:
    """Token vectors with a clear spectral gap: strong directions ``spectrum``, then small noise."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
    coeff = torch.randn(vocab, D, generator=g) * torch.tensor(list(spectrum) + [0.05] * (D - len(spectrum)))
    return coeff @ q.T


def _batches(n: int = 8, b: int = 4, t: int = 12, vocab: int = 64, seed: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (b, t), generator=g)
        attention = torch.ones_like(ids)
        attention[0, t - 4 :] = 0
        labels = ids.clone()
        labels[:, :2] = -100
        out.append({"input_ids": ids, "attention_mask": attention, "labels": labels})
    return out


def _recording_forward(seen: list[dict[str, torch.Tensor]]):
    def forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        seen.append(batch)
        return model(**batch)

    return forward


def _kept_rows(emb: torch.Tensor, batches: list[dict[str, torch.Tensor]], use_label_mask: bool = True) -> torch.Tensor:
    """The layer inputs EVA should use: embeddings of attended tokens whose label is not -100."""
    rows = []
    for batch in batches:
        mask = batch["attention_mask"].bool()
        if use_label_mask:
            mask &= batch["labels"] != -100
        rows.append(emb[batch["input_ids"][mask]])
    return torch.cat(rows)


def _min_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of the largest principal angle between the row spaces of a and b."""
    qa, qb = torch.linalg.qr(a.detach().T.double()).Q, torch.linalg.qr(b.detach().T.double()).Q
    return float(torch.linalg.svdvals(qa.T @ qb).min())


def _eva(model: nn.Module, batches: list, **kw: Any) -> AdaptedModel:
    eva_config = kw.pop("eva_config", {})
    forward = kw.pop("forward_fn", None)
    config = LoraConfig(init_lora_weights="eva", eva_config=eva_config, **kw)
    adapted = get_adapted_model(model, config)
    extra = {"forward_fn": forward} if forward else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return initialize_lora_eva_weights(adapted, batches, **extra)


# --------------------------------------------------------------------------- the definition
def test_a_spans_the_top_singular_subspace_of_the_masked_layer_inputs() -> None:
    """One layer: A (r rows, orthonormal) = top-r right-singular vectors of the centred stack of every
    input row the PCA saw (padding and label -100 positions left out). The incremental PCA keeps
    rho·r = 6 components between batches; everything it drops is the 0.05 noise floor, so it agrees
    with the direct SVD to 1e-4 (with rho=1 the truncation drops the σ=3 direction at every merge
    and the agreement is ~3e-4: the incremental algorithm is exact only up to what it truncates)."""
    emb = _structured_embedding()
    seen: list[dict[str, torch.Tensor]] = []
    adapted = _eva(
        EmbedThenProject(emb),
        _batches(),
        r=3,
        target_modules=["wide"],
        eva_config={"rho": 2.0, "tau": 0.999},
        forward_fn=_recording_forward(seen),
    )
    a = adapted.model.wide.lora_A["default"].weight
    assert a.shape == (3, D)
    assert torch.allclose(a @ a.T, torch.eye(3), atol=1e-5)
    pca_batches = seen[1:]  # the first forward only finds layers with equal inputs
    assert len(pca_batches) >= 2
    rows = _kept_rows(emb, pca_batches)
    _, _, vh = torch.linalg.svd(rows - rows.mean(0), full_matrices=False)
    assert _min_cos(a, vh[:3]) >= 0.9999
    assert torch.allclose(adapted.model.wide.lora_B["default"].weight, torch.zeros(8, 3))


def test_label_mask_excludes_prompt_positions() -> None:
    """Positions with label -100 carry a huge vector along one axis: with use_label_mask they do not
    count (A spans the top subspace of the other rows); without it, that axis is A's first component."""
    emb = _structured_embedding()
    spike = torch.zeros(D)
    spike[5] = 1.0
    emb[0] = 500.0 * spike  # token 0 appears only where the label is -100
    batches = _batches()
    for batch in batches:
        batch["input_ids"][:, :2] = 0
    seen: list[dict[str, torch.Tensor]] = []
    masked = _eva(
        EmbedThenProject(emb),
        batches,
        r=2,
        target_modules=["wide"],
        eva_config={"rho": 2.0, "tau": 0.999},
        forward_fn=_recording_forward(seen),
    )
    rows = _kept_rows(emb, seen[1:])
    assert not (rows @ spike > 100).any()
    _, _, vh = torch.linalg.svd(rows - rows.mean(0), full_matrices=False)
    assert _min_cos(masked.model.wide.lora_A["default"].weight, vh[:2]) >= 0.9999
    unmasked = _eva(
        EmbedThenProject(emb), batches, r=2, target_modules=["wide"], eva_config={"rho": 2.0, "use_label_mask": False}
    )
    assert abs(float(unmasked.model.wide.lora_A["default"].weight[0].detach() @ spike)) > 0.99


def test_whiten_divides_by_sqrt_singular_values() -> None:
    emb = _structured_embedding()
    seen: list[dict[str, torch.Tensor]] = []
    adapted = _eva(
        EmbedThenProject(emb),
        _batches(),
        r=3,
        target_modules=["wide"],
        eva_config={"rho": 2.0, "tau": 0.999, "whiten": True},
        forward_fn=_recording_forward(seen),
    )
    a = adapted.model.wide.lora_A["default"].weight.detach()
    rows = _kept_rows(emb, seen[1:])
    s = torch.linalg.svdvals(rows - rows.mean(0))[:3]
    assert torch.allclose(a.norm(dim=1), 1 / s.sqrt(), rtol=1e-3)


def test_distribute_ranks_takes_the_largest_ratios_within_the_budget() -> None:
    ratios = {
        "a": torch.tensor([0.5, 0.2, 0.01, 0.0]),
        "b": torch.tensor([0.3, 0.25, 0.24, 0.1]),
        "c": torch.tensor([0.02, 0.01, 0.0, 0.0]),
    }
    # top 6 of a[:4], b[:4], c[:4]: .5 .3 .25 .24 .2 .1 -> a 2, b 4, c 0
    assert distribute_ranks(ratios, {"a": 4, "b": 4, "c": 4}, 6) == {"a": 2, "b": 4, "c": 0}
    # a layer offers at most max_components: b's last two are not on offer
    assert distribute_ranks(ratios, {"a": 4, "b": 2, "c": 4}, 6) == {"a": 3, "b": 2, "c": 1}


def test_ranks_follow_explained_variance_and_sum_to_the_budget() -> None:
    """Two layers: ``narrow`` sees 4 strong coordinates (large explained-variance ratios), ``wide`` 16
    with a decaying spectrum. The redistributed ranks equal the greedy choice on the direct PCA's ratios
    and sum to r · n_layers."""
    emb = _structured_embedding(spectrum=(9.0, 3.0, 2.0, 1.5, 1.0, 0.8))
    seen: list[dict[str, torch.Tensor]] = []
    r, rho = 3, 2.0
    adapted = _eva(
        EmbedThenProject(emb),
        _batches(),
        r=r,
        target_modules=["wide", "narrow"],
        eva_config={"rho": rho, "tau": 0.999},
        forward_fn=_recording_forward(seen),
    )
    ranks = {n: layer.r["default"] for n, layer in adapted.adapter_layers()}
    assert sum(ranks.values()) == r * 2 and max(ranks.values()) <= round(r * rho)
    rows = _kept_rows(emb, seen[1:])
    ratios = {}
    for name, x in (("wide", rows), ("narrow", rows[:, :4])):
        s = torch.linalg.svdvals(x - x.mean(0))
        ratios[name] = s.square() / (x - x.mean(0)).square().sum()
    expected = distribute_ranks(ratios, {"wide": round(r * rho), "narrow": min(round(r * rho), 4)}, r * 2)
    assert ranks == expected and ranks["wide"] != ranks["narrow"]
    # adjust_scaling_factors: alpha follows the rank, so alpha / r is unchanged
    config = adapted.peft_config["default"]
    for name, layer in adapted.adapter_layers():
        assert layer.scaling["default"] == pytest.approx(config.lora_alpha / config.r)
        if ranks[name] != r:
            assert config.rank_pattern[name] == ranks[name]


def test_rank_zero_layer_is_removed_and_the_adapter_reloads(tmp_path: Path) -> None:
    """``narrow``'s 4 coordinates explain far more of their variance than any of ``wide``'s 16
    isotropic ones, so the whole budget goes to ``narrow``: ``wide`` loses its LoRA layer, target_modules
    and rank_pattern record it, and the saved adapter loads in peftctl and peft with the same output."""
    from peft import PeftModel

    g = torch.Generator().manual_seed(0)
    emb = torch.randn(64, D, generator=g)
    model = EmbedThenProject(emb)
    adapted = _eva(
        copy.deepcopy(model),
        _batches(),
        r=2,
        target_modules=["wide", "narrow"],
        task_type=None,
        eva_config={"rho": 2.0, "tau": 0.99},
    )
    assert isinstance(adapted.model.wide, nn.Linear) and adapted.model.narrow.r["default"] == 4
    config = adapted.peft_config["default"]
    assert (
        config.target_modules == ["narrow"]
        and config.rank_pattern == {"narrow": 4}
        and config.alpha_pattern == {"narrow": 16.0}
    )
    with torch.no_grad():
        adapted.model.narrow.lora_B["default"].weight.normal_()  # a trained adapter: B ≠ 0
    ids = _batches(1)[0]["input_ids"]
    out = adapted(input_ids=ids)
    adapted.save_pretrained(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "eva" and saved["rank_pattern"] == {"narrow": 4}
    ours = AdaptedModel.from_pretrained(copy.deepcopy(model), tmp_path / "a")
    theirs = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "a"))
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids), out, atol=1e-6)
        assert torch.allclose(theirs(input_ids=ids), out, atol=1e-6)


def test_b_is_zero_so_the_output_is_unchanged_at_init() -> None:
    model = tiny_llama()
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    batches = [
        {"input_ids": torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(i))} for i in range(6)
    ]
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    adapted = _eva(model, batches, r=4, lora_alpha=8, target_modules="all-linear", eva_config={"tau": 0.9})
    layers = dict(adapted.adapter_layers())
    for layer in layers.values():
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
        assert layer.lora_A["default"].weight.requires_grad and layer.lora_B["default"].weight.requires_grad
    with torch.no_grad():
        assert torch.equal(adapted(input_ids=ids).logits, before)
    # the budget r · n_targets is kept; here one layer got rank 0 and is no longer adapted
    assert sum(layer.r["default"] for layer in layers.values()) == 4 * len(targets)
    dropped = [n for n in targets if n not in layers]
    assert all(isinstance(adapted.model.get_submodule(n), nn.Linear) for n in dropped)
    assert adapted.peft_config["default"].target_modules == (list(layers) if dropped else "all-linear")


# --------------------------------------------------------------------------- vs peft
def _lm_batches(seed: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(6):
        ids = torch.randint(0, 300, (4, 16), generator=g)
        attention = torch.ones_like(ids)
        attention[0, 12:] = 0
        labels = ids.clone()
        labels[:, :3] = -100
        out.append({"input_ids": ids, "attention_mask": attention, "labels": labels})
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_matches_peft_initialize_lora_eva_weights(arch: str) -> None:
    """Same tiny model and batches: identical redistributed ranks and alphas; A's row spaces agree to
    a principal-angle cosine ≥ 0.99. Not bit-equal: peft's incremental PCA takes a randomized SVD
    (torch.svd_lowrank, q = 2k, 4 power iterations) at each step, peftctl an exact SVD, so the
    components differ slightly (and may rotate within near-degenerate singular pairs)."""
    import peft
    from peft.tuners.lora.eva import initialize_lora_eva_weights as peft_eva

    model = tiny_llama() if arch == "llama" else tiny_gpt2()
    batches = _lm_batches()
    options = {"rho": 2.0, "tau": 0.9}
    ours = _eva(copy.deepcopy(model), batches, r=4, lora_alpha=8, target_modules="all-linear", eva_config=options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(
            copy.deepcopy(model),
            peft.LoraConfig(
                r=4,
                lora_alpha=8,
                target_modules="all-linear",
                init_lora_weights="eva",
                eva_config=peft.EvaConfig(**options),
                fan_in_fan_out=arch == "gpt2",
            ),
        )
        peft_eva(theirs, batches, show_progress_bar=False)
    assert ours.peft_config["default"].rank_pattern == theirs.peft_config["default"].rank_pattern
    assert ours.peft_config["default"].alpha_pattern == theirs.peft_config["default"].alpha_pattern
    assert len(ours.peft_config["default"].rank_pattern) > 0  # the ranks really were redistributed
    for name, layer in ours.adapter_layers():
        a = layer.lora_A["default"].weight
        their_a = theirs.base_model.model.get_submodule(name).lora_A["default"].weight
        assert a.shape == their_a.shape
        assert _min_cos(a, their_a) >= 0.99, name


# --------------------------------------------------------------------------- config and the product
def test_eva_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"adapter.eva_config.rho=0.5 is not valid; expected a number >= 1"):
        LoraConfig.from_dict({"init_lora_weights": "eva", "eva_config": {"rho": 0.5}})
    with pytest.raises(ConfigError, match=r"adapter.eva_config.tau=1.5 is not valid"):
        LoraConfig.from_dict({"init_lora_weights": "eva", "eva_config": {"tau": 1.5}})
    with pytest.raises(ConfigError, match=r"adapter.eva_config.rh is not an EVA option"):
        LoraConfig.from_dict({"init_lora_weights": "eva", "eva_config": {"rh": 2}})
    with pytest.raises(ConfigError, match=r"adapter.eva_config.whiten='yes' is not valid; expected true or false"):
        LoraConfig.from_dict({"init_lora_weights": "eva", "eva_config": {"whiten": "yes"}})
    adapted = get_adapted_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="needs a LoRA adapter 'default' with init_lora_weights='eva'"):
        initialize_lora_eva_weights(adapted, _lm_batches())
    # batches of 6 tokens cannot feed a 16-component PCA: an error, not an endless loop
    short = [{"input_ids": torch.randint(0, 300, (1, 6))} for _ in range(3)]
    with pytest.raises(ConfigError, match="fewer tokens than the 16 components"):
        _eva(tiny_llama(), short, r=8, target_modules=["q_proj"])


def test_peftctl_train_adapter_eva_saves_an_adapter_peft_loads(tmp_path: Path) -> None:
    """`peftctl train adapter=eva` on the offline default: EVA runs on training batches before
    training, the saved adapter carries the rank pattern, and peft loads it with the same logits."""
    from peft import PeftModel
    from typer.testing import CliRunner

    from peftctl.cli import app
    from peftctl.models.loader import load_model
    from peftctl.runs import open_source

    run = tmp_path / "eva"
    short = [
        "train.max_steps=3",
        "train.batch_size=8",
        "train.save_every=0",
        "train.eval_every=0",
        "dataset.max_samples=48",
    ]
    result = CliRunner().invoke(app, ["train", "adapter=eva", *short, f"output_dir={run}", "--quiet"])
    assert result.exit_code == 0, result.output
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "eva" and config["rank_pattern"]
    r = config["r"]
    ranks = [config["rank_pattern"].get(name, r) for name in _linear_names(open_source(run).config.model)]
    assert sum(ranks) == r * len(ranks)  # the EVA budget
    model_cfg = open_source(run).config.model
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    ours = AdaptedModel.from_pretrained(load_model(model_cfg), run / "adapter").eval()
    theirs = PeftModel.from_pretrained(load_model(model_cfg), str(run / "adapter")).eval()
    assert [layer.r["default"] for _, layer in ours.adapter_layers()] == ranks
    with torch.no_grad():
        ours_logits, theirs_logits = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
        with ours.disable_adapter():
            base = ours(input_ids=ids).logits
    assert (ours_logits - theirs_logits).abs().max().item() <= 1e-5
    assert (ours_logits - base).abs().max().item() > 0  # trained: B moved away from 0


def _linear_names(model_cfg: Any) -> list[str]:
    from peftctl.adapters.core.inject import is_target, output_head_names
    from peftctl.models.loader import load_model

    model = load_model(model_cfg)
    heads = output_head_names(model)
    config = LoraConfig(target_modules="all-linear")
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and is_target(n, m, model, config, heads)]
