"""LoRA (Hu et al., 2021): W' = W + s · B A, with A ∈ R^{r×in}, B ∈ R^{out×r}, s = lora_alpha / r.

The forward never materialises ΔW: y = base(x) + B(A(dropout(x))) · s (paper eq. 3).
rsLoRA (Kalajdzievski, 2023): s = lora_alpha / sqrt(r). DoRA (use_dora) lives in dora.py, the
PiSSA / OLoRA / Gaussian initialisations in lora_init.py, EVA in lora_eva.py, CorDA in lora_corda.py.
Layer types (all with DoRA too): nn.Linear, GPT-2 Conv1D (weights stored (in, out): fan_in_fan_out),
nn.Embedding, nn.Conv1d / nn.Conv2d / nn.Conv3d.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftctl.adapters.lora import corda as lora_corda, dora, eva as lora_eva, inits as lora_init
from peftctl.adapters.core.layer_utils import is_gpt2_conv1d
from peftctl.adapters.core.base import AdapterLayer
from peftctl.adapters.core.config import AdapterConfig
from peftctl.adapters.core.registry import Method
from peftctl.errors import ConfigError

if TYPE_CHECKING:
    from peftctl.adapters.core.model import AdaptedModel

INIT_CHOICES = "true, false, 'gaussian', 'pissa', 'pissa_niter_N', 'olora', 'loftq', 'eva', 'corda'"
NOT_IMPLEMENTED_INITS = ("lora_ga",)


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
    eva_config: dict[str, Any] | None = None  # EVA's options (lora_eva.EVA_DEFAULTS), init_lora_weights='eva'
    corda_config: dict[str, Any] | None = None  # CorDA's options (lora_corda.CORDA_DEFAULTS), init_lora_weights='corda'

    def validate(self) -> None:
        super().validate()
        self._check(isinstance(self.r, int) and self.r > 0, "r", self.r, "expected an integer > 0")
        self._check(self.lora_alpha > 0, "lora_alpha", self.lora_alpha, "expected a number > 0")
        self._check(0.0 <= self.lora_dropout < 1.0, "lora_dropout", self.lora_dropout, "expected 0 <= p < 1")
        self._check(self.bias in ("none", "all", "lora_only"), "bias", self.bias, "expected one of none, all, lora_only")
        init = self.init_lora_weights
        if isinstance(init, str) and init.lower() in NOT_IMPLEMENTED_INITS:
            raise ConfigError(f"adapter.init_lora_weights={init!r} is not implemented in peftctl; expected one of {INIT_CHOICES}")
        valid_init = isinstance(init, bool) or init in ("gaussian", "pissa", "olora", "loftq", "eva", "corda") or (
            isinstance(init, str) and init.startswith("pissa_niter_") and init[len("pissa_niter_"):].isdigit()
        )
        self._check(valid_init, "init_lora_weights", init, f"expected one of {INIT_CHOICES}")
        lora_eva.validate_eva_config(self.eva_config)
        if self.eva_config is not None and init != "eva":
            warnings.warn("adapter.eva_config is ignored unless init_lora_weights is 'eva'")
        lora_corda.validate_corda_config(self.corda_config)
        if self.corda_config is not None and init != "corda":
            warnings.warn("adapter.corda_config is ignored unless init_lora_weights is 'corda'")
        for name, rank in self.rank_pattern.items():
            if not (isinstance(rank, int) and rank > 0):
                raise ConfigError(f"adapter.rank_pattern[{name!r}]={rank!r} is not valid; expected an integer > 0")
        for name, alpha in self.alpha_pattern.items():
            if not (isinstance(alpha, (int, float)) and alpha > 0):
                raise ConfigError(f"adapter.alpha_pattern[{name!r}]={alpha!r} is not valid; expected a number > 0")
        if self.layer_replication is not None:
            ok = all(isinstance(p, (list, tuple)) and len(p) == 2 and 0 <= p[0] < p[1] for p in self.layer_replication)
            self._check(ok, "layer_replication", self.layer_replication, "expected a list of [start, end) pairs with start < end")

    def rank_and_alpha_for(self, module_name: str) -> tuple[int, float]:
        """Per-module r / alpha from rank_pattern / alpha_pattern: the first key that matches the
        name as a regex anchored at a dot boundary and at the end (PEFT's get_pattern_key)."""

        def lookup(pattern: dict[str, Any], default: Any) -> Any:
            for key, value in pattern.items():
                if re.match(rf"(.*\.)?({key})$", module_name):
                    return value
            return default

        return lookup(self.rank_pattern, self.r), lookup(self.alpha_pattern, self.lora_alpha)

    def scaling_for(self, module_name: str) -> tuple[int, float, float]:
        r, alpha = self.rank_and_alpha_for(module_name)
        return r, alpha, alpha / math.sqrt(r) if self.use_rslora else alpha / r


class LoraLayer(AdapterLayer):
    """What every LoRA layer shares: r / alpha / scaling per adapter, dropout, init and DoRA."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_magnitude_vector", "lora_dropout")
    other_param_names = ("r", "lora_alpha", "scaling")

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.fan_in_fan_out = False
        self._dora_cache = dora.DoraNormCache()
        self._dora_merge_norm: dict[str, torch.Tensor] = {}

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
        lora_init.initialise(self, adapter_name, config.init_lora_weights)
        if config.init_lora_weights == "loftq":
            from peftctl.adapters.lora.loftq import apply_loftq

            apply_loftq(self, adapter_name, config.loftq_config)
        if config.init_lora_weights == "corda":
            lora_corda.apply_corda(self, adapter_name, config)
        if config.use_dora:
            magnitude = dora.weight_norm(self.oriented_weight(), self.lora_delta(adapter_name))
            self.lora_magnitude_vector[adapter_name] = nn.Parameter(dora.magnitude_layout(magnitude, self.weight.dim()))

    def oriented_weight(self) -> torch.Tensor:
        """The base weight as (out, in, ...) (GPT-2 Conv1D stores it transposed); bitsandbytes
        layers are dequantized (DoRA's column norm needs the real values)."""
        from peftctl.models.quantized import read_weight

        weight = read_weight(self.base_layer)
        return weight.T if self.fan_in_fan_out else weight

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        delta = self.lora_delta(adapter_name)
        return delta.T if self.fan_in_fan_out else delta

    def adapted_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        if adapter_name not in self.lora_magnitude_vector:
            return super().adapted_weight(weight, adapter_name)
        w = weight.T if self.fan_in_fan_out else weight
        merged = dora.merged_weight(self, w, adapter_name)
        return (merged.T if self.fan_in_fan_out else merged).to(weight.dtype)

    def unadapted_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        if adapter_name not in self.lora_magnitude_vector:
            return super().unadapted_weight(weight, adapter_name)
        w = weight.T if self.fan_in_fan_out else weight
        base = dora.unmerged_weight(self, w, adapter_name)
        return (base.T if self.fan_in_fan_out else base).to(weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        weight = self.weight
        if getattr(weight, "_peftctl_shared", False):
            # a layer_replication copy: merging into the shared tensor would change every copy
            own = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
            self.base_layer.weight = own
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def lora_path(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """B(A(x)) for an already dropped-out x (unscaled)."""
        return self.lora_B[adapter_name](self.lora_A[adapter_name](x))

    def base_no_bias(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def adapter_output(self, x: torch.Tensor, result: torch.Tensor, adapter_name: str) -> torch.Tensor:
        dropout = self.lora_dropout[adapter_name]
        if not torch.is_autocast_enabled(x.device.type):  # under autocast the matmuls pick the dtype
            x = x.to(self.lora_A[adapter_name].weight.dtype)
        if adapter_name in self.lora_magnitude_vector:
            return dora.dora_output(self, x, result, adapter_name)
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

    def base_no_bias(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.oriented_weight().to(x.dtype))


class LoraConv(LoraLayer):
    """LoRA on nn.Conv1d / Conv2d / Conv3d: A is a conv with the base kernel, stride, padding and
    dilation (in -> r), B a 1×…×1 conv (r -> out); ΔW[o] = s · Σ_r B[o, r] A[r] is exact."""

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__(base_layer, module_name)
        if base_layer.groups != 1:
            raise ConfigError(f"LoRA on grouped convolutions is not supported ({module_name}: groups={base_layer.groups}); exclude it with adapter.exclude_modules")
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels

    def _create_ab(self, adapter_name: str, r: int) -> None:
        base = self.base_layer
        conv = type(base)
        ones = (1,) * (base.weight.dim() - 2)
        self.lora_A[adapter_name] = conv(
            self.in_features, r, base.kernel_size, base.stride, base.padding, base.dilation,
            bias=False, padding_mode=base.padding_mode, device=base.weight.device,
        )
        self.lora_B[adapter_name] = conv(r, self.out_features, ones, ones, bias=False, device=base.weight.device)

    def lora_delta(self, adapter_name: str) -> torch.Tensor:
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        delta = b.flatten(1).float() @ a.flatten(1).float()
        return delta.reshape(self.weight.shape) * self.scaling[adapter_name]

    def base_no_bias(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return base._conv_forward(x, base.weight.to(x.dtype), None)


class LoraEmbedding(LoraLayer):
    """LoRA on nn.Embedding: PEFT's lora_embedding_A (r × vocab, zeros) and lora_embedding_B
    (dim × r, normal); ΔW = s · (B A)ᵀ. No dropout on token ids (as PEFT).

    The table is stored (vocab, dim) = (in, out), i.e. transposed like GPT-2's Conv1D, so
    ``fan_in_fan_out`` is set: ``lora_delta`` is s·BA in (dim, vocab) layout and DoRA's norm runs
    per embedding dimension over the vocabulary (PEFT's DoraEmbeddingLayer)."""

    adapter_layer_names = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "lora_dropout")

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

    def lora_path(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """B(A(x)) for token ids x (unscaled): the rows of Aᵀ picked by x, times Bᵀ."""
        base = self.base_layer
        a, b = self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]
        after_a = F.embedding(x, a.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
        return after_a @ b.T

    def adapter_output(self, x: torch.Tensor, result: torch.Tensor, adapter_name: str) -> torch.Tensor:
        if adapter_name in self.lora_magnitude_vector:
            return dora.dora_embedding_output(self, x, result, adapter_name)
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


class LoraMethod(Method):
    """LoRA plus its model-level options: layer_replication (before injection) and trainable biases."""

    def inject(self, model: "AdaptedModel", adapter_name: str, config: AdapterConfig) -> None:
        assert isinstance(config, LoraConfig)
        if config.bias != "none" and len(model.peft_config) > 1:
            raise ConfigError(f"adapter.bias={config.bias!r} needs a single adapter (biases are shared by all adapters); use bias: none")
        if config.layer_replication:
            from peftctl.adapters.lora.layer_replication import replicate_layers

            replicate_layers(model.model, config.layer_replication)
        super().inject(model, adapter_name, config)
        for param in self.extra_parameters(model, adapter_name):
            param.requires_grad_(not config.inference_mode)

    def _bias_keys(self, model: "AdaptedModel", adapter_name: str) -> list[str]:
        # X-LoRA's experts are LoRA adapters that live outside model.peft_config
        bias = getattr(model.peft_config.get(adapter_name), "bias", "none")
        if bias == "all":
            return [k for k, _ in model.named_parameters() if k == "bias" or k.endswith(".bias")]
        if bias == "lora_only":
            return [
                f"{name}.base_layer.bias"
                for name, module in model.named_modules()
                if isinstance(module, LoraLayer) and getattr(module.base_layer, "bias", None) is not None
            ]
        return []

    def extra_adapter_keys(self, model: "AdaptedModel", adapter_name: str) -> dict[str, str]:
        """bias=all / lora_only: the trained biases are saved under their own names (as PEFT)."""
        return {key: key for key in self._bias_keys(model, adapter_name)}

    def extra_parameters(self, model: "AdaptedModel", adapter_name: str) -> list[nn.Parameter]:
        params = dict(model.named_parameters())
        return [params[k] for k in self._bias_keys(model, adapter_name)]

    def save_converted(self, model: "AdaptedModel", directory: str, adapter_name: str, initial_dir: str) -> None:
        """PiSSA / OLoRA -> plain LoRA against the original weights (see lora_init)."""
        lora_init.save_as_plain_lora(model, directory, adapter_name, initial_dir)


METHOD = LoraMethod("lora", LoraConfig, create_lora_layer, (LoraLinear, LoraEmbedding, LoraConv))
