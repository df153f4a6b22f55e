"""LoRA (Hu et al., 2021): W' = W + s · B A, with A ∈ R^{r×in}, B ∈ R^{out×r}, s = lora_alpha / r.

The forward never materialises ΔW: y = base(x) + B(A(dropout(x))) · s (paper eq. 3).
rsLoRA (Kalajdzievski, 2023): s = lora_alpha / sqrt(r). The config is in config.py, the method in
method.py. DoRA (use_dora) is a LoraVariant object (dora.py) the layer calls for forward and merge;
the initialisations are LoraInit objects in a table (config.py: inits.py, eva.py, corda.py, loftq.py).
Layer types (all with DoRA too): nn.Linear, GPT-2 Conv1D (weights stored (in, out): fan_in_fan_out),
nn.Embedding, nn.Conv1d / nn.Conv2d / nn.Conv3d.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from peftctl.adapters.core.base import AdapterLayer
from peftctl.adapters.core.layer_utils import is_gpt2_conv1d
from peftctl.adapters.lora import dora
from peftctl.adapters.lora.variant import LoraVariant
from peftctl.errors import ConfigError
from peftctl.kernels.lora_fused import fused_lora_branch
from peftctl.models.quantized import dequantize, is_quantized, read_weight

if TYPE_CHECKING:
    from peftctl.adapters.lora.config import LoraConfig


class LoraLayer(AdapterLayer):
    """What every LoRA layer shares: r / alpha / scaling per adapter, dropout, init and DoRA."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_magnitude_vector", "lora_dropout")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_variant")
    dora_variant: LoraVariant = dora.DORA  # the variant use_dora selects for this layer type
    # the fused LoRA branch (kernels/lora_fused.py): switched on per layer by the CUDA fast path only
    fused_lora: bool = False

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_variant: dict[str, LoraVariant] = {}  # adapters with a variant (DoRA); plain LoRA: none
        self.fan_in_fan_out = False
        self.dora_norm_cache = dora.DoraNormCache()
        self.dora_merge_norm: dict[str, torch.Tensor] = {}

    # -- to implement per layer type
    def _create_ab(self, adapter_name: str, r: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def lora_delta(self, adapter_name: str) -> torch.Tensor:
        """s · B A in the base weight's (out, in, ...) layout (not transposed for fan_in_fan_out)."""
        raise NotImplementedError  # pragma: no cover

    def update_layer(self, adapter_name: str, config: LoraConfig) -> None:
        r, alpha, scaling = config.scaling_for(self.module_name)
        self.r[adapter_name], self.lora_alpha[adapter_name], self.scaling[adapter_name] = r, alpha, scaling
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self._create_ab(adapter_name, r)
        self.adapter_configs[adapter_name] = config
        config.initialisation().init_layer(self, adapter_name, config)
        if config.use_dora:
            self.lora_variant[adapter_name] = self.dora_variant
            self.dora_variant.init(self, adapter_name)

    def oriented_weight(self) -> torch.Tensor:
        """The base weight as (out, in, ...) (GPT-2 Conv1D stores it transposed); bitsandbytes
        layers are dequantized (DoRA's column norm needs the real values)."""
        weight = read_weight(self.base_layer)
        return weight.T if self.fan_in_fan_out else weight

    def dora_weight(self) -> torch.Tensor:
        """The base weight as the forward computes with it, in (out, in, ...) layout, for DoRA's norm and
        recomputed W x: the parameter itself (a transposed view for fan_in_fan_out), no copy; bitsandbytes
        layers dequantized once, in the dtype their own forward dequantizes to."""
        weight = dequantize(self.base_layer) if is_quantized(self.base_layer) else self.weight
        return weight.T if self.fan_in_fan_out else weight

    def dora_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as matrices, r × K and out × r, with s · B @ A = lora_delta flattened to (out, K)."""
        return self.lora_A[adapter_name].weight.flatten(1), self.lora_B[adapter_name].weight.flatten(1)

    def prime_dora_cache(self) -> None:
        """Fill ‖W_i‖² for DoRA eagerly (before torch.compile traces the layer: the graph reads it as is)."""
        self.dora_norm_cache.clear()
        if self.lora_variant:
            self.dora_norm_cache.squared_weight_norms(self)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        delta = self.lora_delta(adapter_name)
        return delta.T if self.fan_in_fan_out else delta

    def adapted_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        variant = self.lora_variant.get(adapter_name)
        if variant is None:
            return super().adapted_weight(weight, adapter_name)
        w = weight.T if self.fan_in_fan_out else weight
        merged = variant.merged_weight(self, w, adapter_name)
        return (merged.T if self.fan_in_fan_out else merged).to(weight.dtype)

    def unadapted_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        variant = self.lora_variant.get(adapter_name)
        if variant is None:
            return super().unadapted_weight(weight, adapter_name)
        w = weight.T if self.fan_in_fan_out else weight
        base = variant.unmerged_weight(self, w, adapter_name)
        return (base.T if self.fan_in_fan_out else base).to(weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        weight = self.weight
        if getattr(weight, "_peftctl_shared", False):
            # a layer_replication copy: merging into the shared tensor would change every copy
            own = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
            self.base_layer.weight = own
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def on_weights_changed(self) -> None:
        self.prime_dora_cache()

    def lora_path(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """B(A(x)) for an already dropped-out x (unscaled)."""
        return self.lora_B[adapter_name](self.lora_A[adapter_name](x))

    def base_no_bias(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """The base layer's output without bias, for ``weight`` = dora_weight()."""
        raise NotImplementedError

    def adapter_output(self, x: torch.Tensor, result: torch.Tensor, adapter_name: str) -> torch.Tensor:
        dropout = self.lora_dropout[adapter_name]
        if self.fused_lora and adapter_name not in self.lora_variant:
            return result + self.fused_update(x, adapter_name).to(result.dtype)
        if not torch.is_autocast_enabled(x.device.type):  # under autocast the matmuls pick the dtype
            x = x.to(self.lora_A[adapter_name].weight.dtype)
        variant = self.lora_variant.get(adapter_name)
        if variant is not None:
            return variant.forward(self, x, result, adapter_name)
        update = self.lora_path(dropout(x), adapter_name) * self.scaling[adapter_name]
        return result + update.to(result.dtype)


class LoraLinear(LoraLayer):
    """LoRA on nn.Linear and GPT-2 Conv1D (fan_in_fan_out: weight stored (in, out))."""

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        self.fan_in_fan_out = is_gpt2_conv1d(base_layer)
        out_f, in_f = self.oriented_weight().shape
        self.in_features, self.out_features = in_f, out_f

    def _create_ab(self, adapter_name: str, r: int) -> None:
        device = self.weight.device
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, device=device)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, device=device)

    def lora_delta(self, adapter_name: str) -> torch.Tensor:
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        return (b.float() @ a.float()) * self.scaling[adapter_name]

    def base_no_bias(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight.to(x.dtype))

    def supports_fused_lora(self) -> bool:
        """The fused branch covers plain LoRA on nn.Linear-layout weights (also bitsandbytes 4-bit layers);
        a layer whose adapters are all DoRA never takes it."""
        plain = any(name not in self.lora_variant for name in self.adapter_configs)
        return not self.fan_in_fan_out and plain

    def fused_update(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """s · B(A(dropout(x))) through one autograd function that saves x, not dropout(x)."""
        dropout = self.lora_dropout[adapter_name]
        p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        weight_a, weight_b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        return fused_lora_branch(x, weight_a, weight_b, self.scaling[adapter_name], p)


class LoraConv(LoraLayer):
    """LoRA on nn.Conv1d / Conv2d / Conv3d: A is a conv with the base kernel, stride, padding and
    dilation (in -> r), B a 1×…×1 conv (r -> out); ΔW[o] = s · Σ_r B[o, r] A[r] is exact."""

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        if base_layer.groups != 1:
            raise ConfigError(
                f"LoRA on grouped convolutions is not supported ({module_name}: groups={base_layer.groups}); exclude "
                "it with adapter.exclude_modules"
            )
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels

    def _create_ab(self, adapter_name: str, r: int) -> None:
        base = self.base_layer
        conv = type(base)
        ones = (1,) * (base.weight.dim() - 2)
        self.lora_A[adapter_name] = conv(
            self.in_features,
            r,
            base.kernel_size,
            base.stride,
            base.padding,
            base.dilation,
            bias=False,
            padding_mode=base.padding_mode,
            device=base.weight.device,
        )
        self.lora_B[adapter_name] = conv(r, self.out_features, ones, ones, bias=False, device=base.weight.device)

    def lora_delta(self, adapter_name: str) -> torch.Tensor:
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        delta = b.flatten(1).float() @ a.flatten(1).float()
        return delta.reshape(self.weight.shape) * self.scaling[adapter_name]

    def base_no_bias(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.base_layer._conv_forward(x, weight.to(x.dtype), None)


class LoraEmbedding(LoraLayer):
    """LoRA on nn.Embedding: PEFT's lora_embedding_A (r × vocab, zeros) and lora_embedding_B
    (dim × r, normal); ΔW = s · (B A)ᵀ. No dropout on token ids (as PEFT).

    The table is stored (vocab, dim) = (in, out), i.e. transposed like GPT-2's Conv1D, so
    ``fan_in_fan_out`` is set: ``lora_delta`` is s·BA in (dim, vocab) layout and DoRA's norm runs
    per embedding dimension over the vocabulary (PEFT's DoraEmbeddingLayer)."""

    adapter_layer_names = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "lora_dropout")
    dora_variant: LoraVariant = dora.DORA_EMBEDDING

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        self.fan_in_fan_out = True  # weight stored (vocab, dim) = (in, out)

    def _create_ab(self, adapter_name: str, r: int) -> None:
        device = self.weight.device
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.zeros(r, self.in_features, device=device))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.zeros(self.out_features, r, device=device))

    def lora_delta(self, adapter_name: str) -> torch.Tensor:
        a, b = self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]
        return (b.float() @ a.float()) * self.scaling[adapter_name]  # (dim, vocab) = (out, in)

    def dora_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]

    def lora_path(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """B(A(x)) for token ids x (unscaled): the rows of Aᵀ picked by x, times Bᵀ."""
        base = self.base_layer
        a, b = self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]
        after_a = F.embedding(
            x, a.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )
        return after_a @ b.T

    def adapter_output(self, x: torch.Tensor, result: torch.Tensor, adapter_name: str) -> torch.Tensor:
        variant = self.lora_variant.get(adapter_name)
        if variant is not None:
            return variant.forward(self, x, result, adapter_name)
        update = self.lora_path(x, adapter_name) * self.scaling[adapter_name]
        return result + update.to(result.dtype)


def create_lora_layer(module: nn.Module, module_name: str, config: LoraConfig) -> AdapterLayer | None:
    """The LoRA layer class for a base module type, or None when LoRA does not apply to it."""
    if isinstance(module, nn.Linear) or is_gpt2_conv1d(module):
        return LoraLinear(module, module_name)
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module, module_name)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return LoraConv(module, module_name)
    return None
