"""OFT (Qiu et al., 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning").

The layer input is rotated by a block-diagonal orthogonal R (PEFT 0.21's convention):
    y = W (R x) + b  with  x R acting blockwise  ->  merged: W' = W Rᵀ
Each b×b block is the Cayley transform of a skew-symmetric Q (paper eq. 4):
    R = (I - Q)(I + Q)^{-1}             (exact, ``use_cayley_neumann=False``)
or PEFT's truncated Neumann series  R ≈ I + 2Q + 2Q² + ... + Q^{n-1}  (``use_cayley_neumann``).
Q is stored as its strict upper triangle (PEFT's ``oft_R.weight``, shape (r, b(b-1)/2)); zero
init makes R = I. COFT (paper §3.3) projects Q back into an eps-ball around 0 before use.
``block_share`` uses one block for the whole diagonal.

Conv2d: R rotates the flattened kernel, i.e. the (in·kh·kw)-long input patch, W' = W_flat Rᵀ
(PEFT's merge). The forward convolves with W' (exact for any stride / padding / dilation).
peft 0.21.2's *unmerged* Conv2d forward instead folds rotated unfold patches back with F.fold,
which sums overlaps: for kernels > 1×1 it is not the identity at init and differs from its own
merged model. peftctl computes what PEFT merges; the two agree exactly on 1×1 kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from peftctl.adapters.core.base import AdapterLayer
from peftctl.adapters.core.config import AdapterConfig
from peftctl.adapters.core.layer_utils import is_gpt2_conv1d, linear_in_out
from peftctl.adapters.core.method import AdapterMethod
from peftctl.errors import ConfigError


@dataclass
class OFTConfig(AdapterConfig):
    method: ClassVar[str] = "oft"
    peft_type: ClassVar[str] = "OFT"

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def validate(self) -> None:
        super().validate()
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ConfigError(
                f"adapter.r={self.r} and adapter.oft_block_size={self.oft_block_size} are not valid together; "
                "set exactly one of them (the other to 0): r x oft_block_size = in_features"
            )
        self._check(self.r >= 0 and self.oft_block_size >= 0, "r", self.r, "expected r >= 0 and oft_block_size >= 0")
        self._check(0.0 <= self.module_dropout < 1.0, "module_dropout", self.module_dropout, "expected 0 <= p < 1")
        self._check(self.eps > 0, "eps", self.eps, "expected a number > 0")


def skew(vec: torch.Tensor, size: int) -> torch.Tensor:
    """(n, size(size-1)/2) strict upper triangles -> (n, size, size) skew-symmetric matrices."""
    rows, cols = torch.triu_indices(size, size, 1, device=vec.device)
    matrix = vec.new_zeros(vec.shape[0], size, size)
    matrix[:, rows, cols] = vec
    return matrix - matrix.transpose(-2, -1)


def cayley(q: torch.Tensor, neumann: bool = False, terms: int = 5) -> torch.Tensor:
    """Batched Cayley transform of skew-symmetric q (n, b, b); exact or PEFT's Neumann series."""
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)
    if not neumann:
        return torch.linalg.solve(eye + q, eye - q, left=False)  # (I - Q)(I + Q)^{-1}
    r = eye.clone()
    if terms > 1:
        r = r + 2 * q
    if terms > 2:
        power = q @ q
        r = r + 2 * power
        for _ in range(3, terms - 1):
            power = power @ q
            r = r + 2 * power
        r = r + power @ q
    return r


def coft_project(vec: torch.Tensor, size: int, eps: float) -> torch.Tensor:
    """COFT: keep each skew block within ||Q|| <= eps / sqrt(n_blocks) (Qiu et al. §3.3)."""
    q = skew(vec, size)
    eps = eps / float(q.shape[0]) ** 0.5
    norm = q.norm(dim=(1, 2), keepdim=True)
    q = torch.where(norm <= eps, q, eps * q / norm.clamp_min(1e-30))
    rows, cols = torch.triu_indices(size, size, 1, device=vec.device)
    return q[:, rows, cols]


def adjust_divisor(n: int, value: int) -> int:
    """PEFT's adjustment of r / block size to the nearest divisor of n."""
    if value >= n:
        return n
    higher = value
    while higher <= n and n % higher != 0:
        higher += 1
    lower = value
    while lower > 1 and n % lower != 0:
        lower -= 1
    return lower if (value - lower) <= (higher - value) else higher


class OFTRotation(nn.Module):
    """Holds one adapter's skew parameters as ``weight`` (PEFT's key ``oft_R.weight``)."""

    def __init__(self, blocks: int, block_size: int, in_features: int, config: OFTConfig) -> None:
        super().__init__()
        self.r, self.block_size, self.in_features = blocks, block_size, in_features
        self.coft, self.eps, self.block_share = config.coft, config.eps, config.block_share
        self.neumann, self.terms = config.use_cayley_neumann, config.num_cayley_neumann_terms
        self.dropout = config.module_dropout
        n = 1 if config.block_share else blocks
        self.weight = nn.Parameter(torch.zeros(n, block_size * (block_size - 1) // 2))

    def blocks(self) -> torch.Tensor:
        """(r, b, b) orthogonal blocks."""
        if self.coft:
            with torch.no_grad():
                self.weight.copy_(coft_project(self.weight, self.block_size, self.eps))
        rot = cayley(skew(self.weight, self.block_size), self.neumann, self.terms)
        if self.block_share:
            rot = rot.expand(self.r, -1, -1)
        if self.training and self.dropout > 0 and rot.shape[0] > 1:
            # multiplicative dropout: replace a fraction of blocks by the identity
            drop = torch.zeros(rot.shape[0], device=rot.device)
            drop[torch.randperm(rot.shape[0])[: int(self.dropout * rot.shape[0])]] = 1
            eye = torch.eye(self.block_size, device=rot.device, dtype=rot.dtype)
            rot = (1 - drop.view(-1, 1, 1)) * rot + drop.view(-1, 1, 1) * eye
        return rot

    def matrix(self) -> torch.Tensor:
        return torch.block_diag(*self.blocks())

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        rot = self.blocks().to(x.dtype)
        xs = x.reshape(*x.shape[:-1], self.r, self.block_size)
        return torch.einsum("...rk,rkc->...rc", xs, rot).reshape(x.shape)


class OFTLayer(AdapterLayer):
    """One rotation per adapter over ``in_features`` (the size R acts on)."""

    adapter_layer_names = ("oft_R",)
    other_param_names = ("r", "oft_block_size")

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        self.in_features = 0
        self.oft_R = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.oft_block_size: dict[str, int] = {}

    def update_layer(self, adapter_name: str, config: OFTConfig) -> None:
        n = self.in_features
        if config.r == 0:
            block = adjust_divisor(n, config.oft_block_size) if n % config.oft_block_size else config.oft_block_size
            r = n // block
        else:
            r = adjust_divisor(n, config.r) if n % config.r else config.r
            block = n // r
        rotation = OFTRotation(r, block, n, config).to(self.weight.device)
        if not config.init_weights:
            nn.init.normal_(rotation.weight, std=0.1)
        self.oft_R[adapter_name] = rotation
        self.r[adapter_name], self.oft_block_size[adapter_name] = r, block
        self.adapter_configs[adapter_name] = config

    def rotation_matrix(self, adapter_name: str) -> torch.Tensor:
        return self.oft_R[adapter_name].matrix()


class OFTLinear(OFTLayer):
    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        self.in_features = linear_in_out(base_layer)[0]
        self.fan_in_fan_out = is_gpt2_conv1d(base_layer)  # GPT-2 Conv1D stores Wᵀ

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters or self.merged:
            return super().forward(x, *args, **kwargs)
        dtype = x.dtype
        # the adapter merged first must act last on x: merging A then B gives W Rᵀ_A Rᵀ_B
        for name in reversed(self.active_adapters):
            rotation = self.oft_R[name]
            x = rotation.rotate(x.to(rotation.weight.dtype))
        return self.base_layer(x.to(dtype), *args, **kwargs)

    def adapted_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        rot = self.rotation_matrix(adapter_name).float()
        w = weight.float().T if self.fan_in_fan_out else weight.float()
        new = w @ rot.T  # W' = W Rᵀ
        return (new.T if self.fan_in_fan_out else new).to(weight.dtype)

    def unadapted_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        rot = self.rotation_matrix(adapter_name).float()
        w = weight.float().T if self.fan_in_fan_out else weight.float()
        old = torch.linalg.solve(rot, w.T).T  # W = W' R^{-T}
        return (old.T if self.fan_in_fan_out else old).to(weight.dtype)


class OFTConv2d(OFTLayer):
    """OFT on nn.Conv2d: R acts on the flattened kernel (in·kh·kw, PEFT's block layout)."""

    def __init__(self, base_layer: nn.Conv2d, module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        if base_layer.groups != 1:
            raise ConfigError(
                f"OFT on grouped convolutions is not supported ({module_name}: groups={base_layer.groups}); exclude it "
                "with adapter.exclude_modules"
            )
        kh, kw = base_layer.kernel_size
        self.in_features = base_layer.in_channels * kh * kw

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters or self.merged or not self.active_adapters:
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        weight = base.weight
        for name in self.active_adapters:  # same order as merging them one after another
            weight = self._rotate(weight, name)
        return base._conv_forward(x, weight.to(x.dtype), base.bias)

    def _rotate(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        rot = self.rotation_matrix(adapter_name)
        return (weight.flatten(1).to(rot.dtype) @ rot.T).reshape(weight.shape)  # W' = W Rᵀ

    def adapted_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return self._rotate(weight.float(), adapter_name).to(weight.dtype)

    def unadapted_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        rot = self.rotation_matrix(adapter_name).float()
        old = torch.linalg.solve(rot, weight.float().flatten(1).T).T  # W = W' R^{-T}
        return old.reshape(weight.shape).to(weight.dtype)


def create_oft_layer(module: nn.Module, module_name: str, config: OFTConfig) -> AdapterLayer | None:
    if isinstance(module, nn.Linear) or is_gpt2_conv1d(module):
        return OFTLinear(module, module_name)
    if isinstance(module, nn.Conv2d):
        return OFTConv2d(module, module_name)
    return None


class OFTMethod(AdapterMethod):
    name = "oft"
    config_cls = OFTConfig
    layer_types = (OFTLinear, OFTConv2d)

    def create_layer(self, module: nn.Module, module_name: str, config: OFTConfig) -> AdapterLayer | None:
        return create_oft_layer(module, module_name, config)


METHOD = OFTMethod()
