"""Shared checks for the weight-based method tests (tiny models, PEFT-interop helpers).

The PEFT format was checked against peft 0.21.2 (installed as the test oracle only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from peftctl.adapters import AdaptedModel, get_adapted_model
from peftctl.adapters.core.config import AdapterConfig

PEFT_VERSION_CHECKED = "0.21.2"


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


class TinyConvNet(nn.Module):
    """Conv2d (3x3 and 1x1) + Linear: for the Conv2d paths."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.lin = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.lin(h.mean(dim=(2, 3)))


def tiny_conv(seed: int = 0) -> TinyConvNet:
    torch.manual_seed(seed)
    return TinyConvNet().eval()


class TinyConv1dNet(nn.Module):
    """Conv1d (kernel 3 and 1) + Linear: for the Conv1d paths."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 32, 3, padding=1)
        self.conv2 = nn.Conv1d(32, 8, 1)
        self.lin = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.lin(h.mean(dim=2))


def tiny_conv1d(seed: int = 0) -> TinyConv1dNet:
    torch.manual_seed(seed)
    return TinyConv1dNet().eval()


def conv1d_input(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 10, generator=g)


def input_ids(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 300, (2, 7), generator=g)


def conv_input(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 6, 6, generator=g)


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def perturb(adapted: AdaptedModel, adapter_name: str = "default", scale: float = 0.1, seed: int = 3) -> None:
    """Move every adapter tensor away from its (identity) init so merges are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapted.adapter_parameters(adapter_name):
            p.add_(torch.randn(p.shape, generator=g) * scale)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def check_identity(make_base: Callable[[], nn.Module], config: AdapterConfig, x: torch.Tensor) -> None:
    base_out = run(make_base(), x)
    adapted = get_adapted_model(make_base(), config)
    assert torch.allclose(run(adapted, x), base_out, atol=1e-6)


def check_merge_roundtrip(adapted: AdaptedModel, x: torch.Tensor) -> None:
    """merged == unmerged, unmerge restores, disabled == base, merge_and_unload == adapted."""
    with adapted.disable_adapter():
        base_out = run(adapted, x)
    out = run(adapted, x)
    assert rel_err(out, base_out) > 1e-4, "adapter has no effect; the merge check would be vacuous"
    adapted.merge_adapter()
    assert rel_err(run(adapted, x), out) <= 1e-5
    adapted.unmerge_adapter()
    assert rel_err(run(adapted, x), out) <= 1e-5
    with adapted.disable_adapter():
        assert rel_err(run(adapted, x), base_out) <= 1e-5
    plain = adapted.merge_and_unload()
    assert rel_err(run(plain, x), out) <= 1e-5


def check_save_load(adapted: AdaptedModel, make_base: Callable[[], nn.Module], x: torch.Tensor, tmp: Path) -> None:
    out = run(adapted, x)
    adapted.save_pretrained(tmp)
    loaded = AdaptedModel.from_pretrained(make_base(), tmp)
    assert torch.equal(run(loaded, x), out)


def check_only_adapter_trains(adapted: AdaptedModel, markers: tuple[str, ...]) -> None:
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable, "nothing trains"
    assert all(any(m in n for m in markers) for n in trainable), trainable
    assert all(".default" in n for n in trainable)


def ours_to_peft(adapted: AdaptedModel, make_base: Callable[[], nn.Module], x: torch.Tensor, tmp: Path) -> None:
    """peft loads what we save and computes the same output."""
    from peft import PeftModel

    adapted.save_pretrained(tmp)
    theirs = PeftModel.from_pretrained(make_base(), str(tmp)).eval()
    assert rel_err(run(theirs, x), run(adapted, x)) <= 1e-5


def peft_to_ours(
    peft_config, make_base: Callable[[], nn.Module], x: torch.Tensor, tmp: Path, seed: int = 5
) -> AdaptedModel:
    """We load what peft saves (its adapter randomised) and compute the same output."""
    from peft import get_peft_model

    theirs = get_peft_model(make_base(), peft_config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    theirs.save_pretrained(str(tmp))
    ours = AdaptedModel.from_pretrained(make_base(), tmp)
    assert rel_err(run(ours, x), run(theirs, x)) <= 1e-5
    return ours


def interop_both_ways(
    config: AdapterConfig, peft_config, make_base: Callable[[], nn.Module], x: torch.Tensor, tmp: Path
) -> None:
    """ours_to_peft on our (perturbed) adapter, then peft_to_ours on peft's for the same config."""
    adapted = get_adapted_model(make_base(), config)
    perturb(adapted)
    ours_to_peft(adapted, make_base, x, tmp / "ours")
    peft_to_ours(peft_config, make_base, x, tmp / "theirs")


def check_multi_adapter(
    make_base: Callable[[], nn.Module],
    make_config: Callable[[], AdapterConfig],
    x: torch.Tensor,
    tmp: Path,
    mergeable: bool = True,
) -> None:
    """add (inactive, frozen) -> set -> save both -> load both -> delete -> merge the first."""
    adapted = get_adapted_model(make_base(), make_config())
    perturb(adapted, "default")
    first = run(adapted, x)
    adapted.add_adapter("second", make_config())
    perturb(adapted, "second", seed=9)
    assert torch.equal(run(adapted, x), first), "adding an adapter changed the output"
    adapted.set_adapter("second")
    second = run(adapted, x)
    assert not torch.allclose(first, second)
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all(".second" in n for n in trainable)
    adapted.save_pretrained(tmp)
    loaded = AdaptedModel.from_pretrained(make_base(), tmp)
    loaded.load_adapter(tmp / "second", "second")
    loaded.set_adapter("second")
    assert torch.equal(run(loaded, x), second)
    adapted.delete_adapter("second")
    assert adapted.active_adapters == ["default"] and torch.equal(run(adapted, x), first)
    if mergeable:
        adapted.merge_adapter()
        assert rel_err(run(adapted, x), first) <= 1e-5


def check_yaml(method: str, **overrides) -> AdapterConfig:
    """configs/adapter/<method>.yaml builds that method's config (strict keys)."""
    import yaml

    from peftctl.adapters.core.registry import config_from_dict

    path = Path(__file__).resolve().parents[2] / "configs" / "adapter" / f"{method}.yaml"
    values = {**yaml.safe_load(path.read_text()), **overrides}
    config = config_from_dict(values)
    assert config.method == method
    return config
