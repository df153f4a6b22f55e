"""LoHa (Hyeon-Woo et al., 2022, "FedPara"; LyCORIS): low-rank Hadamard product.

    ΔW = (W1a W1b) ⊙ (W2a W2b) · alpha / r                                   (FedPara eq. 2)

For Conv2d / Conv1d the delta is built on the flattened kernel (out, in·kh·kw); with
``use_effective_conv2d`` the spatial kernel gets its own CP core tensors t1, t2 (FedPara
Prop. 3): ΔW[p,r,k,l] = Σ_ij t[i,j,k,l] W_b[j,r] W_a[i,p] for each factor (a Conv1d kernel k is
handled as (k, 1), PEFT's layout). Kernels of size 1 never use the CP form (as PEFT). Tensor
names are PEFT's (``hada_w1_a`` ...).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftctl.adapters.core.base import AdapterLayer
from peftctl.adapters.core.config import AdapterConfig
from peftctl.adapters.core.method import AdapterMethod


def pattern_value(pattern: dict[str, Any], module_name: str, default: Any) -> Any:
    """PEFT's get_pattern_key rule: a key matches a module name suffix (regex allowed)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


@dataclass
class LycorisCommon(AdapterConfig):
    """Fields LoHa and LoKr share (PEFT's LycorisConfig)."""

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    init_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        self._check(isinstance(self.r, int) and self.r > 0, "r", self.r, "expected an integer > 0")
        self._check(0.0 <= self.rank_dropout < 1.0, "rank_dropout", self.rank_dropout, "expected 0 <= p < 1")
        self._check(0.0 <= self.module_dropout < 1.0, "module_dropout", self.module_dropout, "expected 0 <= p < 1")

    def rank_and_alpha_for(self, module_name: str) -> tuple[int, float]:
        return pattern_value(self.rank_pattern, module_name, self.r), pattern_value(
            self.alpha_pattern, module_name, self.alpha
        )


@dataclass
class LoHaConfig(LycorisCommon):
    method: ClassVar[str] = "loha"
    peft_type: ClassVar[str] = "LOHA"

    def validate(self) -> None:
        super().validate()
        self._check(isinstance(self.init_weights, bool), "init_weights", self.init_weights, "expected true or false")


class LycorisLayer(AdapterLayer):
    """Common forward for delta-weight methods on Linear / Conv1d / Conv2d: y = base(x) + op(x, ΔW)."""

    other_param_names = ("r", "alpha", "scaling", "rank_dropout", "module_dropout")

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        self.is_conv = isinstance(base_layer, (nn.Conv1d, nn.Conv2d))
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.module_dropout: dict[str, float] = {}

    def _set_common(self, adapter_name: str, config: LycorisCommon) -> int:
        r, alpha = config.rank_and_alpha_for(self.module_name)
        self.r[adapter_name], self.alpha[adapter_name], self.scaling[adapter_name] = r, alpha, alpha / r
        self.rank_dropout[adapter_name] = config.rank_dropout
        self.module_dropout[adapter_name] = config.module_dropout
        self.adapter_configs[adapter_name] = config
        return r

    def raw_delta(self, adapter_name: str) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        return self.raw_delta(adapter_name).reshape(self.weight.shape)

    def _rank_drop(self, delta: torch.Tensor, adapter_name: str) -> torch.Tensor:
        # LyCORIS rank dropout: drop whole output rows of ΔW while training
        p = self.rank_dropout[adapter_name]
        if not (self.training and p > 0):
            return delta
        keep = (torch.rand(delta.shape[0], device=delta.device) > p).to(delta.dtype)
        keep = keep / keep.mean().clamp_min(1e-12) if self._rescale_rank_drop(adapter_name) else keep
        return delta * keep.view(-1, *[1] * (delta.dim() - 1))

    def _rescale_rank_drop(self, adapter_name: str) -> bool:
        return True

    def adapter_output(self, x: torch.Tensor, result: torch.Tensor, adapter_name: str) -> torch.Tensor:
        if self.training and torch.rand(1).item() < self.module_dropout[adapter_name]:
            return result
        delta = self._rank_drop(self.get_delta_weight(adapter_name), adapter_name)
        x = x.to(delta.dtype)
        if self.is_conv:  # the base conv's stride / padding / dilation / groups, no bias
            out = self.base_layer._conv_forward(x, delta, None)
        else:
            out = F.linear(x, delta)
        return result + out.to(result.dtype)


def conv_shape(base: nn.Conv1d | nn.Conv2d) -> tuple[int, ...]:
    """(out, in / groups, *kernel) of a Conv1d / Conv2d weight."""
    return base.out_channels, base.in_channels // base.groups, *base.kernel_size


def cp_kernel(kernel: tuple[int, ...]) -> tuple[int, int]:
    """Spatial shape of a CP core: (kh, kw), or (k, 1) for Conv1d (PEFT's 2-D assumption)."""
    return (kernel[0], 1) if len(kernel) == 1 else (kernel[0], kernel[1])


def uses_cp(base: nn.Module, config: "LycorisCommon") -> bool:
    """use_effective_conv2d applies to convolutions with a kernel larger than 1 (as PEFT)."""
    return (
        isinstance(base, (nn.Conv1d, nn.Conv2d))
        and config.use_effective_conv2d
        and any(k != 1 for k in base.kernel_size)
    )


def cp_weight(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Tucker/CP rebuild of a conv kernel: t (r, r, kh, kw), wa (r, out), wb (r, in) -> (out, in, kh, kw)."""
    return torch.einsum("i j k l, j r, i p -> p r k l", t, wb, wa)


def kaiming_(p: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(p, a=math.sqrt(5))


class LoHaLayer(LycorisLayer):
    adapter_layer_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        for attr in self.adapter_layer_names:
            setattr(self, attr, nn.ParameterDict())

    def update_layer(self, adapter_name: str, config: LoHaConfig) -> None:
        r = self._set_common(adapter_name, config)
        device = self.weight.device

        def new(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, device=device))

        base = self.base_layer
        if uses_cp(base, config):
            out_c, in_c, *kernel = conv_shape(base)
            for i in ("1", "2"):
                getattr(self, f"hada_t{i}")[adapter_name] = new(r, r, *cp_kernel(tuple(kernel)))
                getattr(self, f"hada_w{i}_a")[adapter_name] = new(r, out_c)
                getattr(self, f"hada_w{i}_b")[adapter_name] = new(r, in_c)
        else:
            out_f = self.weight.shape[0]
            in_f = self.weight[0].numel()
            for i in ("1", "2"):
                getattr(self, f"hada_w{i}_a")[adapter_name] = new(out_f, r)
                getattr(self, f"hada_w{i}_b")[adapter_name] = new(r, in_f)
        with torch.no_grad():
            for attr in self.adapter_layer_names:
                if adapter_name in getattr(self, attr):
                    kaiming_(getattr(self, attr)[adapter_name])
            if config.init_weights:
                # one zero factor makes ΔW = 0 at the start
                nn.init.zeros_(self.hada_w2_b[adapter_name])

    def raw_delta(self, adapter_name: str) -> torch.Tensor:
        w1a, w1b = self.hada_w1_a[adapter_name], self.hada_w1_b[adapter_name]
        w2a, w2b = self.hada_w2_a[adapter_name], self.hada_w2_b[adapter_name]
        if adapter_name in self.hada_t1:
            first = cp_weight(self.hada_t1[adapter_name], w1a, w1b)
            second = cp_weight(self.hada_t2[adapter_name], w2a, w2b)
        else:
            first, second = w1a @ w1b, w2a @ w2b
        return first * second * self.scaling[adapter_name]


def create_loha_layer(module: nn.Module, module_name: str, config: LoHaConfig) -> AdapterLayer | None:
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        return LoHaLayer(module, module_name)
    return None


class LoHaMethod(AdapterMethod):
    name = "loha"
    config_cls = LoHaConfig
    layer_types = (LoHaLayer,)

    def create_layer(self, module: nn.Module, module_name: str, config: LoHaConfig) -> AdapterLayer | None:
        return create_loha_layer(module, module_name, config)


METHOD = LoHaMethod()
