"""BOFT (Liu et al., 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization").

The orthogonal matrix is a product of m = ``boft_n_butterfly_factor`` butterfly factors (paper eq. 6)
    M = B_{m-1} ··· B_1 B_0,   B_i = P_i diag(R_i1, ..., R_ik) P_iᵀ
with P_i the block-butterfly permutation of level i (P_0 = I) and every block R the Cayley
transform of a skew-symmetric matrix, R = (I - S)(I + S)^{-1}, S = (A - Aᵀ)/2. A learned
output scale s completes it (paper §4): W' = diag(s) · W Mᵀ over the flattened input dim
(in_features, or in·kh·kw for Conv2d). Zero A and unit s make W' = W.
Tensor names are PEFT's: ``boft_R`` (m, blocks, b, b) and ``boft_s`` ((out, 1); (1, out) for conv).
Note: peft on a machine without its CUDA extension silently uses m = 1 (and still writes m in
adapter_config.json); peftctl honours m when it builds an adapter, and loads such a file as peft
does: tensors shaped for one factor load with m = 1, with a warning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftctl.adapters.core.base import AdapterLayer
from peftctl.adapters.core.config import AdapterConfig
from peftctl.adapters.core.method import AdapterMethod
from peftctl.errors import ConfigError


@dataclass
class BOFTConfig(AdapterConfig):
    method: ClassVar[str] = "boft"
    peft_type: ClassVar[str] = "BOFT"

    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    boft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True

    def validate(self) -> None:
        super().validate()
        if (self.boft_block_size == 0) == (self.boft_block_num == 0):
            raise ConfigError(
                f"adapter.boft_block_size={self.boft_block_size} and adapter.boft_block_num={self.boft_block_num} "
                "are not valid together; set exactly one of them (the other to 0)"
            )
        self._check(
            self.boft_n_butterfly_factor >= 1,
            "boft_n_butterfly_factor",
            self.boft_n_butterfly_factor,
            "expected an integer >= 1",
        )
        self._check(0.0 <= self.boft_dropout < 1.0, "boft_dropout", self.boft_dropout, "expected 0 <= p < 1")


def butterfly_perm(n: int, blocks: int, half: int, levels: int) -> torch.Tensor:
    """Block-butterfly permutation indices (the BOFT reference implementation's rule)."""
    if levels == 0:
        return torch.arange(n)
    if blocks * half * 2 > n:
        raise ConfigError(f"adapter.boft_block_num={blocks} is too large for a dimension of {n}")
    size = n // blocks
    order = torch.empty(size, dtype=torch.long)
    positions = torch.cat((torch.arange(0, size / half, 2), torch.arange(1, size / half, 2)))
    for i, pos in enumerate(positions):
        order[int(i * half) : int(i * half + half)] = torch.arange(size)[int(pos * half) : int(pos * half + half)]
    indices = torch.arange(n)
    for start in range(0, n, size):
        indices[start : start + size] = indices[start : start + size][order]
    return indices


def block_sizes(dim: int, config: BOFTConfig) -> tuple[int, int]:
    """(block size, block count) for a flattened input dimension, with PEFT's checks."""
    extra = config.boft_n_butterfly_factor - 1
    if config.boft_block_size == 0:
        num = config.boft_block_num
        if dim % num:
            raise ConfigError(f"adapter.boft_block_num={num} does not divide the layer's input dimension {dim}")
        if extra and (num % (2**extra) or extra > num.bit_length() - 1):
            raise ConfigError(
                f"adapter.boft_block_num={num} must be a multiple of 2^(boft_n_butterfly_factor-1)={2**extra}"
            )
        size = dim // num
    else:
        size = config.boft_block_size
        if dim % size or (extra and dim % (size * 2**extra)):
            raise ConfigError(
                f"adapter.boft_block_size={size} with boft_n_butterfly_factor={extra + 1} does not fit the layer's "
                f"input dimension {dim}"
            )
        num = dim // size
    if extra and (num % 2 or size % 2):
        raise ConfigError(
            f"adapter.boft_block_size={size} / boft_block_num={num} must be even with butterfly factors > 1"
        )
    return size, num


def cayley_full(a: torch.Tensor) -> torch.Tensor:
    """Cayley transform of the skew part of square blocks a (n, b, b)."""
    s = 0.5 * (a - a.transpose(-2, -1))
    eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype).expand_as(a)
    return torch.linalg.solve(eye + s, eye - s, left=False)


class BOFTLayer(AdapterLayer):
    adapter_layer_names = ("boft_R", "boft_s")
    other_param_names = ("boft_block_size", "boft_block_num", "boft_dropout")

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        self.is_conv = isinstance(base_layer, nn.Conv2d)
        self.out_features = self.weight.shape[0]
        self.dim = self.weight[0].numel()
        self.boft_R, self.boft_s = nn.ParameterDict(), nn.ParameterDict()
        self.boft_block_size: dict[str, int] = {}
        self.boft_block_num: dict[str, int] = {}
        self.boft_dropout: dict[str, float] = {}
        self.perms: dict[str, torch.Tensor] = {}

    def update_layer(self, adapter_name: str, config: BOFTConfig) -> None:
        size, num = block_sizes(self.dim, config)
        levels = config.boft_n_butterfly_factor
        device = self.weight.device
        self.perms[adapter_name] = torch.stack(
            [butterfly_perm(self.dim, num // 2**i, size // 2, levels - 1) for i in range(levels)]
        ).to(device)
        r = torch.zeros(levels, num, size, size, device=device)
        s = torch.ones((1, self.out_features) if self.is_conv else (self.out_features, 1), device=device)
        if not config.init_weights:
            nn.init.normal_(r, std=0.1)
            nn.init.normal_(s, mean=1.0, std=0.1)
        self.boft_R[adapter_name], self.boft_s[adapter_name] = nn.Parameter(r), nn.Parameter(s)
        self.boft_block_size[adapter_name], self.boft_block_num[adapter_name] = size, num
        self.boft_dropout[adapter_name] = config.boft_dropout
        self.adapter_configs[adapter_name] = config

    def rotation_matrix(self, adapter_name: str) -> torch.Tensor:
        """M = B_{m-1} ··· B_0 (dim × dim), orthogonal."""
        r = self.boft_R[adapter_name]
        levels, num, size, _ = r.shape
        blocks = cayley_full(r.reshape(levels * num, size, size)).reshape(levels, num, size, size)
        p = self.boft_dropout[adapter_name]
        if self.training and p > 0 and num > 1:
            # block dropout: a random fraction of blocks becomes the identity
            drop = torch.zeros(levels, num, 1, 1, device=r.device, dtype=r.dtype)
            for level in range(levels):
                drop[level, torch.randperm(num)[: int(p * num)]] = 1
            blocks = (1 - drop) * blocks + drop * torch.eye(size, device=r.device, dtype=r.dtype)
        matrix = None
        for level in range(levels):
            perm = self.perms[adapter_name][level]
            diag = torch.block_diag(*blocks[level])
            factor = diag[perm][:, perm]  # P D Pᵀ with P[i, perm[i]] = 1
            matrix = factor if matrix is None else factor @ matrix
        return matrix

    def _scale(self, adapter_name: str) -> torch.Tensor:
        return self.boft_s[adapter_name].reshape(self.out_features, 1)

    def adapted_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        flat = weight.reshape(self.out_features, self.dim).float()
        rot = self.rotation_matrix(adapter_name).float()
        return ((flat @ rot.T) * self._scale(adapter_name).float()).reshape(weight.shape).to(weight.dtype)

    def unadapted_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        flat = weight.reshape(self.out_features, self.dim).float() / self._scale(adapter_name).float()
        rot = self.rotation_matrix(adapter_name).float()
        return (flat @ rot).reshape(weight.shape).to(weight.dtype)  # Mᵀ⁻¹ = M (orthogonal)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters or self.merged:
            return super().forward(x, *args, **kwargs)
        weight = self.weight
        for name in self.active_adapters:
            weight = self.adapted_weight(weight, name)
        base, x = self.base_layer, x.to(weight.dtype)
        if self.is_conv:
            return F.conv2d(
                x,
                weight,
                base.bias,
                stride=base.stride,
                padding=base.padding,
                dilation=base.dilation,
                groups=base.groups,
            )
        return F.linear(x, weight, base.bias)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.perms.pop(adapter_name, None)


def create_boft_layer(module: nn.Module, module_name: str, config: BOFTConfig) -> AdapterLayer | None:
    return BOFTLayer(module, module_name) if isinstance(module, (nn.Linear, nn.Conv2d)) else None


class BOFTMethod(AdapterMethod):
    """The BOFT method, with peft's reading of one-factor files (see the module note)."""

    name = "boft"
    config_cls = BOFTConfig
    layer_types = (BOFTLayer,)

    def create_layer(self, module: nn.Module, module_name: str, config: BOFTConfig) -> AdapterLayer | None:
        return create_boft_layer(module, module_name, config)

    def config_for_weights(self, config: BOFTConfig, weights: dict[str, torch.Tensor]) -> BOFTConfig:
        """boft_R tensors shaped (1, blocks, b, b) under a config with m > 1 butterfly factors: load them
        as m = 1, as peft does (its fallback without the CUDA extension saves exactly that)."""
        factors = [t.shape[0] for key, t in weights.items() if key.rpartition(".")[2] == "boft_R"]
        if config.boft_n_butterfly_factor == 1 or not factors or any(f != 1 for f in factors):
            return config
        warnings.warn(
            f"BOFT adapter: adapter_config.json says boft_n_butterfly_factor={config.boft_n_butterfly_factor} "
            "but its tensors hold 1 butterfly factor (peft without its CUDA extension writes such files); "
            "loaded with 1 factor, as peft does",
            stacklevel=3,
        )
        return config.replace(boft_n_butterfly_factor=1)


METHOD = BOFTMethod()
