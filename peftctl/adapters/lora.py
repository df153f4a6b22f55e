"""LoRA (Hu et al., 2021): W' = W + (lora_alpha / r) · B A, with A ∈ R^{r×in}, B ∈ R^{out×r}.

The forward never materialises ΔW: y = base(x) + dropout(x) Aᵀ Bᵀ · scale (paper eq. 3).
rsLoRA (Kalajdzievski, 2023) uses scale = lora_alpha / sqrt(r).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from peftctl.adapters.base import AdapterLayer
from peftctl.adapters.config import AdapterConfig
from peftctl.errors import ConfigError

INIT_CHOICES = "true, false, 'gaussian', 'pissa', 'pissa_niter_N', 'olora', 'loftq'"


@dataclass
class LoraConfig(AdapterConfig):
    method: ClassVar[str] = "lora"
    peft_type: ClassVar[str] = "LORA"

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layer_replication: list[list[int]] | None = None
    loftq_config: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        self._check(isinstance(self.r, int) and self.r > 0, "r", self.r, "expected an integer > 0")
        self._check(self.lora_alpha > 0, "lora_alpha", self.lora_alpha, "expected a number > 0")
        self._check(0.0 <= self.lora_dropout < 1.0, "lora_dropout", self.lora_dropout, "expected 0 <= p < 1")
        self._check(self.bias in ("none", "all", "lora_only"), "bias", self.bias, "expected one of none, all, lora_only")
        init = self.init_lora_weights
        valid_init = isinstance(init, bool) or init in ("gaussian", "pissa", "olora", "loftq", "eva", "corda") or (
            isinstance(init, str) and init.startswith("pissa_niter_") and init[len("pissa_niter_"):].isdigit()
        )
        self._check(valid_init, "init_lora_weights", init, f"expected one of {INIT_CHOICES}")
        for name, rank in self.rank_pattern.items():
            if not (isinstance(rank, int) and rank > 0):
                raise ConfigError(f"adapter.rank_pattern[{name!r}]={rank!r} is not valid; expected an integer > 0")

    def rank_and_alpha_for(self, module_name: str) -> tuple[int, float]:
        """Per-module r / alpha from rank_pattern / alpha_pattern (regex or name-suffix, as PEFT)."""
        import re

        def lookup(pattern: dict[str, Any], default: Any) -> Any:
            for key, value in pattern.items():
                if re.match(rf"(.*\.)?({key})$", module_name):
                    return value
            return default

        return lookup(self.rank_pattern, self.r), lookup(self.alpha_pattern, self.lora_alpha)


def _is_conv1d_gpt2(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_in_out(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of nn.Linear or GPT-2's Conv1D (weight stored (in, out))."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if _is_conv1d_gpt2(module):
        return module.weight.shape[0], module.weight.shape[1]
    raise TypeError(type(module).__name__)


class LoraLinear(AdapterLayer):
    """LoRA on nn.Linear and GPT-2 Conv1D (fan_in_fan_out: weight stored transposed)."""

    adapter_layer_names = ("lora_A", "lora_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        self.in_features, self.out_features = linear_in_out(base_layer)
        self.fan_in_fan_out = _is_conv1d_gpt2(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}

    def update_layer(self, adapter_name: str, config: LoraConfig) -> None:
        r, alpha = config.rank_and_alpha_for(self.module_name)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        weight = self.weight
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, device=weight.device)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, device=weight.device)
        self.adapter_configs[adapter_name] = config
        self.reset_lora_parameters(adapter_name, config.init_lora_weights)
        if config.init_lora_weights == "loftq":
            from peftctl.adapters.loftq import apply_loftq

            apply_loftq(self, adapter_name, config.loftq_config)

    def reset_lora_parameters(self, adapter_name: str, init: bool | str) -> None:
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        with torch.no_grad():
            if init is False:
                # random B as well: a non-identity start, used by tests
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                nn.init.normal_(b, std=0.02)
            elif init == "gaussian":
                nn.init.normal_(a, std=1.0 / self.r[adapter_name])
                nn.init.zeros_(b)
            else:
                # the reference implementation's default: A Kaiming-uniform, B zero -> ΔW = 0
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                nn.init.zeros_(b)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        a = self.lora_A[adapter_name].weight
        b = self.lora_B[adapter_name].weight
        delta = (b.float() @ a.float()) * self.scaling[adapter_name]
        return delta.T if self.fan_in_fan_out else delta

    def adapter_output(self, x: torch.Tensor, result: torch.Tensor, adapter_name: str) -> torch.Tensor:
        lora_a = self.lora_A[adapter_name]
        lora_b = self.lora_B[adapter_name]
        if not torch.is_autocast_enabled(x.device.type):  # under autocast the matmuls pick the dtype
            x = x.to(lora_a.weight.dtype)
        update = lora_b(lora_a(self.lora_dropout[adapter_name](x))) * self.scaling[adapter_name]
        return result + update.to(result.dtype)


def create_lora_layer(module: nn.Module, module_name: str, config: LoraConfig) -> AdapterLayer | None:
    """The LoRA layer class for a base module type, or None when LoRA does not apply to it."""
    if isinstance(module, nn.Linear) or _is_conv1d_gpt2(module):
        return LoraLinear(module, module_name)
    return None


def _method() -> "Method":
    from peftctl.adapters.registry import Method

    return Method("lora", LoraConfig, create_lora_layer, (LoraLinear,))


METHOD = _method()
