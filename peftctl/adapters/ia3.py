"""(IA)³ (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning"): learned vectors rescale keys, values (outputs of k/v projections) and the
input of the feed-forward output projection.

Attention-side modules: y = l ⊙ (W x + b)      -> merged: W' = diag(l) W, b' = l ⊙ b
Feed-forward modules:   y = W (l ⊙ x) + b      -> merged: W' = W diag(l)
Vectors start at ones, so a fresh adapter is the identity.
Saved as PEFT's ``ia3_l`` (shape (out, 1) for attention modules, (1, in) for feed-forward ones).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from peftctl.adapters.core.base import AdapterLayer
from peftctl.adapters.core.config import AdapterConfig
from peftctl.adapters.core.layer_utils import is_gpt2_conv1d, linear_in_out
from peftctl.adapters.core.method import AdapterMethod
from peftctl.errors import ConfigError

if TYPE_CHECKING:
    from peftctl.adapters.core.model import AdaptedModel

# model_type -> (target_modules, feedforward_modules): PEFT's IA3 defaults
IA3_DEFAULTS: dict[str, tuple[list[str], list[str]]] = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "opt": (["k_proj", "v_proj", "fc2"], ["fc2"]),
    "t5": (["k", "v", "wo"], ["wo"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
}


@dataclass
class IA3Config(AdapterConfig):
    method: ClassVar[str] = "ia3"
    peft_type: ClassVar[str] = "IA3"

    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def validate(self) -> None:
        super().validate()
        ff, targets = self.feedforward_modules, self.target_modules
        if isinstance(ff, list) and isinstance(targets, list):
            extra = [m for m in ff if m not in targets]
            self._check(
                not extra,
                "feedforward_modules",
                ff,
                f"every entry must also be in adapter.target_modules (not: {extra})",
            )

    def to_peft_dict(self) -> dict:
        out = super().to_peft_dict()
        # PEFT's IA3Config has no layer selection fields; write them only when used
        for key in ("layers_to_transform", "layers_pattern"):
            if out.get(key) is None:
                out.pop(key, None)
        return out

    def is_feedforward(self, module_name: str) -> bool:
        """PEFT's rule: a string is a regex full match, a list matches by name suffix."""
        ff = self.feedforward_modules
        if ff is None:
            return False
        if isinstance(ff, str):
            return re.fullmatch(ff, module_name) is not None
        return any(module_name.endswith(key) for key in ff)


class IA3Linear(AdapterLayer):
    """(IA)³ on nn.Linear, GPT-2 Conv1D and nn.Conv2d (vectors shaped (1, C, 1, 1) there, as PEFT)."""

    adapter_layer_names = ("ia3_l",)

    def __init__(self, base_layer: nn.Module, module_name: str, is_feedforward: bool) -> None:
        super().__init__(base_layer, module_name)
        self.is_conv = isinstance(base_layer, nn.Conv2d)
        if self.is_conv:
            if is_feedforward and base_layer.groups != 1:
                raise ConfigError(
                    f"adapter.feedforward_modules matches {module_name}, a grouped Conv2d; (IA)³ scales "
                    "the input of ungrouped convolutions only"
                )
            self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        else:
            self.in_features, self.out_features = linear_in_out(base_layer)
        self.fan_in_fan_out = is_gpt2_conv1d(base_layer)
        self.is_feedforward = is_feedforward
        self.ia3_l = nn.ParameterDict()

    def update_layer(self, adapter_name: str, config: IA3Config) -> None:
        if self.is_conv:
            shape = (1, self.in_features if self.is_feedforward else self.out_features, 1, 1)
        else:
            shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        vector = (
            torch.ones(shape, device=self.weight.device)
            if config.init_ia3_weights
            else torch.randn(shape, device=self.weight.device)
        )
        self.ia3_l[adapter_name] = nn.Parameter(vector)
        self.adapter_configs[adapter_name] = config

    def _weight_scale(self, adapter_name: str) -> torch.Tensor:
        """The vector shaped to broadcast against the stored weight."""
        vector = self.ia3_l[adapter_name]
        if self.is_conv:
            return vector if self.is_feedforward else vector.transpose(0, 1)
        return vector.T if self.fan_in_fan_out else vector

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters or self.merged:
            return super().forward(x, *args, **kwargs)
        scale: torch.Tensor | float = 1.0
        for name in self.active_adapters:
            vector = self.ia3_l[name]
            scale = scale * (vector if self.is_conv else vector.flatten())
        if self.is_feedforward:
            return self.base_layer((x * scale).to(x.dtype), *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result * scale).to(result.dtype)

    def adapted_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return weight * self._weight_scale(adapter_name).to(weight.dtype)

    def unadapted_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return weight / self._weight_scale(adapter_name).to(weight.dtype)

    def _scale_bias(self, adapter_name: str, inverse: bool) -> None:
        bias = getattr(self.base_layer, "bias", None)
        if self.is_feedforward or bias is None:
            return
        vector = self.ia3_l[adapter_name].detach().reshape(bias.shape).to(bias.dtype)
        with torch.no_grad():
            bias.data = bias.data / vector if inverse else bias.data * vector

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        already = len(self.merged_adapters)
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        for name in self.merged_adapters[already:]:
            self._scale_bias(name, inverse=False)

    def unmerge(self) -> None:
        for name in reversed(self.merged_adapters):
            self._scale_bias(name, inverse=True)
        super().unmerge()


def create_ia3_layer(module: nn.Module, module_name: str, config: IA3Config) -> AdapterLayer | None:
    if isinstance(module, (nn.Linear, nn.Conv2d)) or is_gpt2_conv1d(module):
        return IA3Linear(module, module_name, config.is_feedforward(module_name))
    return None


class IA3Method(AdapterMethod):
    name = "ia3"
    config_cls = IA3Config
    layer_types = (IA3Linear,)

    def create_layer(self, module: nn.Module, module_name: str, config: IA3Config) -> AdapterLayer | None:
        return create_ia3_layer(module, module_name, config)

    def inject(self, model: "AdaptedModel", adapter_name: str, config: AdapterConfig) -> None:
        # PEFT's per-architecture defaults when the user names no modules
        if config.target_modules is None:
            model_type = getattr(model.config, "model_type", None)
            if model_type in IA3_DEFAULTS:
                targets, feedforward = IA3_DEFAULTS[model_type]
                config.target_modules = list(targets)
                if config.feedforward_modules is None:
                    config.feedforward_modules = list(feedforward)
        super().inject(model, adapter_name, config)


METHOD = IA3Method()
