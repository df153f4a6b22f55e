"""LoKr (Yeh et al., 2024, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to
Model Evaluation"): Kronecker-product delta.

    ΔW = (W1 ⊗ W2) · alpha / r,   W1 ∈ R^{a×c} (or W1a W1b), W2 ∈ R^{b×d} (or W2a W2b)

with out = a·b and in = c·d from ``factorization`` (PEFT's rule: divisors closest to the square
root, or ``decompose_factor``). W2 is low-rank unless r ≥ max(b, d)/2; W1 is low-rank only with
``decompose_both`` and r < max(a, c)/2. For Conv2d W2 carries the kernel (b, d, kh, kw), with
``use_effective_conv2d`` as a CP core t2; Conv1d likewise with (b, d, k) (CP core (r, r, k, 1)).
A full 3-D W2 of a Conv1d is combined as PEFT 0.21 does: torch.kron(W1, W2) of the 2-D W1 and
3-D W2, reshaped to (out, in, k). Tensor names are PEFT's (``lokr_w1`` ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from peftctl.adapters.core.base import AdapterLayer
from peftctl.adapters.core.method import AdapterMethod
from peftctl.adapters.loha import LycorisCommon, LycorisLayer, conv_shape, cp_kernel, cp_weight, kaiming_, uses_cp


@dataclass
class LoKrConfig(LycorisCommon):
    method: ClassVar[str] = "lokr"
    peft_type: ClassVar[str] = "LOKR"

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    def validate(self) -> None:
        super().validate()
        self._check(
            self.init_weights in (True, False, "lycoris"),
            "init_weights",
            self.init_weights,
            "expected true, false or 'lycoris'",
        )
        self._check(
            self.decompose_factor == -1 or self.decompose_factor > 0,
            "decompose_factor",
            self.decompose_factor,
            "expected -1 or an integer > 0",
        )


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m·n = dimension and m <= n: m = factor when it divides, else the divisor pair
    nearest the square root not exceeding ``factor`` (LyCORIS's rule, as PEFT)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (m, n) if m <= n else (n, m)


class LoKrLayer(LycorisLayer):
    adapter_layer_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    other_param_names = LycorisLayer.other_param_names + ("rank_dropout_scale",)

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        for attr in self.adapter_layer_names:
            setattr(self, attr, nn.ParameterDict())
        self.rank_dropout_scale: dict[str, bool] = {}

    def update_layer(self, adapter_name: str, config: LoKrConfig) -> None:
        r = self._set_common(adapter_name, config)
        self.rank_dropout_scale[adapter_name] = config.rank_dropout_scale
        device = self.weight.device

        def new(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, device=device))

        kernel: tuple[int, ...] = ()
        if self.is_conv:
            out_dim, in_dim, *rest = conv_shape(self.base_layer)
            kernel = tuple(rest)
        else:
            out_dim, in_dim = self.weight.shape
        in_m, in_n = factorization(in_dim, config.decompose_factor)
        out_l, out_k = factorization(out_dim, config.decompose_factor)
        use_w1 = not (config.decompose_both and r < max(out_l, in_m) / 2)
        use_w2 = r >= max(out_k, in_n) / 2
        effective = uses_cp(self.base_layer, config)

        if use_w1:
            self.lokr_w1[adapter_name] = new(out_l, in_m)
        else:
            self.lokr_w1_a[adapter_name], self.lokr_w1_b[adapter_name] = new(out_l, r), new(r, in_m)
        if use_w2:
            self.lokr_w2[adapter_name] = new(out_k, in_n, *kernel)
        elif effective:
            self.lokr_t2[adapter_name] = new(r, r, *cp_kernel(kernel))
            self.lokr_w2_a[adapter_name], self.lokr_w2_b[adapter_name] = new(r, out_k), new(r, in_n)
        else:
            cols = in_n * math.prod(kernel)
            self.lokr_w2_a[adapter_name], self.lokr_w2_b[adapter_name] = new(out_k, r), new(r, cols)
        self._init(adapter_name, config.init_weights)

    def _init(self, adapter_name: str, init: bool | str) -> None:
        with torch.no_grad():
            for attr in self.adapter_layer_names:
                if adapter_name in getattr(self, attr):
                    kaiming_(getattr(self, attr)[adapter_name])
            if init == "lycoris":  # zero the second factor
                target = self.lokr_w2 if adapter_name in self.lokr_w2 else self.lokr_w2_b
                nn.init.zeros_(target[adapter_name])
            elif init:  # PEFT's default: zero the first factor
                target = self.lokr_w1 if adapter_name in self.lokr_w1 else self.lokr_w1_a
                nn.init.zeros_(target[adapter_name])

    def _rescale_rank_drop(self, adapter_name: str) -> bool:
        return self.rank_dropout_scale[adapter_name]

    def raw_delta(self, adapter_name: str) -> torch.Tensor:
        if adapter_name in self.lokr_w1:
            w1 = self.lokr_w1[adapter_name]
        else:
            w1 = self.lokr_w1_a[adapter_name] @ self.lokr_w1_b[adapter_name]
        if adapter_name in self.lokr_w2:
            w2 = self.lokr_w2[adapter_name]
        elif adapter_name in self.lokr_t2:
            w2 = cp_weight(self.lokr_t2[adapter_name], self.lokr_w2_a[adapter_name], self.lokr_w2_b[adapter_name])
        else:
            w2 = self.lokr_w2_a[adapter_name] @ self.lokr_w2_b[adapter_name]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        # densify: torch.kron fails on einsum outputs whose size-1 dims carry odd strides
        w2 = w2.reshape(-1).view(w2.shape)
        return torch.kron(w1, w2) * self.scaling[adapter_name]


def create_lokr_layer(module: nn.Module, module_name: str, config: LoKrConfig) -> AdapterLayer | None:
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        return LoKrLayer(module, module_name)
    return None


class LoKrMethod(AdapterMethod):
    name = "lokr"
    config_cls = LoKrConfig
    layer_types = (LoKrLayer,)

    def create_layer(self, module: nn.Module, module_name: str, config: LoKrConfig) -> AdapterLayer | None:
        return create_lokr_layer(module, module_name, config)


METHOD = LoKrMethod()
